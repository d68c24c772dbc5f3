"""Configuration of a decoder worker (image tokens -> pixels).

Two decoder kinds share one worker: `sana` (BLIP3o-NEXT's real path: AR hidden states -> connector
-> SANA -> DC-AE) and `glyph` (a deterministic text renderer for CPU demos and learning tests; it
is never chosen for a real checkpoint unless asked for).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policy.lora import LoRAConfig
from policy.sana_lora import TransformerLoRAConfig

DEJAVU_SANS_BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


class GlyphConfig(BaseModel):
    """How the glyph decoder draws a token row (defaults: DESIGN.md's CPU learning demo)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    alphabet: str = string.ascii_lowercase + string.digits
    """Characters of codes 0..len-1; every higher code is a blank tile (lowercase learned a bit faster)."""
    font_path: Path = DEJAVU_SANS_BOLD
    """TrueType font of the tiles (Debian package fonts-dejavu-core, installed by scripts/setup.sh)."""
    font_size: int = Field(36, ge=4)
    """Font size in pixels; 36 on 32 px tiles reads as whole words (28-32 reads as spaced letters)."""
    tile_width: int = Field(32, ge=4)
    """Width of one token's tile; the image is tokens_per_image * tile_width wide (256 for 8 tokens)."""
    height: int = Field(64, ge=8)
    """Image height in pixels."""

    @field_validator("alphabet")
    @classmethod
    def _printable_and_unique(cls, alphabet: str) -> str:
        if not alphabet or len(set(alphabet)) != len(alphabet) or any(c.isspace() for c in alphabet):
            raise ValueError("alphabet must be non-empty, without repeats or whitespace")
        return alphabet


class DecoderConfig(BaseModel):
    """One decoder worker: which model, which decoder kind, where it runs and how it samples."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str
    """blip3o-rl model directory or hub id (resolved by policy.model_dir.resolve_model_dir)."""
    kind: Literal["sana", "glyph"] | None = None
    """Decoder kind; None takes the kind recorded in the model directory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and compute dtype of the AR model, connector and SANA (float32 on CPU, bfloat16 on GPU)."""
    device: str = "cpu"
    """Torch device of the decoder ("cpu", "cuda", "cuda:1")."""
    num_inference_steps: int = Field(30, ge=1)
    """Flow-matching Euler steps (30 in BLIP3o-NEXT)."""
    guidance_scale: float = Field(2.0, ge=0.0)
    """Classifier-free guidance scale against the all-zero null condition (2.0 in BLIP3o-NEXT)."""
    glyph: GlyphConfig = GlyphConfig()
    """Options of the glyph decoder (ignored by sana)."""
    num_threads: int = Field(0, ge=0)
    """Torch intra-op threads in this worker; 0 keeps the process default (Ray actors get 1). On the
    busy 2-core dev machine 1 thread decoded the tiny model ~12x faster than 2 (bench_decoder)."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Images per decoder call (AR forward + SANA + DC-AE); None: a whole chunk in one call. Bounds
    the activation memory on a GPU; row r is still seeded seed + r, so the images do not change."""
    vae_micro_batch_size: int | None = Field(None, ge=1)
    """Images per DC-AE decode inside a call (sana only); None: every image of the call at once. The
    DC-AE's full-resolution maps dominate a decode's memory (about 1.7 GB an image at 1024 px in
    bfloat16, rl/sana_memory.py): this bounds them while SANA still samples the whole call as one
    batch. The images are the same (a row's decode does not depend on the others in its batch)."""
    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs the Ray actor reserves."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs the Ray actor reserves (set 1 with device "cuda")."""
    lora: LoRAConfig | None = None
    """Weight updates are this LoRA adapter (the learner's `lora`; a run config copies it here): a
    decoder that conditions on the AR model serves each version beside its base weights (unmerged)."""
    transformer_lora: TransformerLoRAConfig | None = None
    """SANA transformer updates are this LoRA adapter (the diffusion learner's `lora`): the worker
    serves each version beside the transformer's base weights, unmerged (sana only)."""
