"""CLIP-family model rewards as generic scorers (rewards/scorer.py): CLIPScore and PickScore.

Both embed the image and the prompt with a transformers `CLIPModel`, normalise the two embeddings
and take their cosine; they differ in the model and in what they make of the cosine.

CLIPScore (Hessel et al. 2021, https://arxiv.org/abs/2104.08718; `get_clip_score` of
github.com/jmhessel/clipscore):

    reward = w * max(cos(E_I(image), E_T("A photo depicts " + prompt)), 0),   w = 2.5

  We return this, the paper's number (in [0, 2.5], ~0.75 for a good match), not torchmetrics' 0-100
  variant (100 * max(cos, 0), no prefix): it is the definition we cite, and it is O(1) like our other
  rewards (OCR and GenEval in [0, 1]). The 0-100 value is 40x ours; `details.cosine` has the raw cosine.
  Deviation: Hessel et al. use OpenAI's ViT-B/32; our default is openai/clip-vit-large-patch14 (the
  CLIP GenEval already loads, and torchmetrics' default). `model`, `w` and `prefix` are settings.

PickScore (Kirstain et al. 2023, https://arxiv.org/abs/2305.01569; "Inference with PickScore" in the
README of github.com/yuvalkirstain/PickScore):

    reward = exp(logit_scale) * cos(E_I(image), E_T(prompt))     (text truncated to 77 tokens)

  with yuvalkirstain/PickScore_v1 (CLIP ViT-H/14 fine-tuned on Pick-a-Pic) and the processor of
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K. Raw, as the authors' code computes it before its softmax
  (~20 for a good image). Flow-GRPO divides by 26; we do not: the run config's group normalisation
  takes care of scale, and raw numbers compare with the paper's.

Models load once, on a configured device and dtype; a batch is embedded in chunks of `max_batch`
images and each distinct prompt once (a GRPO batch repeats every prompt G times). `version` is the
model (and processor) id with its hub commit, or a hash of a local directory's files, so a change of
reward model is visible in every answer and in /readyz.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from policy.model_dir import CheckpointNotFoundError, looks_like_hub_id
from rewards.errors import RewardInputError
from rewards.ocr import check_image
from rewards.scorer import ScoreResult

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HESSEL_W = 2.5
"""CLIPScore's w (Hessel et al. 2021): stretches the cosines CLIP gives (~0-0.4) towards [0, 1]."""
HESSEL_PREFIX = "A photo depicts "
"""CLIPScore's text prefix (jmhessel/clipscore `CLIPCapDataset`); the paper found it helps a little."""
MAX_TEXT_TOKENS = 77
"""CLIP's text context; PickScore's code truncates to it, and longer prompts would not fit the model."""


