"""Cheap statistics of a step's images, the reward-hacking guard's eyes (rl/guard/rules.py).

A reward can be gamed by images no person would call better: the issue's LoRA OCR run went from
45% to 93% dark pixels while its OCR reward rose. These numbers make such a drift visible on the
dashboard (`images/<name>`, every step) and give the guard something to compare against the run's
first steps. All in numpy on uint8 RGB [H, W, 3]; luminance is ITU-R BT.601 luma in [0, 1].

    images/dark_share      share of pixels with luma < DARK_LUMA                      [0, 1]
    images/brightness      mean luma                                                  [0, 1]
    images/colour_entropy  Shannon entropy of the colours, COLOUR_LEVELS per channel  [0, 3 log2 COLOUR_LEVELS] bits
    images/edge_density    share of pixels whose luma gradient exceeds EDGE_STEP      [0, 1]
    images/group_diversity mean pairwise distance of the thumbnails within a group    [0, 1]
The first four are means over the step's images; the last a mean over its groups (prompts).

Each chunk's statistics are computed by a Ray task placed next to its images (like
`rl.run.pipeline.fetch_rows`), so no image travels to the driver for them; a chunk holds whole groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DARK_LUMA = 0.25
"""A pixel darker than a quarter of white is "dark" (black text and shadows; mid-greys are not)."""
COLOUR_LEVELS = 4
"""Levels per channel for the colour histogram: 4^3 = 64 colours, so entropy is at most 6 bits."""
EDGE_STEP = 0.1
"""Luma change between neighbouring pixels (a tenth of black-to-white) that counts as an edge."""
THUMBNAIL = 16
"""Side of the grey thumbnail the diversity compares (fine structure ignored, layout kept)."""
METRIC_NAMES = ("dark_share", "brightness", "colour_entropy", "edge_density", "group_diversity")


def luma(image: np.ndarray) -> np.ndarray:
    """BT.601 luma in [0, 1] of uint8 RGB [H, W, 3] -> [H, W]."""
    rgb = image.astype(np.float64) / 255.0
    return rgb @ np.array([0.299, 0.587, 0.114])


def dark_share(image: np.ndarray) -> float:
    """Share of pixels with luma < DARK_LUMA, in [0, 1]."""
    return float((luma(image) < DARK_LUMA).mean())


def brightness(image: np.ndarray) -> float:
    """Mean luma, in [0, 1] (0 black, 1 white)."""
    return float(luma(image).mean())


def colour_entropy(image: np.ndarray) -> float:
    """Shannon entropy in bits of the image's colours, each channel quantised to COLOUR_LEVELS
    levels: 0 for one flat colour, log2(k) for k colours in equal shares, at most 3 log2 COLOUR_LEVELS."""
    levels = image.astype(np.int64) * COLOUR_LEVELS // 256  # [H, W, 3] in 0..COLOUR_LEVELS-1
    codes = (levels[..., 0] * COLOUR_LEVELS + levels[..., 1]) * COLOUR_LEVELS + levels[..., 2]  # [H, W]
    counts = np.bincount(codes.ravel(), minlength=COLOUR_LEVELS**3)
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum() + 0.0)  # + 0.0: -0.0 for a flat image reads as 0.0


def edge_density(image: np.ndarray) -> float:
    """Share of the (H-1) x (W-1) pixels whose forward-difference luma gradient
    sqrt(dx^2 + dy^2) exceeds EDGE_STEP, in [0, 1]; a 1-pixel image has none."""
    y = luma(image)  # [H, W]
    if min(y.shape) < 2:
        return 0.0
    dx = y[:-1, 1:] - y[:-1, :-1]  # [H-1, W-1]
    dy = y[1:, :-1] - y[:-1, :-1]  # [H-1, W-1]
    return float((np.hypot(dx, dy) > EDGE_STEP).mean())


def thumbnail(image: np.ndarray) -> np.ndarray:
    """Luma averaged over a THUMBNAIL x THUMBNAIL grid of (near-)equal boxes -> [T, T] in [0, 1]
    (fewer boxes along a side shorter than THUMBNAIL pixels)."""
    y = luma(image)  # [H, W]
    rows = np.array_split(np.arange(y.shape[0]), min(THUMBNAIL, y.shape[0]))
    cols = np.array_split(np.arange(y.shape[1]), min(THUMBNAIL, y.shape[1]))
    sums = np.add.reduceat(np.add.reduceat(y, [r[0] for r in rows], axis=0), [c[0] for c in cols], axis=1)
    return sums / np.outer([len(r) for r in rows], [len(c) for c in cols])  # [T, T]


def group_diversity(images: np.ndarray) -> float:
    """Mean over pairs of a group's images of the mean absolute difference of their thumbnails,
    in [0, 1]: 0 when every sample looks the same (collapse), 1 for black next to white."""
    thumbs = np.stack([thumbnail(image) for image in images])  # [G, T, T]
    g = len(thumbs)
    if g < 2:
        return 0.0
    distances = [np.abs(thumbs[i] - thumbs[j]).mean() for i in range(g) for j in range(i + 1, g)]
    return float(np.mean(distances))


@dataclass(frozen=True)
class ImageStats:
    """Per-image statistics of some rows, and the diversity of each of their groups."""

    dark_share: np.ndarray
    """[R]"""
    brightness: np.ndarray
    """[R]"""
    colour_entropy: np.ndarray
    """[R]"""
    edge_density: np.ndarray
    """[R]"""
    group_diversity: np.ndarray
    """[R // G]"""

    def metrics(self) -> dict[str, float]:
        """The step's numbers under `images/` (means over images; diversity a mean over groups)."""
        return {f"images/{name}": float(np.mean(getattr(self, name))) for name in METRIC_NAMES}


def batch_stats(images: np.ndarray, group_size: int) -> ImageStats:
    """Statistics of `images` [R, H, W, 3] uint8, rows grouped by consecutive `group_size`."""
    if len(images) % group_size:
        raise ValueError(f"{len(images)} images do not split into groups of {group_size}")
    groups = [images[start : start + group_size] for start in range(0, len(images), group_size)]
    return ImageStats(
        dark_share=np.array([dark_share(image) for image in images]),
        brightness=np.array([brightness(image) for image in images]),
        colour_entropy=np.array([colour_entropy(image) for image in images]),
        edge_density=np.array([edge_density(image) for image in images]),
        group_diversity=np.array([group_diversity(group) for group in groups]),
    )


def merge(parts: list[ImageStats]) -> ImageStats:
    """One ImageStats of several chunks' (rows and groups concatenated in order)."""
    return ImageStats(**{name: np.concatenate([getattr(p, name) for p in parts]) for name in METRIC_NAMES})


def step_image_metrics(scored) -> dict[str, float]:
    """`images/*` of a ScoredStep (rl/run/pipeline.py): one Ray task per chunk, placed by Ray next to
    that chunk's images, returns its small ImageStats."""
    import ray

    from rl.ray_tasks import ray_task

    stats = ray_task(batch_stats, num_cpus=0)
    group_size = len(scored.rewards) // len(scored.items)
    parts = ray.get([stats.remote(chunk.ref, group_size) for chunk in scored.images])
    return merge(parts).metrics()
