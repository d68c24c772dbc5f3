"""JPEG (in)compressibility rewards (DDPO; Flow-GRPO `flow_grpo/rewards.py`): the size of the image
saved as JPEG at quality 95, in kB (1 kB = 1000 bytes).

    incompressibility = size_kB            (more detail pays)
    compressibility   = -size_kB / 500     (flat, smooth images pay)

Cheap, deterministic and learnable by a tiny decoder on a CPU: the reward of the CPU demo of
diffusion RL (DESIGN.md, "Flow-GRPO on the decoder").
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

from rewards.ocr import check_image
from rewards.scorer import ScoreResult

JPEG_QUALITY = 95
COMPRESSIBILITY_SCALE = 500.0
"""Flow-GRPO divides the size in kB by 500 for the compressibility reward."""


def jpeg_size_kb(image: np.ndarray, quality: int = JPEG_QUALITY) -> float:
    """Size in kB of uint8 RGB [H, W, 3] saved as JPEG at `quality`."""
    check_image(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def reward_of_size(size_kb: float, kind: Literal["compressibility", "incompressibility"]) -> float:
    return -size_kb / COMPRESSIBILITY_SCALE if kind == "compressibility" else size_kb


def jpeg_reward(image: np.ndarray, kind: Literal["compressibility", "incompressibility"]) -> float:
    return reward_of_size(jpeg_size_kb(image), kind)


class JpegScorer:
    """compressibility / incompressibility as a generic scorer of the reward service
    (`POST /v1/rewards/compressibility`); prompts and metadata are ignored."""

    def __init__(self, kind: Literal["compressibility", "incompressibility"]):
        self.name = kind
        self.version = f"jpeg-q{JPEG_QUALITY}"

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[ScoreResult]:
        results = []
        for image in images:
            size = jpeg_size_kb(image)
            results.append(ScoreResult(reward_of_size(size, self.name), {"jpeg_kb": size}))
        return results


def compressibility_scorer(settings=None) -> JpegScorer:
    return JpegScorer("compressibility")


def incompressibility_scorer(settings=None) -> JpegScorer:
    return JpegScorer("incompressibility")