class ClipModelConfig(BaseModel):
    """Which CLIP checkpoint a scorer loads, and where it runs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())

    model: str
    """CLIPModel checkpoint: hub id or local directory."""
    processor: str | None = None
    """Image processor + tokenizer: hub id or local directory (none = the model's own)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `model`; none = main. Ignored for a local directory."""
    processor_revision: str | None = None
    """Hub revision of `processor`; none = main."""
    device: str = "cpu"
    """Torch device ("cpu", "cuda", "cuda:1")."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations (float32 on CPU, bfloat16 on GPU); cosines are taken in float32."""
    max_batch: int = Field(32, ge=1)
    """Most images per forward pass (bounds activation memory; the server batches requests up to its batch_size)."""


class ClipScoreConfig(ClipModelConfig):
    """CLIPScore (Hessel et al. 2021): w * max(cos, 0)."""

    model: str = "openai/clip-vit-large-patch14"
    """CLIPModel checkpoint (Hessel et al. used ViT-B/32: openai/clip-vit-base-patch32)."""
    w: float = Field(HESSEL_W, gt=0)
    """Scale of the clipped cosine (2.5 in the paper)."""
    prefix: str = HESSEL_PREFIX
    """Put before every prompt ("" for torchmetrics' variant)."""


class PickScoreConfig(ClipModelConfig):
    """PickScore (Kirstain et al. 2023): exp(logit_scale) * cos."""

    model: str = "yuvalkirstain/PickScore_v1"
    """PickScore checkpoint (CLIP ViT-H/14 fine-tune)."""
    processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """The processor PickScore's authors use (PickScore_v1 is a fine-tune of this CLIP-H)."""


def clip_score(cosine: torch.Tensor, w: float = HESSEL_W) -> torch.Tensor:
    """CLIPScore = w * max(cos, 0): a mismatch scores 0, never below. [N] -> [N]"""
    return w * cosine.clamp(min=0)


def pick_score(cosine: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """PickScore = exp(logit_scale) * cos, the logits of CLIP's contrastive head. [N] -> [N]"""
    return logit_scale.exp().float() * cosine


# ---- loading: one line per missing checkpoint, and a version that changes with the model ----


def hf_offline() -> bool:
    """Downloads are off (HF_HUB_OFFLINE), so a missing checkpoint is a cache miss, not a network error."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def from_pretrained(loader: Any, spec: str, revision: str | None, setting: str, **kwargs) -> Any:
    """`loader.from_pretrained(spec)`; a missing checkpoint is a `CheckpointNotFoundError` in one line
    naming the setting to change (transformers' own OSError spans several lines)."""
    if not Path(spec).expanduser().is_dir() and not looks_like_hub_id(spec):
        raise CheckpointNotFoundError(
            f"{setting} '{spec}' not found: no such directory and not a hub id. "
            f"Set {setting_env_name(setting)} to a local directory or a hub id."
        )
    try:
        return loader.from_pretrained(spec, revision=revision, **kwargs)
    except OSError as error:
        if hf_offline():
            how = "it is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE)"
        else:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            how = f"loading it failed ({first})"
        raise CheckpointNotFoundError(
            f"{setting} '{spec}' not found: {how}. Download it on a machine with internet "
            f"(`hf download {spec}`) and copy the cache, or set {setting_env_name(setting)} to a local directory."
        ) from None


def setting_env_name(setting: str) -> str:
    """"pickscore.model" -> "BLIP3O_RL_REWARDS_PICKSCORE__MODEL" (the server's env variable)."""
    return "BLIP3O_RL_REWARDS_" + setting.upper().replace(".", "__")


def directory_fingerprint(directory: Path, weights: bool = True) -> str:
    """12 hex digits of a hash of the names and bytes of the files transformers reads from a local
    checkpoint: configs and tokenizer files (*.json, *.txt) and, with `weights`, the weights
    (model*.safetensors, else pytorch_model*.bin; not e.g. open_clip's copies a hub folder may also
    hold). A retrained or swapped checkpoint gets a new one; costs one more read of the weights at
    startup (a few seconds for ViT-H)."""
    files = [p for p in directory.iterdir() if p.is_file() and p.suffix in (".json", ".txt")]
    if weights:
        files += list(directory.glob("model*.safetensors")) or list(directory.glob("pytorch_model*.bin"))
    digest = hashlib.blake2b(digest_size=6)
    for path in sorted(files):
        with path.open("rb") as file:
            digest.update(path.name.encode() + b"\0" + hashlib.file_digest(file, "blake2b").digest())
    return digest.hexdigest()


def checkpoint_version(spec: str, revision: str | None, marker_file: str, weights: bool = True) -> str:
    """"dir#<fingerprint>" for a local directory, "org/name@<commit>" for a hub id (the commit its
    files were loaded from: the cache keeps them under snapshots/<commit>/)."""
    directory = Path(spec).expanduser()
    if directory.is_dir():
        return f"{spec}#{directory_fingerprint(directory, weights)}"
    from transformers.utils import cached_file

    try:
        commit = Path(cached_file(spec, marker_file, revision=revision)).parent.name
    except (OSError, TypeError):  # loaded, so cached: only an unusual cache layout lands here
        commit = revision or "main"
    return f"{spec}@{commit[:12]}"


class ClipEmbedder:
    """A CLIPModel + its image processor and tokenizer: unit-norm embeddings of images and prompts."""

    def __init__(self, model, image_processor, tokenizer, device: str = "cpu", max_batch: int = 32):
        self.model = model.to(device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch = max_batch
        self.max_tokens = min(MAX_TEXT_TOKENS, model.config.text_config.max_position_embeddings)

    @classmethod
    def from_config(cls, config: ClipModelConfig, scorer: str) -> tuple["ClipEmbedder", str]:
        """Load the model and processor of `config`; also returns the version string."""
        from transformers import CLIPModel, CLIPProcessor

        processor_spec = config.processor or config.model
        processor_revision = config.processor_revision if config.processor else config.revision
        model = from_pretrained(CLIPModel, config.model, config.revision, f"{scorer}.model", dtype=DTYPES[config.dtype])
        processor = from_pretrained(CLIPProcessor, processor_spec, processor_revision,
                                    f"{scorer}.processor" if config.processor else f"{scorer}.model")
        version = checkpoint_version(config.model, config.revision, "config.json")
        if config.processor:
            version += " + " + checkpoint_version(processor_spec, processor_revision, "preprocessor_config.json",
                                                  weights=False)
        return cls(model, processor.image_processor, processor.tokenizer, config.device, config.max_batch), version

    @torch.no_grad()
    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        """[N, D] float32, unit norm."""
        chunks = []
        for start in range(0, len(images), self.max_batch):
            pixels = self.image_processor(images=images[start : start + self.max_batch], return_tensors="pt")
            pixels = pixels["pixel_values"].to(self.device, self.model.dtype)  # [n, 3, S, S]
            chunks.append(self.model.get_image_features(pixel_values=pixels).pooler_output.float())  # [n, D]
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """[N, D] float32, unit norm; texts longer than CLIP's 77 tokens are cut."""
        chunks = []
        for start in range(0, len(texts), self.max_batch):
            tokens = self.tokenizer(texts[start : start + self.max_batch], padding=True, truncation=True,
                                    max_length=self.max_tokens, return_tensors="pt").to(self.device)
            chunks.append(self.model.get_text_features(**tokens).pooler_output.float())  # [n, D]
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    def checked_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """`images` of uint8 RGB arrays, each checked first (a bad one is a RewardInputError naming it)."""
        for index, image in enumerate(images):
            try:
                check_image(image)
            except RewardInputError as error:
                raise error.at(index) from None
        return self.images(images) if images else torch.zeros(0, self.model.config.projection_dim)

    def cosines(self, images: list[np.ndarray], texts: list[str]) -> torch.Tensor:
        """[N] cosine of image i and text i; each distinct text is embedded once."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} prompts")
        image_embeddings = self.checked_images(images)  # [N, D]
        if not images:
            return torch.zeros(0)
        row_of = {text: row for row, text in enumerate(dict.fromkeys(texts))}
        text_embeddings = self.texts(list(row_of))  # [U, D]
        rows = torch.tensor([row_of[text] for text in texts])  # [N] row of each image's text
        return (image_embeddings * text_embeddings[rows]).sum(-1).cpu()  # [N]


class ClipScorer:
    """CLIPScore as a generic scorer (`POST /v1/rewards/clipscore`)."""

    name = "clipscore"

    def __init__(self, embedder: ClipEmbedder, version: str, w: float = HESSEL_W, prefix: str = HESSEL_PREFIX):
        self.embedder, self.version, self.w, self.prefix = embedder, version, w, prefix

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[ScoreResult]:
        cosine = self.embedder.cosines(images, [self.prefix + prompt for prompt in prompts])  # [N]
        rewards = clip_score(cosine, self.w)  # [N]
        return [ScoreResult(float(r), {"cosine": float(c)}) for r, c in zip(rewards, cosine)]


class PickScorer:
    """PickScore as a generic scorer (`POST /v1/rewards/pickscore`)."""

    name = "pickscore"

    def __init__(self, embedder: ClipEmbedder, version: str):
        self.embedder, self.version = embedder, version

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[ScoreResult]:
        cosine = self.embedder.cosines(images, prompts)  # [N]
        rewards = pick_score(cosine, self.embedder.model.logit_scale.detach().cpu())  # [N]
        return [ScoreResult(float(r), {"cosine": float(c)}) for r, c in zip(rewards, cosine)]


def clipscore_scorer(settings) -> ClipScorer:
    """BUILTIN_SCORERS factory: CLIPScore from `settings.clipscore`."""
    config: ClipScoreConfig = settings.clipscore
    embedder, version = ClipEmbedder.from_config(config, "clipscore")
    return ClipScorer(embedder, version, config.w, config.prefix)


def pickscore_scorer(settings) -> PickScorer:
    """BUILTIN_SCORERS factory: PickScore from `settings.pickscore`."""
    embedder, version = ClipEmbedder.from_config(settings.pickscore, "pickscore")
    return PickScorer(embedder, version)
