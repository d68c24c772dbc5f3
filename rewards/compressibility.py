"""JPEG (in)compressibility rewards (DDPO; Flow-GRPO `flow_grpo/rewards.py`): the size of the image
saved as JPEG at quality 95, in kB (1 kB = 1000 bytes).

    incompressibility = size_kB            (more detail pays)
    compressibility   = -size_kB / 500     (flat, smooth images pay)

Cheap, deterministic and learnable by a tiny decoder on a CPU: the reward of the CPU demo of
diffusion RL (DESIGN.md, "Flow-GRPO on the decoder").

Regions (spatial credit, rewards/scorer.py): the image is cut into BLOCKS x BLOCKS blocks; each block
is saved as a JPEG of its own and its size, less the size of a flat block of the same shape (the
headers and tables every file carries), is its share. A block's reward is the scalar's formula
applied to share x BLOCKS^2 (the image's size if every block were like this one), so block rewards
are on the scalar's scale (not equal to it: a block coded alone loses its neighbours' DC prediction),
and a busy block scores below a flat one under compressibility (above it under incompressibility).
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

from rewards.ocr import check_image
from rewards.scorer import Region, ScoreResult

JPEG_QUALITY = 95
BLOCKS = 8
"""Blocks per side of the per-block regions (8 x 8: one block per latent of the tiny SANA's 8 x 8)."""
COMPRESSIBILITY_SCALE = 500.0
"""Flow-GRPO divides the size in kB by 500 for the compressibility reward."""


def _jpeg_bytes(image: np.ndarray, quality: int = JPEG_QUALITY) -> int:
    """Bytes of the JPEG at `quality` (unchecked)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def jpeg_size_kb(image: np.ndarray, quality: int = JPEG_QUALITY) -> float:
    """Size in kB of uint8 RGB [H, W, 3] saved as JPEG at `quality`."""
    check_image(image)
    return _jpeg_bytes(image, quality) / 1000


def block_sizes_kb(image: np.ndarray, blocks: int = BLOCKS) -> np.ndarray:
    """[blocks, blocks] kB each block adds (its own JPEG less a flat block's of the same shape, >= 0);
    block (i, j) covers rows [i H / n, (i + 1) H / n) and columns [j W / n, (j + 1) W / n)."""
    check_image(image)
    height, width, _ = image.shape
    rows = np.linspace(0, height, blocks + 1).round().astype(int)  # [n + 1]
    cols = np.linspace(0, width, blocks + 1).round().astype(int)  # [n + 1]
    sizes = np.zeros((blocks, blocks))  # [n, n]
    flat: dict[tuple[int, int], int] = {}
    for i in range(blocks):
        for j in range(blocks):
            block = image[rows[i]:rows[i + 1], cols[j]:cols[j + 1]]
            if block.size == 0:
                continue
            shape = block.shape[:2]
            if shape not in flat:
                flat[shape] = _jpeg_bytes(np.zeros_like(block))
            sizes[i, j] = max(_jpeg_bytes(np.ascontiguousarray(block)) - flat[shape], 0) / 1000
    return sizes


def block_regions(image: np.ndarray, kind: Literal["compressibility", "incompressibility"],
                  blocks: int = BLOCKS) -> list[Region]:
    """One region per block, reward = the scalar's formula on (block kB x blocks^2), row-major."""
    sizes = block_sizes_kb(image, blocks)  # [n, n]
    edges = np.linspace(0.0, 1.0, blocks + 1)  # [n + 1]
    return [Region((float(edges[j]), float(edges[i]), float(edges[j + 1]), float(edges[i + 1])),
                   reward_of_size(float(sizes[i, j]) * blocks**2, kind))
            for i in range(blocks) for j in range(blocks)]


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
            regions = [region.as_json() for region in block_regions(image, self.name)]
            results.append(ScoreResult(reward_of_size(size, self.name), {"jpeg_kb": size, "regions": regions}))
        return results


def compressibility_scorer(settings=None) -> JpegScorer:
    return JpegScorer("compressibility")


def incompressibility_scorer(settings=None) -> JpegScorer:
    return JpegScorer("incompressibility")
