"""Spatial credit's geometry: reward regions (boxes in image fractions) -> a local advantage per grid
position. Pure functions; rl/objectives/grpo.py adds the result to the group advantage.

    per component c of the mix, per prompt group g:
        l_k     = (r_k - mean_g(r)) / (std_g(r) + eps)      over every region k of g's samples
                                                           (centred only without std scaling)
    per sample b, grid position p:
        L_c(b, p) = sum_k o_kp l_k / sum_k o_kp             over the regions k of b reaching p
        L(b, p)   = sum_c w_c L_c(b, p)                     over the components reaching p
        signal(b, p) = some region of b reaches p (in a component with signal in g)

o_kp is the area of box k inside cell p. Region k reaches cell p if it covers at least
`min_cover` of the cell, and always its home cell (the one holding most of it, first in raster order
on a tie), so a region smaller than a cell still reaches one.

Why pool the group's regions (not compare samples position by position): regions move between
samples (OCR characters, detected objects), and a group whose samples all hold the same partial
answer still has right and wrong regions (OCR "c t" for "cat": 'c' and 't' right, the gap of the
missing 'a' wrong), so pooling gives a signal where the scalar reward has none. Each component is
normalised on its own before its weight (as `normalize: group` in the mix), so regions of scorers
on different scales combine on one footing. A group with fewer than two regions of a component, or
all of one value, gets no signal from it (as a zero-signal group in GRPO).

Grids: the AR policy's image tokens in raster order (27 x 27 SigLIP2 tokens; the glyph decoder draws
one row of N tiles: 1 x N, `token_grid`), SANA's latent positions (h x w) for the diffusion learner.
Cell (i, j) of a rows x cols grid covers x in [j / cols, (j + 1) / cols), y in [i / rows, (i + 1) / rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Grid = tuple[int, int]
"""(rows, cols) of a uniform grid over the image."""


@dataclass(frozen=True)
class ComponentRegions:
    """One reward component's regions on every row of a step."""

    name: str
    weight: float
    """Its weight in the mix (w_c)."""
    boxes: tuple[np.ndarray, ...]
    """Per row [K_b, 4] float64 x0, y0, x1, y1 in [0, 1] (K_b may be 0)."""
    rewards: tuple[np.ndarray, ...]
    """Per row [K_b] float64."""

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.rewards):
            raise ValueError(f"{self.name}: {len(self.boxes)} rows of boxes, {len(self.rewards)} of rewards")


@dataclass(frozen=True)
class LocalAdvantages:
    values: np.ndarray
    """[R, P] float64 L(b, p) (0 where there is no signal); P = rows * cols, raster order."""
    signal: np.ndarray
    """[R, P] bool: position p of row b has a local signal."""


def token_grid(decoder: str, tokens_per_image: int) -> Grid:
    """The AR image tokens' grid: the glyph decoder's one row of tiles, else a square raster
    (SigLIP2: 729 tokens = 27 x 27)."""
    if decoder == "glyph":
        return (1, tokens_per_image)
    side = math.isqrt(tokens_per_image)
    if side * side != tokens_per_image:
        raise ValueError(f"{tokens_per_image} image tokens are no square grid: set the spatial credit's grid")
    return (side, side)


def cell_overlaps(boxes: np.ndarray, grid: Grid) -> np.ndarray:
    """[K, P] area of box k inside cell p, as a fraction of the cell's area (cells in raster order)."""
    rows, cols = grid
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # [K, 4]
    xs, ys = np.arange(cols + 1) / cols, np.arange(rows + 1) / rows  # [cols + 1], [rows + 1]
    width = np.clip(np.minimum(boxes[:, None, 2], xs[None, 1:]) - np.maximum(boxes[:, None, 0], xs[None, :-1]), 0, None)  # [K, cols]
    height = np.clip(np.minimum(boxes[:, None, 3], ys[None, 1:]) - np.maximum(boxes[:, None, 1], ys[None, :-1]), 0, None)  # [K, rows]
    area = height[:, :, None] * width[:, None, :]  # [K, rows, cols]
    return area.reshape(len(boxes), rows * cols) * (rows * cols)  # [K, P]


