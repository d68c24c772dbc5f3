"""Convert a BLIP3o-NEXT hub checkpoint into a blip3o-rl model directory (see `policy.model_dir`).

The published checkpoints (BLIP3o/BLIP3o-NEXT-{Pretrain,SFT,GRPO-Geneval,GRPO-TexT}-3B) are one
transformers save of BLIP3o-NEXT's `blip3oQwenForCausalLM` (a Qwen3ForCausalLM whose inner model
also owns the vision tower, SANA, DC-AE and the connector). Tensor names, from their code
(JiuhaiChen/BLIP3o, branch BLIP3o-NEXT: `blip3oMetaModel.__init__` in `blip3o/model/blip3o_arch.py`
lines 26-44; the TA-Tok wrapper in `blip3o/model/multimodal_encoder/ta_tok_encoder.py` line 41):

    model.embed_tokens / model.layers.* / model.norm / lm_head   Qwen3 causal LM   -> ar/
    model.diffusion_connector.{0,2,3}.*   Linear -> GELU(tanh) -> Linear -> RMSNorm -> connector/
    model.sana.*                          SanaTransformer2DModel                   -> sana/transformer/
    model.sana_vae.*                      AutoencoderDC (DC-AE)                    -> sana/vae/
    model.vision_tower.vision_tower.*     TA-Tok image tokenizer (source images)   -> image_tokenizer/ (with ta_tok)

BLIP3o-NEXT has no other parts (no LLaVA `mm_projector` / `vision_resampler`: it feeds TA-Tok's
discrete codes through `embed_tokens`, blip3o_arch.py lines 155-165), so any other tensor is refused.
The two layouts on the hub differ by the vision tower: SFT and Pretrain (~5B on the hub) carry it
(their training loads TA-Tok: blip3o/train/train.py line 164, blip3o_arch.py line 91); the GRPO checkpoints (~4B) do not (the
sizes are the hub's; upstream's code does not say how the tower was left out). Both convert the same
way; a checkpoint without SANA or DC-AE weights takes them from the SANA repo.

The TA-Tok tower (`policy.image_tokenizer`) is written only with `ta_tok=` (`--ta-tok`): TA-Tok's own
checkpoint csuhan/TA-Tok `ta_tok.pth`, which upstream always loads to build the tower
(`TextAlignedTokenizer.from_checkpoint`, tok/ta_tok.py), holds its constructor arguments (codebook
lookup mode, input size, layer) that no BLIP3o-NEXT file records. The tower's tensors then come from the
checkpoint when it carries them (checked name for name and shape for shape against ta_tok.pth's) and
from ta_tok.pth otherwise (the GRPO checkpoints), as upstream's loading would give. Without `ta_tok`
the tower is dropped, as text-to-image needs no image tokenizer.

What a real checkpoint needs beyond its tensors:
- SANA's configs and the scheduler config are not in the checkpoint: BLIP3o-NEXT builds SANA from
  `config.diffusion_name_or_path` (a SANA diffusers repo) and loads the checkpoint's weights over it.
  Its public training scripts pass the literal string `DIFFUSION` there (scripts/run.sh and
  scripts/sft.sh line 34: the shell variable is never expanded), so that value is often unusable: then
  `sana=` (`--sana`) is required and its absence is a one-line error naming the repo to pass. The
  checkpoint's own SANA weights win when present (their training leaves SANA's `caption_projection`
  trainable, blip3o/train/train.py lines 207-214, so they may differ from the repo's).
- The tokenizer may hold more entries than the embedding has rows: upstream's SFT data code adds
  `<image>` to the tokenizer after the embedding was resized (blip3o/data/dataset.py lines 84-87).
  Only the ids the policy emits (the image-token block) and the ids of the rollout prompt, its markers
  and its padding must have rows.
- The token ids BLIP3o-NEXT wrote into config.json (`initialize_vision_tokenizer`, blip3o_arch.py lines
  356-383) must be the tokenizer's: its code reads them (image_start_tag_id to find the image,
  blip3o_qwen_grpo.py line 186; image_start_token_id / scale_start_token_id, blip3o_arch.py 162, 284).
- Sampling defaults: upstream's GRPO rollout calls `generate(do_sample=True, temperature=1.0)`
  (blip3o_qwen_grpo.py lines 168-174, called from trl/trl/trainer/grpo_trainer.py line 1655), so
  top-k / top-p come from the checkpoint's generation_config.json, or transformers' defaults without
  one. They go into our layout file (`ModelLayout.sampling`), never into ar/generation_config.json,
  which vLLM would apply on its own.

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
from policy.image_tokenizer import (
    TA_TOK_FILE,
    TA_TOK_HUB_ID,
    WEIGHTS_STEM,
    TATokCheckpoint,
    TATokSpec,
    encode_shape_problems,
    read_ta_tok,
    vision_config,
    write_ta_tok_configs,
)
from policy.model_dir import (
    CheckpointNotFoundError,
    ModelLayout,
    ModelPaths,
    SamplingDefaults,
    looks_like_hub_id,
    resolve_checkpoint,
)
from policy.prompt import rollout_prompt_ids
from policy.vocab import IM_END, IM_START, SCALE_TOKENS, ImageVocab, image_token

CONNECTOR_PREFIX = "model.diffusion_connector."
SANA_PREFIX = "model.sana."
VAE_PREFIX = "model.sana_vae."
TOWER_PREFIX = "model.vision_tower.vision_tower."
"""TATokVisionTower keeps TextAlignedTokenizer as `.vision_tower` (ta_tok_encoder.py line 41)."""
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
# generation_config.json is deliberately not copied: vLLM would apply its sampling defaults
# (Qwen3 ships top_k=20, top_p=0.95) behind our back. Its values go into ModelLayout.sampling.
DEFAULT_SHARD_BYTES = 2 * 1024**3
TOKENS_PER_IMAGE = 729
"""27 x 27 image tokens at scale <S0> (BLIP3o-NEXT's inference: seq_len 729)."""
SANA_HUB_ID = "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers"
"""The SANA repo BLIP3o-NEXT is trained on (upstream scripts/run.sh and scripts/sft.sh, line 15)."""
HUB_IDS = ("BLIP3o/BLIP3o-NEXT-SFT-3B", "BLIP3o/BLIP3o-NEXT-GRPO-Geneval-3B",
           "BLIP3o/BLIP3o-NEXT-GRPO-TexT-3B", "BLIP3o/BLIP3o-NEXT-Pretrain-3B")
"""The published checkpoints, spelled as on the hub (note `TexT`)."""
HF_SAMPLING_DEFAULTS = {"top_k": 50, "top_p": 1.0, "temperature": 1.0}
"""What transformers' `generate()` samples with where the model's generation config sets nothing:
`GenerationConfig.__init__` defaults in 4.5x (upstream pins 4.51.3 / 4.54.1), filled in from
`GenerationConfig._get_default_generation_params()` in 5.x (tests check the installed version)."""
PROBE_CAPTION = "a red bus next to a green bench"
"""Caption of the rollout prompt rendered to check that every prompt id has an embedding row."""


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

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name`; only those rows are read."""
        with safe_open(str(self.directory / self.files[name]), framework="pt") as handle:
            return handle.get_slice(name)[start:stop]

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
    parts = {"ar": set(), "connector": set(), "sana": set(), "vae": set(), "tower": set(), "dropped": set()}
    for name in names:
        if name.startswith(CONNECTOR_PREFIX):
            parts["connector"].add(name)
        elif name.startswith(VAE_PREFIX):
            parts["vae"].add(name)
        elif name.startswith(SANA_PREFIX):
            parts["sana"].add(name)
        elif name.startswith(TOWER_PREFIX):
            parts["tower"].add(name)
        else:
            parts["ar"].add(name)  # checked against Qwen3ForCausalLM's names: strays are reported there
    return parts


def _strip(parts: set[str], prefix: str, shapes: dict) -> dict[str, tuple[int, ...]]:
    return {name[len(prefix):]: shapes[name] for name in parts}


def _check_tokenizer(root: Path, tokens_per_image: int, vocab_rows: int, hub_config: dict, log) -> ImageVocab:
    from transformers import AutoTokenizer

    if not (root / "tokenizer_config.json").is_file():
        raise ConversionError("the checkpoint has no tokenizer (tokenizer_config.json is missing)")
    tokenizer = AutoTokenizer.from_pretrained(root)
    try:
        vocab = ImageVocab.from_tokenizer(tokenizer, tokens_per_image)
    except ValueError as error:
        raise ConversionError(f"tokenizer in {root}: {error}") from None
    if not tokenizer.chat_template:
        raise ConversionError(f"tokenizer in {root} has no chat template (rollout prompts need one)")
    table = tokenizer.get_vocab()
    check_config_token_ids(hub_config, table, vocab)
    unused = check_ids_fit(tokenizer, table, vocab, vocab_rows)
    if unused:
        log(f"[convert] tokenizer: {len(unused)} {'entry' if len(unused) == 1 else 'entries'} past the embedding's "
            f"{vocab_rows} rows, never emitted nor in the prompt, kept: {_listing(unused, 4)}")
    return vocab


def config_token_fields(hub_config: dict, vocab: ImageVocab) -> dict[str, str]:
    """config.json field -> the token whose id it holds. BLIP3o-NEXT writes these when it extends
    the vocabulary (`initialize_vision_tokenizer`, blip3o_arch.py lines 356-383). `image_token_index`
    is not one of BLIP3o-NEXT's (it marks images with the constant -200, blip3o/constants.py line 3)
    but LLaVA-lineage configs store `<image>`'s id there; it is checked when it is an id (>= 0)."""
    scales = hub_config.get("num_scale_tokens") or len(SCALE_TOKENS)
    fields = {
        "image_start_tag_id": IM_START,
        "image_end_tag_id": IM_END,
        "scale_start_token_id": "<S0>",
        "scale_end_token_id": f"<S{scales - 1}>",
        "image_start_token_id": image_token(0),
        "image_end_token_id": image_token(vocab.codebook_size - 1),
    }
    if isinstance(hub_config.get("image_token_index"), int) and hub_config["image_token_index"] >= 0:
        fields["image_token_index"] = "<image>"
    return {name: token for name, token in fields.items() if hub_config.get(name) is not None}


def check_config_token_ids(hub_config: dict, table: dict[str, int], vocab: ImageVocab) -> None:
    """The ids and counts the checkpoint was trained with (its config) must be the tokenizer's."""
    problems = []
    for name, token in config_token_fields(hub_config, vocab).items():
        if token not in table:
            problems.append(f"{name} is {hub_config[name]} but the tokenizer has no {token}")
        elif hub_config[name] != table[token]:
            problems.append(f"{name} is {hub_config[name]} but the tokenizer has {token} at id {table[token]}")
    counts = {"num_image_tokens": (vocab.codebook_size, "image tokens <I0>, <I1>, ..."),
              "num_scale_tokens": (_count(table, "<S{}>"), "scale tokens <S0>, <S1>, ...")}
    for name, (found, what) in counts.items():
        if hub_config.get(name) is not None and hub_config[name] != found:
            problems.append(f"{name} is {hub_config[name]} but the tokenizer has {found} {what}")
    if problems:
        raise ConversionError("config.json and the tokenizer disagree (the config holds the ids the checkpoint was "
                              "trained with): " + "; ".join(problems))


def _count(table: dict[str, int], pattern: str) -> int:
    """How many of pattern.format(0), pattern.format(1), ... the tokenizer has, in a row."""
    n = 0
    while pattern.format(n) in table:
        n += 1
    return n


def check_ids_fit(tokenizer, table: dict[str, int], vocab: ImageVocab, rows: int) -> list[str]:
    """Every id the policy emits (the image-token block: vLLM's `allowed_token_ids`) or feeds (the
    rollout prompt, the image markers, the padding) needs an embedding row; other tokenizer entries
    may lie beyond the rows. Returns those, sorted by id."""
    beyond = []
    if vocab.image_token_end > rows:
        first = max(vocab.image_token_start, rows)
        beyond.append(f"image tokens {image_token(first - vocab.image_token_start)}.."
                      f"{image_token(vocab.codebook_size - 1)} (ids {first}..{vocab.image_token_end - 1})")
    markers = zip((IM_START, IM_END, *SCALE_TOKENS), (vocab.im_start_id, vocab.im_end_id, *vocab.scale_ids))
    used = {token_id: token for token, token_id in markers}  # id -> what uses it
    if tokenizer.pad_token_id is not None:
        used.setdefault(tokenizer.pad_token_id, f"{tokenizer.pad_token} (padding)")
    for token_id in rollout_prompt_ids(tokenizer, PROBE_CAPTION):
        used.setdefault(token_id, f"{tokenizer.convert_ids_to_tokens(token_id)} (in the rollout prompt)")
    beyond += [f"{token} id {token_id}" for token_id, token in sorted(used.items()) if token_id >= rows]
    if beyond:
        raise ConversionError(f"the embedding has {rows} rows but the policy emits or its prompt uses ids beyond them: "
                              f"{', '.join(beyond)}")
    return [token for token, token_id in sorted(table.items(), key=lambda kv: kv[1]) if token_id >= rows]


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


def open_sana(sana: str | None, hub_config: dict, *, local_files_only: bool | None, log) -> tuple[SanaRepo, str]:
    """The SANA diffusers repo and its spec: `sana` when given, else the checkpoint's
    diffusion_name_or_path. When that is unusable (the public scripts' literal `DIFFUSION`, a path on
    the authors' cluster, a hub id that cannot be fetched here) the error asks for `--sana`."""
    named = hub_config.get("diffusion_name_or_path")
    if sana:
        if named != sana:
            log(f"[convert] SANA repo from --sana {sana} (the checkpoint's diffusion_name_or_path is {named!r})")
        return SanaRepo.open(resolve_checkpoint(sana, local_files_only=local_files_only)), sana
    ask = f"pass --sana {SANA_HUB_ID} (the hub id, or a local copy of that repo)"
    if not isinstance(named, str) or not named:
        raise ConversionError(f"the checkpoint's config.json names no SANA repo (diffusion_name_or_path is {named!r}): {ask}")
    try:
        root = resolve_checkpoint(named, local_files_only=local_files_only)
    except CheckpointNotFoundError:
        raise ConversionError(f"the checkpoint's diffusion_name_or_path {named!r} is neither a local directory nor a hub "
                              f"id that can be fetched here: {ask}") from None
    try:
        return SanaRepo.open(root), named
    except ConversionError as error:
        raise ConversionError(f"the checkpoint's diffusion_name_or_path {named!r} is not a SANA diffusers repo "
                              f"({error}): {ask}") from None


def hub_sampling(root: Path, source: str) -> SamplingDefaults:
    """top-k / top-p / temperature as upstream's `model.generate(do_sample=True)` would take them from
    the checkpoint: its generation_config.json, each field it leaves out at transformers' default, or
    all defaults without the file. A field set to null turns that processor off, as in 4.5x."""
    path = root / "generation_config.json"
    if not path.is_file():
        return SamplingDefaults(**HF_SAMPLING_DEFAULTS, source=(
            f"no generation_config.json in {source}: transformers' generate() defaults, "
            "which upstream's generate(do_sample=True) then samples with"))
    raw = json.loads(path.read_text())
    off = {"top_k": 0, "top_p": 1.0, "temperature": 1.0}
    values = {name: (raw[name] if raw[name] is not None else off[name]) if name in raw else default
              for name, default in HF_SAMPLING_DEFAULTS.items()}
    valid = {"top_k": lambda v: isinstance(v, int) and v >= 0, "top_p": lambda v: isinstance(v, (int, float)) and 0 < v <= 1,
             "temperature": lambda v: isinstance(v, (int, float)) and v > 0}
    bad = [f"{name} {values[name]!r}" for name, ok in valid.items() if not ok(values[name])]
    if bad:
        raise ConversionError(f"{path}: invalid sampling values: {', '.join(bad)}")
    return SamplingDefaults(top_k=values["top_k"], top_p=float(values["top_p"]), temperature=float(values["temperature"]),
                            source=f"generation_config.json of {source}")


def lm_head_differs(checkpoint: SafetensorsCheckpoint, shapes: dict, rows_per_read: int = 8192) -> str | None:
    """How a stored lm_head.weight differs from model.embed_tokens.weight (None: it does not),
    compared a block of rows at a time so a 3B checkpoint's two matrices are never both in memory."""
    head, embed = shapes["lm_head.weight"], shapes["model.embed_tokens.weight"]
    if head != embed:
        return f"shape {head} vs {embed}"
    differs, worst = False, 0.0
    for start in range(0, embed[0], rows_per_read):
        stop = min(start + rows_per_read, embed[0])
        a = checkpoint.rows("lm_head.weight", start, stop)  # [rows, hidden]
        b = checkpoint.rows("model.embed_tokens.weight", start, stop)  # [rows, hidden]
        if not torch.equal(a, b):
            differs, worst = True, max(worst, (a.float() - b.float()).abs().max().item())
    return f"max |difference| {worst:.3g}" if differs else None


def convert_blip3o_next(
    source: str,
    out_dir: Path,
    sana: str | None = None,
    *,
    tokens_per_image: int = TOKENS_PER_IMAGE,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    local_files_only: bool | None = None,
    ta_tok: str | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> ModelPaths:
    """Write the blip3o-rl model directory `out_dir` from BLIP3o-NEXT checkpoint `source` (a local
    dir or hub id) and SANA diffusers repo `sana` (default: the checkpoint's diffusion_name_or_path);
    with `ta_tok` (a ta_tok.pth, its directory or the hub id csuhan/TA-Tok) also the image tokenizer."""
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
        raise ConversionError(f"checkpoint {source} has no model.embed_tokens.weight: not a BLIP3o-NEXT checkpoint "
                              f"(those are {', '.join(HUB_IDS)})")
    vocab_rows, hidden = shapes["model.embed_tokens.weight"]
    config = qwen3_config(hub_config, vocab_rows)
    if config.tie_word_embeddings and "lm_head.weight" in parts["ar"]:
        # Tied: upstream's loader (transformers 4.5x re-ties after loading) and vLLM (skips a tied
        # lm_head.weight) both use the embedding as the output layer. transformers 5.x would instead
        # keep two different matrices, so the stored one is dropped and learner and vLLM agree.
        difference = lm_head_differs(checkpoint, shapes)
        if difference:
            log(f"[convert] warning: config.json ties the embeddings but the stored lm_head.weight differs from "
                f"model.embed_tokens.weight ({difference}); keeping the embedding as the output layer, as upstream's "
                "transformers (re-ties after loading) and vLLM (skips a tied lm_head.weight) do")
        parts["dropped"].add("lm_head.weight")
        parts["ar"].discard("lm_head.weight")
    _check_shapes("AR model (Qwen3ForCausalLM; BLIP3o-NEXT's other parts are model.diffusion_connector, model.sana, "
                  "model.sana_vae, model.vision_tower)", expected_ar_shapes(config), {n: shapes[n] for n in parts["ar"]})

    out_dim = _check_connector(parts["connector"], shapes, hidden, source)
    tower = open_tower(ta_tok, parts, shapes, local_files_only=local_files_only, log=log)
    repo, sana_spec = open_sana(sana, hub_config, local_files_only=local_files_only, log=log)
    log(f"[convert] SANA configs from {sana_spec} -> {repo.root}")
    sources = _sana_sources(parts, shapes, repo, sana_spec)
    if repo.transformer_config["caption_channels"] != out_dim:
        raise ConversionError(f"connector outputs {out_dim} channels but SANA expects caption_channels {repo.transformer_config['caption_channels']}")
    if repo.transformer_config["in_channels"] != repo.vae_config["latent_channels"]:
        raise ConversionError("SANA transformer in_channels and DC-AE latent_channels differ")
    log(f"[convert] AR: {len(parts['ar'])} tensors, vocab {vocab_rows}; dropping {len(parts['dropped'])} tensors "
        f"({_listing(parts['dropped'], 3) or 'none'}); SANA transformer from {sources['transformer']}, "
        f"DC-AE from {sources['vae']}")
    sampling = hub_sampling(root, source)
    log(f"[convert] sampling defaults: top_k {sampling.top_k}, top_p {sampling.top_p}, temperature "
        f"{sampling.temperature} ({sampling.source})")
    if sampling.temperature != 1.0:
        log(f"[convert] note: recorded temperature {sampling.temperature} as the generation config gives it; upstream's "
            "GRPO rollouts pass temperature=1.0 instead (blip3o_qwen_grpo.py line 172), its inference takes this one")

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
        vocab = _check_tokenizer(paths.ar, tokens_per_image, vocab_rows, hub_config, log)
        log(f"[convert] tokenizer: {vocab.codebook_size} image tokens from id {vocab.image_token_start}")
        if tower is not None:
            check_tower_fits(tower, vocab)
        _write_weights(checkpoint, parts, repo, sources, paths, max_shard_bytes, log, tower)
        ModelLayout(tokens_per_image=tokens_per_image, image_size=repo.image_size(), decoder="sana",
                    sampling=sampling).save(staging)
        provenance = {"source": source, "sana": sana_spec, "sana_transformer_from": sources["transformer"],
                      "sana_vae_from": sources["vae"], "dropped": sorted(parts["dropped"]),
                      "image_tokenizer_from": None if tower is None else "checkpoint" if parts["tower"] else ta_tok}
        (staging / "converted_from.json").write_text(json.dumps(provenance, indent=2))
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"[convert] done: {out_dir} (image size {repo.image_size()}, {tokens_per_image} tokens per image)")
    return ModelPaths(out_dir)


def _write_weights(checkpoint, parts, repo: SanaRepo, sources, paths: ModelPaths, max_shard_bytes, log,
                   tower: TATokCheckpoint | None) -> None:
    """Stream every checkpoint tensor to its part (and the SANA repo's or ta_tok.pth's weights where needed)."""
    writers = {
        "ar": ShardedWriter(paths.ar, "model", max_shard_bytes, log),
        "sana": ShardedWriter(paths.sana_transformer, "diffusion_pytorch_model", max_shard_bytes, log),
        "vae": ShardedWriter(paths.sana_vae, "diffusion_pytorch_model", max_shard_bytes, log),
    }
    if tower is not None:
        write_ta_tok_configs(paths.image_tokenizer, tower.args, tower.encoder_config)
        writers["image_tokenizer"] = ShardedWriter(paths.image_tokenizer, WEIGHTS_STEM, max_shard_bytes, log)
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
        elif name in parts["tower"]:
            writers["image_tokenizer"].add(name[len(TOWER_PREFIX):], tensor)
        if done % 200 == 0 or done == total:
            log(f"[convert] read {done}/{total} checkpoint tensors")
    for part, subdir in (("sana", "transformer"), ("vae", "vae")):
        if sources[subdir] != "checkpoint":
            log(f"[convert] copying SANA {subdir} weights from {sources[subdir]}")
            for name, tensor in repo.weights(subdir).tensors():
                writers[part].add(name, tensor)
        shutil.copy2(repo.root / subdir / "config.json", (paths.sana_transformer if part == "sana" else paths.sana_vae) / "config.json")
    if tower is not None and not parts["tower"]:
        log(f"[convert] image tokenizer weights from {TA_TOK_FILE} (the checkpoint has no TA-Tok tower)")
        for name, tensor in sorted(tower.state.items()):
            writers["image_tokenizer"].add(name, tensor)
    for part, writer in writers.items():
        log(f"[convert] {part}: {writer.close()} tensors, {writer.total_bytes / 1e9:.2f} GB")
    hidden, out_dim = connector["layers.0.weight"].shape[1], connector["layers.0.weight"].shape[0]
    module = Connector(hidden, out_dim).to(connector["layers.0.weight"].dtype)
    module.load_state_dict(connector, strict=True)
    module.save(paths.connector)
    paths.sana_scheduler.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo.root / "scheduler" / "scheduler_config.json", paths.sana_scheduler / "scheduler_config.json")


def ta_tok_file(spec: str, *, local_files_only: bool | None) -> Path:
    """TA-Tok's checkpoint file: `spec` itself, `spec`/ta_tok.pth, or ta_tok.pth of hub repo `spec`."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if (path / TA_TOK_FILE).is_file():
        return path / TA_TOK_FILE
    if not looks_like_hub_id(spec):
        raise ConversionError(f"TA-Tok checkpoint {spec!r}: no such file, nor a directory holding {TA_TOK_FILE}")
    from huggingface_hub import hf_hub_download

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(hf_hub_download(spec, TA_TOK_FILE, local_files_only=local_files_only))
    except Exception as error:  # the hub client raises many kinds; all mean "not available here"
        raise ConversionError(f"TA-Tok checkpoint {spec!r}: {TA_TOK_FILE} could not be found or fetched "
                              f"({type(error).__name__}); pass a local {TA_TOK_FILE} (from {TA_TOK_HUB_ID})") from None


def open_tower(ta_tok: str | None, parts: dict, shapes: dict, *, local_files_only: bool | None, log) -> TATokCheckpoint | None:
    """TA-Tok's arguments and weights when the image tokenizer is kept (checked against the checkpoint's
    tower when it has one); without `ta_tok` the tower's tensors join the dropped ones."""
    if ta_tok is None:
        if parts["tower"]:
            log(f"[convert] TA-Tok tower ({len(parts['tower'])} tensors) dropped: pass --ta-tok {TA_TOK_HUB_ID} (or a "
                f"local {TA_TOK_FILE}) to keep it as the image tokenizer that source images of edit prompts need")
        parts["dropped"] |= parts["tower"]
        parts["tower"] = set()
        return None
    try:
        tower = read_ta_tok(ta_tok_file(ta_tok, local_files_only=local_files_only))
        reference = {name: tuple(t.shape) for name, t in tower.state.items()}
        problems = encode_shape_problems(tower.args, tower.encoder_config, reference)
    except ValueError as error:
        raise ConversionError(f"TA-Tok checkpoint {ta_tok!r}: {error}") from None
    if problems:
        raise ConversionError(f"TA-Tok checkpoint {ta_tok!r}: its weights do not fit its args: {_listing(problems, 4)}")
    if parts["tower"]:
        _check_shapes(f"TA-Tok tower in the checkpoint ({TOWER_PREFIX}*) vs {ta_tok}", reference,
                      _strip(parts["tower"], TOWER_PREFIX, shapes))
    log(f"[convert] image tokenizer: TA-Tok args from {ta_tok}, weights from "
        f"{'the checkpoint' if parts['tower'] else ta_tok}")
    return tower


def check_tower_fits(tower: TATokCheckpoint, vocab: ImageVocab) -> None:
    """TA-Tok's ids must be the model's: as many per image, from a codebook as large as the image-token block."""
    from transformers import SiglipVisionConfig

    spec = TATokSpec.from_args(tower.args)
    per_image = (spec.input_size // SiglipVisionConfig(**vision_config(tower.encoder_config)).patch_size) ** 2
    if spec.vq.codebook_size != vocab.codebook_size or per_image != vocab.tokens_per_image:
        raise ConversionError(f"TA-Tok gives {per_image} ids per image from {spec.vq.codebook_size} codes but the model "
                              f"has {vocab.tokens_per_image} image tokens per image from {vocab.codebook_size}")
