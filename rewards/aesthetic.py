"""LAION aesthetic predictor v2 as a generic scorer (`aesthetic`): how much people like an image, on
average, on a 1-10 scale (trained on SAC, LAION-logos and AVA ratings); the prompt is ignored. DDPO's
and Flow-GRPO's aesthetic reward.

    reward = MLP(E_I(image) / |E_I(image)|)      MLP: 768 -> 1024 -> 128 -> 64 -> 16 -> 1

E_I is CLIP ViT-L/14's projected image embedding (openai/clip-vit-large-patch14), unit-normalised as
`simple_inference.py` of github.com/christophschuhmann/improved-aesthetic-predictor does. The MLP is
five Linear layers with dropout between them and no activation (so, at inference, one affine map in
five factors); its weights are `sac+logos+ava1-l14-linearMSE.pth`, on the hub as
trl-lib/ddpo-aesthetic-predictor `aesthetic-model.pth` (a state dict `layers.{0,2,4,6,7}.{weight,bias}`).
Loaded with transformers + torch, nothing else.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from policy.model_dir import CheckpointNotFoundError, looks_like_hub_id
from rewards.clip_score import ClipEmbedder, ClipModelConfig, hf_offline, setting_env_name
from rewards.scorer import ScoreResult


class AestheticConfig(ClipModelConfig):
    """LAION aesthetic predictor v2: CLIP ViT-L/14 + an MLP head."""

    model: str = "openai/clip-vit-large-patch14"
    """CLIPModel checkpoint the head was trained on (ViT-L/14: 768-d embeddings)."""
    head: str = "trl-lib/ddpo-aesthetic-predictor"
    """MLP weights: a .pth file, a directory holding `head_file`, or a hub id."""
    head_file: str = Field("aesthetic-model.pth", min_length=1)
    """File name of the weights inside the directory or hub repo."""
    head_revision: str | None = None
    """Hub revision of `head`; none = main."""


def head_from_state_dict(state: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """The MLP of a `layers.<i>.weight/bias` state dict: its Linear layers in order (the dropouts
    between them, identity at inference, are left out)."""
    indices = sorted({int(key.split(".")[1]) for key in state if key.startswith("layers.") and key.endswith(".weight")})
    if not indices:
        raise ValueError("aesthetic head: no layers.<i>.weight in the state dict")
    linears = []
    for index in indices:
        weight, bias = state[f"layers.{index}.weight"], state[f"layers.{index}.bias"]  # [out, in], [out]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": bias})
        linears.append(linear)
    return torch.nn.Sequential(*linears).eval()


def head_path(config: AestheticConfig) -> tuple[Path, str]:
    """(weights file, version) of the head: "file#<hash>" locally, "org/name@<commit>" from the hub."""
    spec = Path(config.head).expanduser()
    path = spec / config.head_file if spec.is_dir() else spec
    if path.is_file():
        with path.open("rb") as file:
            return path, f"{config.head}#{hashlib.file_digest(file, 'blake2b').hexdigest()[:12]}"
    if not looks_like_hub_id(config.head):
        raise CheckpointNotFoundError(f"aesthetic.head '{config.head}' not found: no such file or directory and not "
                                      f"a hub id. Set {setting_env_name('aesthetic.head')} to the .pth file.")
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(config.head, config.head_file, revision=config.head_revision))
    except Exception:  # the hub client raises many kinds; all mean "not available here"
        how = "it is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE)" if hf_offline() else (
            "downloading it failed")
        raise CheckpointNotFoundError(
            f"aesthetic.head '{config.head}' ({config.head_file}) not found: {how}. Download it on a machine with "
            f"internet (`hf download {config.head} {config.head_file}`) and copy the cache, or set "
            f"{setting_env_name('aesthetic.head')} to the .pth file."
        ) from None
    return path, f"{config.head}@{path.parent.name[:12]}"


class AestheticScorer:
    """The aesthetic predictor as a generic scorer (`POST /v1/rewards/aesthetic`)."""

    name = "aesthetic"

    def __init__(self, embedder: ClipEmbedder, head: torch.nn.Sequential, version: str):
        self.embedder, self.version = embedder, version
        self.head = head.to(embedder.device)
        width = head[0].in_features
        projection = embedder.model.config.projection_dim
        if width != projection:
            raise ValueError(f"aesthetic head takes {width}-d embeddings but the CLIP model gives {projection}-d")

    @torch.no_grad()
    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[ScoreResult]:
        # Unit-norm embeddings as the predictor was trained on; cosines need no text here.
        embeddings = self.embedder.checked_images(images)  # [N, D]
        rewards = self.head(embeddings.to(self.embedder.device))[:, 0].cpu()  # [N]
        return [ScoreResult(float(r)) for r in rewards]


def aesthetic_scorer(settings) -> AestheticScorer:
    """BUILTIN_SCORERS factory: the aesthetic predictor from `settings.aesthetic`."""
    config: AestheticConfig = settings.aesthetic
    embedder, clip_version = ClipEmbedder.from_config(config, "aesthetic")
    path, head_version = head_path(config)
    head = head_from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return AestheticScorer(embedder, head, f"{clip_version} + {head_version}")