def reach(overlaps: np.ndarray, min_cover: float) -> np.ndarray:
    """[K, P] bool: region k reaches cell p (covers >= min_cover of it, or p is its home cell)."""
    reached = overlaps >= min_cover  # [K, P]
    has_area = overlaps.max(axis=1) > 0  # [K] a degenerate or outside box reaches nothing
    home = overlaps.argmax(axis=1)  # [K]
    reached[np.arange(len(overlaps))[has_area], home[has_area]] = True
    return reached


def project(boxes: np.ndarray, values: np.ndarray, grid: Grid, min_cover: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per cell the overlap-weighted mean of the values of the regions reaching it: -> ([P], [P] bool).

        v(p) = sum_k o_kp [k reaches p] x_k / sum_k o_kp [k reaches p]
    """
    rows, cols = grid
    values = np.asarray(values, dtype=np.float64).reshape(-1)  # [K]
    if values.size == 0:
        return np.zeros(rows * cols), np.zeros(rows * cols, dtype=bool)
    overlaps = cell_overlaps(boxes, grid)  # [K, P]
    weights = np.where(reach(overlaps, min_cover), overlaps, 0.0)  # [K, P]
    total = weights.sum(axis=0)  # [P]
    covered = total > 0  # [P]
    mean = (weights * values[:, None]).sum(axis=0) / np.where(covered, total, 1.0)  # [P]
    return np.where(covered, mean, 0.0), covered


def region_advantages(rewards: tuple[np.ndarray, ...], group_index: np.ndarray, scale_by_std: bool,
                      eps: float) -> tuple[list[np.ndarray], np.ndarray]:
    """l_k of every region, normalised over all regions of its group's rows: -> (per row [K_b],
    [R] bool row's group has a signal). Unbiased std (as GRPO's group std)."""
    group_index = np.asarray(group_index)  # [R]
    out = [np.zeros(len(r)) for r in rewards]
    signal = np.zeros(len(rewards), dtype=bool)  # [R]
    for group in np.unique(group_index):
        rows = np.flatnonzero(group_index == group)
        pooled = np.concatenate([np.asarray(rewards[b], dtype=np.float64) for b in rows])  # [K_g]
        if pooled.size < 2 or bool((pooled == pooled[0]).all()):
            continue
        mean, std = pooled.mean(), pooled.std(ddof=1)
        for b in rows:
            centred = np.asarray(rewards[b], dtype=np.float64) - mean  # [K_b]
            out[b] = centred / (std + eps) if scale_by_std else centred
        signal[rows] = True
    return out, signal


def local_advantages(components: list[ComponentRegions], group_index, grid: Grid, scale_by_std: bool = True,
                     eps: float = 1e-4, min_cover: float = 0.5) -> LocalAdvantages:
    """L(b, p) and its signal mask for every row and grid position (module docstring)."""
    group_index = np.asarray(group_index)  # [R]
    rows_count, cells = len(group_index), grid[0] * grid[1]
    values = np.zeros((rows_count, cells))  # [R, P]
    signal = np.zeros((rows_count, cells), dtype=bool)  # [R, P]
    for component in components:
        if len(component.rewards) != rows_count:
            raise ValueError(f"{component.name}: regions for {len(component.rewards)} rows, the step has {rows_count}")
        advantages, has_signal = region_advantages(component.rewards, group_index, scale_by_std, eps)
        for b in np.flatnonzero(has_signal):
            value, covered = project(component.boxes[b], advantages[b], grid, min_cover)  # [P], [P]
            values[b] += component.weight * value
            signal[b] |= covered
    return LocalAdvantages(values, signal)


def component_regions(name: str, weight: float, rows) -> ComponentRegions:
    """A component's regions from per-row sequences of region records (anything with `.box`, `.reward`)."""
    boxes = tuple(np.array([r.box for r in row], dtype=np.float64).reshape(-1, 4) for row in rows)  # [K_b, 4] each
    rewards = tuple(np.array([r.reward for r in row], dtype=np.float64) for row in rows)  # [K_b] each
    return ComponentRegions(name, weight, boxes, rewards)
