"""Convert a BLIP3o-NEXT hub checkpoint into a blip3o-rl model directory (see `policy.model_dir`).

The published checkpoints (BLIP3o/BLIP3o-NEXT-{Pretrain,SFT,GRPO-Geneval,GRPO-TexT}-3B) are one
transformers save of BLIP3o-NEXT's `blip3oQwenForCausalLM` (a Qwen3ForCausalLM whose inner model
also owns the vision tower, SANA, DC-AE and the connector). Tensor names, from their code
(JiuhaiChen/BLIP3o `blip3o/model/language_model/blip3o_qwen_{inference,grpo}.py`; `blip3oMetaModel`
in `blip3o/model/blip3o_arch.py` as carried by BLIP3o-NEXT forks, e.g. AMAP-ML/EMF):

    model.embed_tokens / model.layers.* / model.norm / lm_head   Qwen3 causal LM   -> ar/
    model.diffusion_connector.{0,2,3}.*   Linear -> GELU(tanh) -> Linear -> RMSNorm -> connector/
    model.sana.*                          SanaTransformer2DModel                   -> sana/transformer/
    model.sana_vae.*                      AutoencoderDC (DC-AE)                    -> sana/vae/
    model.vision_tower.*                  TA-Tok image tokenizer (understanding)   dropped

SANA's configs and the scheduler config are not in the checkpoint: BLIP3o-NEXT builds SANA from
`config.diffusion_name_or_path` (a SANA diffusers repo) and then loads the checkpoint's weights
over it. So the SANA repo (`sana=`, default: that config field) gives the configs, and also the
weights when the checkpoint does not carry them. The checkpoint's own SANA weights win when present
(their training leaves SANA's `caption_projection` trainable, so they may differ from the repo's).

Everything streams tensor by tensor from the safetensors shards into new shards (at most a few
shards' worth of tensors in memory), into a temporary directory renamed into place at the end:
a failure leaves no output directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from policy.connector import Connector
from policy.model_dir import ModelLayout, ModelPaths, resolve_checkpoint
from policy.vocab import ImageVocab

CONNECTOR_PREFIX = "model.diffusion_connector."
SANA_PREFIX = "model.sana."
VAE_PREFIX = "model.sana_vae."
DROPPED_PREFIXES = ("model.vision_tower.",)
"""Understanding-side parts the image-generation policy never runs."""
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# generation_config.json is deliberately not copied: vLLM would apply its sampling defaults
# (Qwen3 ships top_k=20, top_p=0.95) to rollouts and break the log-prob agreement with the learner.
DEFAULT_SHARD_BYTES = 2 * 1024**3
TOKENS_PER_IMAGE = 729
"""27 x 27 image tokens at scale <S0> (BLIP3o-NEXT's inference: seq_len 729)."""


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names what is wrong or missing."""


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass(frozen=True)
class SafetensorsCheckpoint:
    """Which file holds each tensor of a (possibly sharded) safetensors save: `STEM.safetensors`
    or `STEM.safetensors.index.json` + shards (transformers and diffusers use the same scheme)."""

    directory: Path
    files: dict[str, str]
    """Tensor name -> file name inside `directory`."""

    @classmethod
    def open(cls, directory: Path, stem: str) -> SafetensorsCheckpoint:
        directory = Path(directory)
        index = directory / f"{stem}.safetensors.index.json"
        single = directory / f"{stem}.safetensors"
        if index.is_file():
            files = dict(json.loads(index.read_text())["weight_map"])
        elif single.is_file():
            with safe_open(str(single), framework="pt") as handle:
                files = {name: single.name for name in handle.keys()}  # noqa: SIM118 (not a dict)
        else:
            present = _listing(p.name for p in directory.iterdir()) if directory.is_dir() else "no such directory"
            raise ConversionError(f"no {stem}.safetensors (or its .index.json) in {directory}; found: {present}")
        absent = sorted({f for f in files.values() if not (directory / f).is_file()})
        if absent:
            raise ConversionError(f"{directory}: shard files listed in the index are missing: {_listing(absent)}")
        return cls(directory, files)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape, from the file headers only (no tensor data read)."""
        shapes = {}
        for file in sorted(set(self.files.values())):
            with safe_open(str(self.directory / file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (not a dict)
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, one at a time, file by file (each read is one tensor's copy)."""
        for file in sorted(set(self.files.values())):
            with safe_open(str(self.directory / file), framework="pt") as handle:
                for name in sorted(handle.keys()):
                    yield name, handle.get_tensor(name)


class ShardedWriter:
    """Writes tensors as `STEM-0000i-of-0000n.safetensors` + index (or one `STEM.safetensors`),
    holding at most `max_shard_bytes` of them in memory."""

    def __init__(self, directory: Path, stem: str, max_shard_bytes: int, log: Callable[[str], None]):
        self.directory, self.stem, self.max_shard_bytes, self.log = Path(directory), stem, max_shard_bytes, log
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.directory / f"{self.stem}.part{len(self.shards)}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.log(f"  wrote {self.directory.name}/ shard {len(self.shards)} ({self.pending_bytes / 1e9:.2f} GB)")
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        """Final names and the index; returns the number of tensors written."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.directory / f"{self.stem}.part0.safetensors", self.directory / f"{self.stem}.safetensors")
            return len(self.shards[0])
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"{self.stem}-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"{self.stem}.part{i}.safetensors", self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return len(weight_map)


def qwen3_config(hub_config: dict, vocab_rows: int):
    """A plain Qwen3Config (what vLLM and transformers load) from the hub's blip3o_qwen config:
    the Qwen3 fields kept, BLIP3o's own fields (vision tower, diffusion path, tag ids) dropped."""
    from transformers import Qwen3Config

    if hub_config.get("vocab_size", vocab_rows) != vocab_rows:
        raise ConversionError(
            f"config.json says vocab_size {hub_config['vocab_size']} but model.embed_tokens.weight has "
            f"{vocab_rows} rows: the config does not belong to these weights"
        )
    fields = {k: v for k, v in hub_config.items() if k not in ("model_type", "architectures", "auto_map")}
    config = Qwen3Config.from_dict(fields)
    qwen3_fields = set(Qwen3Config().to_dict())
    for extra in set(config.to_dict()) - qwen3_fields:
        delattr(config, extra)
    config.architectures = ["Qwen3ForCausalLM"]
    return config


def expected_ar_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of Qwen3ForCausalLM(config), built on the meta device (no memory)."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _check_shapes(what: str, expected: dict, found: dict) -> None:
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    wrong = [f"{n} {found[n]} (expected {expected[n]})" for n in sorted(set(expected) & set(found)) if found[n] != expected[n]]
    problems = []
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if wrong:
        problems.append(f"wrong shapes: {_listing(wrong, 4)}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{what}: {path} is missing")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class SanaRepo:
    """A SANA diffusers repo: configs of the transformer, DC-AE and scheduler, and their weights."""

    root: Path
    transformer_config: dict
    vae_config: dict

    @classmethod
    def open(cls, root: Path) -> SanaRepo:
        what = f"SANA diffusers repo {root}"
        _read_json(root / "scheduler" / "scheduler_config.json", what)
        return cls(root, _read_json(root / "transformer" / "config.json", what), _read_json(root / "vae" / "config.json", what))

    def weights(self, part: str) -> SafetensorsCheckpoint:
        return SafetensorsCheckpoint.open(self.root / part, "diffusion_pytorch_model")

    def image_size(self) -> int:
        """Pixels per side: latent side (sample_size) x the DC-AE's downsampling 2**(blocks - 1)."""
        blocks = len(self.vae_config["decoder_block_out_channels"])
        return int(self.transformer_config["sample_size"]) * 2 ** (blocks - 1)


def split_names(names) -> dict[str, set[str]]:
    """Route each checkpoint tensor name to the part it belongs to (prefix match)."""
    parts = {"ar": set(), "connector": set(), "sana": set(), "vae": set(), "dropped": set()}
    for name in names:
        if name.startswith(CONNECTOR_PREFIX):
            parts["connector"].add(name)
        elif name.startswith(VAE_PREFIX):
            parts["vae"].add(name)
        elif name.startswith(SANA_PREFIX):
            parts["sana"].add(name)
        elif name.startswith(DROPPED_PREFIXES):
            parts["dropped"].add(name)
        else:
            parts["ar"].add(name)  # checked against Qwen3ForCausalLM's names: strays are reported there
    return parts


def _strip(parts: set[str], prefix: str, shapes: dict) -> dict[str, tuple[int, ...]]:
    return {name[len(prefix):]: shapes[name] for name in parts}


def _check_tokenizer(root: Path, tokens_per_image: int, vocab_rows: int) -> ImageVocab:
    from transformers import AutoTokenizer

    if not (root / "tokenizer_config.json").is_file():
        raise ConversionError("the checkpoint has no tokenizer (tokenizer_config.json is missing)")
    tokenizer = AutoTokenizer.from_pretrained(root)
    try:
        vocab = ImageVocab.from_tokenizer(tokenizer, tokens_per_image)
    except ValueError as error:
        raise ConversionError(f"tokenizer in {root}: {error}") from None
    if vocab.image_token_end > vocab_rows or len(tokenizer) > vocab_rows:
        raise ConversionError(f"tokenizer has {len(tokenizer)} tokens but the embedding only {vocab_rows} rows")
    if not tokenizer.chat_template:
        raise ConversionError(f"tokenizer in {root} has no chat template (rollout prompts need one)")
    return vocab


def _check_connector(names: set[str], shapes: dict, hidden: int, source: str) -> int:
    """Checks the connector's five tensors (Linear 0, Linear 2, RMSNorm 3; 1 is the GELU) and
    returns its output width (2304 = SANA's caption width in BLIP3o-NEXT)."""
    if not names:
        raise ConversionError(f"checkpoint {source} has no diffusion connector ({CONNECTOR_PREFIX}*)")
    found = _strip(names, CONNECTOR_PREFIX, shapes)
    out_dim = found.get("0.weight", (0,))[0]
    expected = {"0.weight": (out_dim, hidden), "0.bias": (out_dim,), "2.weight": (out_dim, out_dim),
                "2.bias": (out_dim,), "3.weight": (out_dim,)}
    _check_shapes(f"connector ({CONNECTOR_PREFIX}*)", expected, found)
    return out_dim


def _sana_sources(parts: dict, shapes: dict, repo: SanaRepo, sana_spec: str) -> dict[str, str]:
    """Where SANA's transformer and DC-AE weights come from: "checkpoint" when it carries them
    (checked name for name and shape for shape against the repo's), else the SANA repo."""
    sources = {}
    for part, prefix, subdir in (("sana", SANA_PREFIX, "transformer"), ("vae", VAE_PREFIX, "vae")):
        if parts[part]:
            expected = repo.weights(subdir).shapes()
            _check_shapes(f"SANA {subdir} in the checkpoint ({prefix}*) vs {sana_spec}", expected, _strip(parts[part], prefix, shapes))
            sources[subdir] = "checkpoint"
        else:
            sources[subdir] = sana_spec
    return sources


def convert_blip3o_next(
    source: str,
    out_dir: Path,
    sana: str | None = None,
    *,
    tokens_per_image: int = TOKENS_PER_IMAGE,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    local_files_only: bool | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> ModelPaths:
    """Write the blip3o-rl model directory `out_dir` from BLIP3o-NEXT checkpoint `source` (a local
    dir or hub id) and SANA diffusers repo `sana` (default: the checkpoint's diffusion_name_or_path)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConversionError(f"output {out_dir} already exists; remove it or choose another directory")
    root = resolve_checkpoint(source, local_files_only=local_files_only)
    log(f"[convert] checkpoint {source} -> {root}")
    hub_config = _read_json(root / "config.json", f"checkpoint {source}")
    checkpoint = SafetensorsCheckpoint.open(root, "model")
    shapes = checkpoint.shapes()
    parts = split_names(shapes)

    # -- validate everything from headers and configs before writing a byte ------------------
    if "model.embed_tokens.weight" not in shapes:
        raise ConversionError(f"checkpoint {source} has no model.embed_tokens.weight: not a BLIP3o-NEXT checkpoint")
    vocab_rows, hidden = shapes["model.embed_tokens.weight"]
    config = qwen3_config(hub_config, vocab_rows)
    if config.tie_word_embeddings and "lm_head.weight" in parts["ar"]:
        parts["dropped"].add("lm_head.weight")  # tied: the original model uses the embedding, not this
        parts["ar"].discard("lm_head.weight")
    _check_shapes("AR model (Qwen3ForCausalLM)", expected_ar_shapes(config), {n: shapes[n] for n in parts["ar"]})

    out_dim = _check_connector(parts["connector"], shapes, hidden, source)
    sana_spec = sana or hub_config.get("diffusion_name_or_path")
    if not sana_spec:
        raise ConversionError("the checkpoint names no SANA repo (diffusion_name_or_path): pass --sana")
    repo = SanaRepo.open(resolve_checkpoint(sana_spec, local_files_only=local_files_only))
    log(f"[convert] SANA configs from {sana_spec} -> {repo.root}")
    sources = _sana_sources(parts, shapes, repo, sana_spec)
    if repo.transformer_config["caption_channels"] != out_dim:
        raise ConversionError(f"connector outputs {out_dim} channels but SANA expects caption_channels {repo.transformer_config['caption_channels']}")
    if repo.transformer_config["in_channels"] != repo.vae_config["latent_channels"]:
        raise ConversionError("SANA transformer in_channels and DC-AE latent_channels differ")
    log(f"[convert] AR: {len(parts['ar'])} tensors, vocab {vocab_rows}; dropping {len(parts['dropped'])} tensors "
        f"({_listing(parts['dropped'], 3) or 'none'}); SANA transformer from {sources['transformer']}, "
        f"DC-AE from {sources['vae']}")

    # -- write into a temporary sibling directory, rename at the end ---------------------------
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        paths = ModelPaths(staging)
        config.save_pretrained(paths.ar)
        for name in TOKENIZER_FILES:
            if (root / name).is_file():
                shutil.copy2(root / name, paths.ar / name)
        # checked from ar/ (a plain qwen3 config), before the long part
        vocab = _check_tokenizer(paths.ar, tokens_per_image, vocab_rows)
        log(f"[convert] tokenizer: {vocab.codebook_size} image tokens from id {vocab.image_token_start}")
        _write_weights(checkpoint, parts, repo, sources, paths, max_shard_bytes, log)
        ModelLayout(tokens_per_image=tokens_per_image, image_size=repo.image_size(), decoder="sana").save(staging)
        provenance = {"source": source, "sana": sana_spec, "sana_transformer_from": sources["transformer"],
                      "sana_vae_from": sources["vae"], "dropped": sorted(parts["dropped"])}
        (staging / "converted_from.json").write_text(json.dumps(provenance, indent=2))
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"[convert] done: {out_dir} (image size {repo.image_size()}, {tokens_per_image} tokens per image)")
    return ModelPaths(out_dir)


def _write_weights(checkpoint, parts, repo: SanaRepo, sources, paths: ModelPaths, max_shard_bytes, log) -> None:
    """Stream every checkpoint tensor to its part (and the SANA repo's weights where needed)."""
    writers = {
        "ar": ShardedWriter(paths.ar, "model", max_shard_bytes, log),
        "sana": ShardedWriter(paths.sana_transformer, "diffusion_pytorch_model", max_shard_bytes, log),
        "vae": ShardedWriter(paths.sana_vae, "diffusion_pytorch_model", max_shard_bytes, log),
    }
    prefixes = {"sana": SANA_PREFIX, "vae": VAE_PREFIX}
    connector: dict[str, torch.Tensor] = {}
    total = len(checkpoint.files)
    for done, (name, tensor) in enumerate(checkpoint.tensors(), start=1):
        if name in parts["ar"]:
            writers["ar"].add(name, tensor)
        elif name in parts["connector"]:
            connector["layers." + name[len(CONNECTOR_PREFIX):]] = tensor
        elif name in parts["sana"] or name in parts["vae"]:
            part = "sana" if name in parts["sana"] else "vae"
            writers[part].add(name[len(prefixes[part]):], tensor)
        if done % 200 == 0 or done == total:
            log(f"[convert] read {done}/{total} checkpoint tensors")
    for part, subdir in (("sana", "transformer"), ("vae", "vae")):
        if sources[subdir] != "checkpoint":
            log(f"[convert] copying SANA {subdir} weights from {sources[subdir]}")
            for name, tensor in repo.weights(subdir).tensors():
                writers[part].add(name, tensor)
        shutil.copy2(repo.root / subdir / "config.json", (paths.sana_transformer if part == "sana" else paths.sana_vae) / "config.json")
    for part, writer in writers.items():
        log(f"[convert] {part}: {writer.close()} tensors, {writer.total_bytes / 1e9:.2f} GB")
    hidden, out_dim = connector["layers.0.weight"].shape[1], connector["layers.0.weight"].shape[0]
    module = Connector(hidden, out_dim).to(connector["layers.0.weight"].dtype)
    module.load_state_dict(connector, strict=True)
    module.save(paths.connector)
    paths.sana_scheduler.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo.root / "scheduler" / "scheduler_config.json", paths.sana_scheduler / "scheduler_config.json")
