"""The on-disk layout of a blip3o-rl model directory, and resolving where one is.

    DIR/
      blip3o_rl_model.json   ModelLayout: tokens per image, image size, decoder kind
      ar/                    Qwen3ForCausalLM + tokenizer (what vLLM serves and the learner trains)
      connector/             connector.safetensors + connector.json (frozen)
      sana/transformer/      SanaTransformer2DModel (diffusers, frozen)
      sana/vae/              AutoencoderDC (frozen)
      sana/scheduler/        FlowMatchEulerDiscreteScheduler config
      image_tokenizer/       TA-Tok, source image -> image-token ids (optional: edit prompts need it)

A spec is a local path or a hub id. Offline, a hub id that is not in the local cache fails with
`CheckpointNotFoundError`, whose message says what was looked for and how to provide it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAYOUT_FILE = "blip3o_rl_model.json"


class CheckpointNotFoundError(RuntimeError):
    """A model checkpoint could not be found; the message is meant for the user, not a traceback."""


@dataclass(frozen=True)
class SamplingDefaults:
    """How the model's authors sample image tokens (the hub's `generation_config.json`).

    Kept in our layout file rather than as `ar/generation_config.json`, so vLLM never applies it
    behind our back: the rollout config takes these values unless it names its own.
    """

    top_k: int = 0
    """Keep the k most likely image tokens; 0 = off."""
    top_p: float = 1.0
    """Nucleus mass; 1.0 = off."""
    temperature: float = 1.0
    source: str = ""
    """Where the values came from (e.g. "generation_config.json of BLIP3o/BLIP3o-NEXT-SFT-3B")."""


@dataclass(frozen=True)
class ModelLayout:
    tokens_per_image: int
    image_size: int
    decoder: str
    tiny_spec: dict = field(default_factory=dict)
    format_version: int = 1
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    """Sampling defaults of the model (no truncation unless a converter recorded some)."""

    def save(self, directory: Path) -> None:
        (Path(directory) / LAYOUT_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> "ModelLayout":
        raw = json.loads((Path(directory) / LAYOUT_FILE).read_text())
        raw["sampling"] = SamplingDefaults(**raw.get("sampling", {}))
        return cls(**raw)


@dataclass(frozen=True)
class ModelPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def in_directory(cls, directory: Path) -> "ModelPaths":
        return cls(Path(directory))

    @property
    def ar(self) -> Path:
        return self.root / "ar"

    @property
    def connector(self) -> Path:
        return self.root / "connector"

    @property
    def sana_transformer(self) -> Path:
        return self.root / "sana" / "transformer"

    @property
    def sana_vae(self) -> Path:
        return self.root / "sana" / "vae"

    @property
    def sana_scheduler(self) -> Path:
        return self.root / "sana" / "scheduler"

    @property
    def image_tokenizer(self) -> Path:
        return self.root / "image_tokenizer"

    def layout(self) -> ModelLayout:
        return ModelLayout.load(self.root)


def looks_like_hub_id(spec: str) -> bool:
    """`org/name` and not a path: what the hub resolver is asked for."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_checkpoint(spec: str, *, local_files_only: bool | None = None) -> Path:
    """A local directory for `spec` (a path, or a hub id found in / fetched to the HF cache).

    `local_files_only` defaults to HF_HUB_OFFLINE; with it, nothing is downloaded.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not looks_like_hub_id(spec):
        raise CheckpointNotFoundError(
            f"model checkpoint '{spec}' not found: no such directory. Give a local model directory "
            "(e.g. one written by `blip3o-rl make-tiny DIR`) or a hub id such as BLIP3o/BLIP3o-NEXT-SFT-3B."
        )
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, local_files_only=local_files_only))
    except Exception as error:  # the hub client raises many kinds; all mean "not available here"
        where = os.environ.get("HF_HOME", "~/.cache/huggingface")
        how = "it is not in the local cache and downloads are off (HF_HUB_OFFLINE)" if local_files_only else (
            f"downloading it failed ({type(error).__name__})"
        )
        raise CheckpointNotFoundError(
            f"model checkpoint '{spec}' not found: {how}. Looked in the Hugging Face cache at {where}. "
            f"Download it on a machine with internet (`huggingface-cli download {spec}`) and copy the "
            "cache, or pass a local directory instead."
        ) from None


def resolve_model_dir(spec: str, *, local_files_only: bool | None = None) -> ModelPaths:
    """Resolve `spec` to a blip3o-rl model directory (one with blip3o_rl_model.json)."""
    root = resolve_checkpoint(spec, local_files_only=local_files_only)
    if not (root / LAYOUT_FILE).is_file():
        raise CheckpointNotFoundError(
            f"'{spec}' ({root}) is not a blip3o-rl model directory: {LAYOUT_FILE} is missing. "
            "Write one with `blip3o-rl make-tiny DIR`, or convert a BLIP3o-NEXT checkpoint first with "
            "`blip3o-rl convert-blip3o-next BLIP3o/BLIP3o-NEXT-SFT-3B DIR`."
        )
    return ModelPaths(root)
