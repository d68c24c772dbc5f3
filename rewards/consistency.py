"""Consistency of an edit: how much of the source image survived outside the region the edit was
asked for (PIE-Bench's background metrics), or, without a region, how alike the two images look to
CLIP. A generic scorer that reads each item's source (`reads_sources`, rewards/scorer.py).

Background metrics, as PIE-Bench computes its `*_unedit_part` columns (cure-lab/PnPInversion,
`evaluation/evaluate.py` and `evaluation/matrics_calculator.py`): both images on the 0-1 scale
(uint8 / 255), both multiplied by (1 - mask) so the edit region is black in both, then the metric
over the whole image:

    MSE  = mean over H x W x 3 of (o (1 - m) - s (1 - m))^2
         = outside_fraction * (mean squared error over the pixels outside the mask)
    PSNR = 10 log10(1 / MSE)                                   (data range 1; in dB)
    SSIM = torchmetrics' structural_similarity_index_measure(data_range=1) of the two masked images:
           per channel, Gaussian window 11 x 11 with sigma 1.5 (the 1-D kernel exp(-x^2 / 2 sigma^2)
           on x = -5..5, normalised, outer product), C1 = (0.01)^2, C2 = (0.03)^2,
           mu = w * x, sigma_x^2 = w * x^2 - mu_x^2, sigma_xy = w * xy - mu_x mu_y (no sample-
           covariance correction), SSIM map = (2 mu_x mu_y + C1)(2 sigma_xy + C2) /
           ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)), averaged over the channels and the
           window positions that lie inside the image.

Choices, stated: we keep PIE-Bench's dilution (the edit region counts as zero error in MSE and as
~1 in SSIM), so our numbers are theirs and `outside_fraction` in the details undoes it for MSE
(MSE / outside_fraction). SSIM averages the window positions entirely inside the image, as
torchmetrics did when PIE-Bench was published (2023 releases crop the 5-pixel border of the
reflect-padded map; later releases average the border too). PIE-Bench also marks the one-pixel
image border as edit region to absorb annotation errors; we take masks as given. Identical images
have infinite PSNR: we report PSNR_CEILING_DB, so every number stays finite (JSON) and averages.

Reward in [0, 1], one metric chosen in the config (`reward`):

    psnr: clip(PSNR / psnr_cap_db, 0, 1)        (default; cap 40 dB, so an exact background is 1)
    ssim: max(SSIM, 0)

An item without a mask has no background to compare: its reward is CLIP image-image similarity
(CLIP-I, the edit benchmarks' name), max(cos(E_I(output), E_I(source)), 0), with the CLIP of
`consistency.clip`; without one configured such an item is refused (422).

When the output's size differs from the source's (a decoder renders 1024 px from a 384 px source),
the source is resized to the output's size (bicubic) and the mask with it (nearest); the details
say so (`source_resized`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from rewards.clip_score import ClipModelConfig
from rewards.errors import RewardInputError
from rewards.ocr import check_image
from rewards.scorer import EditSource, Region, ScoreResult, pixel_region

PSNR_CEILING_DB = 100.0
"""PSNR reported for identical images (MSE 0, PSNR infinite): finite for JSON and for averages."""
REGION_BLOCKS = 8
"""Blocks per side of the per-block regions (spatial credit): 8 x 8, as the JPEG rewards' (a glyph tile
is one block wide)."""
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
"""torchmetrics' SSIM defaults (Wang et al. 2004's constants), as PIE-Bench ran it."""


class ConsistencyConfig(BaseModel):
    """The consistency scorer (rewards/consistency.py): which metric is the reward, and the CLIP for
    items without a mask."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    reward: Literal["psnr", "ssim"] = "psnr"
    """Background metric the reward is made of: psnr -> clip(PSNR / psnr_cap_db, 0, 1); ssim -> max(SSIM, 0)."""
    psnr_cap_db: float = Field(40.0, gt=0)
    """PSNR (dB) at which the psnr reward reaches 1."""
    clip: ClipModelConfig | None = None
    """CLIP for items sent without a mask (reward = CLIP-I); None: such items are refused."""


@dataclass(frozen=True)
class BackgroundMetrics:
    """PIE-Bench's background metrics of one edited image (module docstring)."""

    mse: float
    psnr: float
    ssim: float
    outside_fraction: float
    """Share of the pixels outside the mask (MSE / outside_fraction = MSE over those pixels)."""


def unit(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float64 [H, W, 3] on the 0-1 scale."""
    return image.astype(np.float64) / 255.0


def psnr_of_mse(mse: float) -> float:
    """PSNR = 10 log10(1 / MSE) in dB on the 0-1 scale; PSNR_CEILING_DB for MSE 0 (and above it)."""
    return PSNR_CEILING_DB if mse <= 0 else min(10.0 * math.log10(1.0 / mse), PSNR_CEILING_DB)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """[size] normalised exp(-x^2 / 2 sigma^2) on x = -(size-1)/2 .. (size-1)/2 (torchmetrics `_gaussian`)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-((x / sigma) ** 2) / 2)
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable filter of [H, W, C] by outer(g, g) at the positions where the window fits:
    -> [H - k + 1, W - k + 1, C]."""
    x = sliding_window_view(x, len(g), axis=0) @ g  # [H-k+1, W, C]
    return sliding_window_view(x, len(g), axis=1) @ g  # [H-k+1, W-k+1, C]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two float images [H, W, C] on the 0-1 scale (module docstring's formula)."""
    if min(a.shape[0], a.shape[1]) < SSIM_WINDOW:
        raise RewardInputError(f"image is {a.shape[1]}x{a.shape[0]}: SSIM needs at least {SSIM_WINDOW} px a side",
                               code="image_too_small")
    g = gaussian_window()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)  # [H', W', C]
    var_a = np.maximum(_filter_valid(a * a, g) - mu_a**2, 0.0)
    var_b = np.maximum(_filter_valid(b * b, g) - mu_b**2, 0.0)
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


def background_metrics(output: np.ndarray, source: np.ndarray, mask: np.ndarray) -> BackgroundMetrics:
    """MSE, PSNR, SSIM of uint8 `output` against `source` [H, W, 3] outside bool `mask` [H, W] (True = edit)."""
    keep = (~mask).astype(np.float64)[..., None]  # [H, W, 1] 1 outside the edit region
    o, s = unit(output) * keep, unit(source) * keep  # [H, W, 3]
    mse = float(np.mean((o - s) ** 2))
    return BackgroundMetrics(mse=mse, psnr=psnr_of_mse(mse), ssim=ssim(o, s), outside_fraction=float(keep.mean()))


def region_psnr(output: np.ndarray, source: np.ndarray, region: np.ndarray) -> float:
    """PSNR (0-1 scale) over the pixels of bool `region` [H, W] only, not diluted: the copy guard's
    measure of how much the edit region changed."""
    difference = unit(output)[region] - unit(source)[region]  # [P, 3]
    return psnr_of_mse(float(np.mean(difference**2)) if difference.size else 0.0)


def aligned(source: EditSource, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """The source image and mask at the output's [H, W] (bicubic / nearest when they differ), and
    whether they were resized."""
    check_image(source.image)
    if source.mask is not None and source.mask.shape != source.image.shape[:2]:
        raise RewardInputError(f"mask is {source.mask.shape[1]}x{source.mask.shape[0]} but the source image is "
                               f"{source.image.shape[1]}x{source.image.shape[0]}", code="mask_size")
    height, width = shape[:2]
    if source.image.shape[:2] == (height, width):
        return source.image, source.mask, False
    image = np.asarray(Image.fromarray(source.image).resize((width, height), Image.Resampling.BICUBIC))
    mask = None
    if source.mask is not None:
        picture = Image.fromarray(source.mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
        mask = np.asarray(picture) >= 128
    return image, mask, True


def edit_region(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Where the edit goes: the mask, or the whole image when there is none or it is empty."""
    return mask if mask is not None and mask.any() else np.ones(shape[:2], dtype=bool)


def background_regions(output: np.ndarray, source: np.ndarray, mask: np.ndarray, cap_db: float,
                       blocks: int = REGION_BLOCKS) -> list[Region]:
    """Spatial credit's regions: a blocks x blocks grid over the image, each block with pixels outside the
    mask rewarded clip(region PSNR of those pixels / cap_db, 0, 1) (not diluted: a block's own error);
    blocks wholly inside the mask have none."""
    height, width = mask.shape
    rows, cols = np.linspace(0, height, blocks + 1).round().astype(int), np.linspace(0, width, blocks + 1).round().astype(int)
    regions = []
    for i in range(blocks):
        for j in range(blocks):
            outside = ~mask[rows[i]:rows[i + 1], cols[j]:cols[j + 1]]  # [h, w]
            if not outside.any():
                continue
            psnr = region_psnr(output[rows[i]:rows[i + 1], cols[j]:cols[j + 1]],
                               source[rows[i]:rows[i + 1], cols[j]:cols[j + 1]], outside)
            regions.append(pixel_region((cols[j], rows[i], cols[j + 1], rows[i + 1]), width, height,
                                        min(max(psnr / cap_db, 0.0), 1.0)))
    return regions


def psnr_reward(metrics: BackgroundMetrics, cap_db: float) -> float:
    """clip(PSNR / cap_db, 0, 1)."""
    return min(max(metrics.psnr / cap_db, 0.0), 1.0)


def ssim_reward(metrics: BackgroundMetrics) -> float:
    """max(SSIM, 0)."""
    return max(metrics.ssim, 0.0)


def require_source(source: EditSource | None, index: int, scorer: str) -> EditSource:
    """The item's source; a RewardInputError naming the item if it came without one."""
    if source is None:
        raise RewardInputError(f"the {scorer} scorer compares with the source: give the item a source_image",
                               index, "missing_source")
    return source


class ConsistencyScorer:
    """Background preservation (masked items) or CLIP-I (items without a mask) as a generic scorer
    (`POST /v1/rewards/consistency`)."""

    name = "consistency"
    reads_sources = True

    def __init__(self, config: ConsistencyConfig = ConsistencyConfig(), embedder=None, clip_version: str = ""):
        self.embedder = embedder
        """A rewards.clip_score.ClipEmbedder for items without a mask (None: refused)."""
        cap = self.cap_db = config.psnr_cap_db
        self.reward_of = {"psnr": lambda m: psnr_reward(m, cap), "ssim": ssim_reward}[config.reward]
        metric = f"psnr/{cap:g}dB" if config.reward == "psnr" else "ssim"
        self.version = f"pie-bench-background:{metric}" + (f"+clip-i:{clip_version}" if embedder is not None else "")

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict],
              sources: list[EditSource | None]) -> list[ScoreResult]:
        results: list[ScoreResult | None] = [None] * len(images)
        unmasked: list[tuple[int, np.ndarray, np.ndarray]] = []
        for index, (image, source) in enumerate(zip(images, sources, strict=True)):
            try:
                check_image(image)
                reference, mask, resized = aligned(require_source(source, index, self.name), image.shape)
                if mask is None:
                    unmasked.append((index, image, reference))
                    continue
                if mask.all():
                    raise RewardInputError("the mask covers the whole image: no background to compare",
                                           code="no_background")
                metrics = background_metrics(image, reference, mask)
            except RewardInputError as error:
                raise error.at(index) from None
            regions = background_regions(image, reference, mask, self.cap_db)
            details = {"mse": metrics.mse, "psnr": metrics.psnr, "ssim": metrics.ssim,
                       "outside_fraction": metrics.outside_fraction, "source_resized": resized,
                       "regions": [region.as_json() for region in regions]}
            results[index] = ScoreResult(self.reward_of(metrics), details)
        if unmasked:
            self._clip_i(unmasked, results)
        return results  # type: ignore[return-value]  # every slot filled above

    def _clip_i(self, unmasked: list[tuple[int, np.ndarray, np.ndarray]], results: list) -> None:
        """CLIP-I of the items without a mask, embedded in one batch."""
        if self.embedder is None:
            raise RewardInputError("item has no mask and the consistency scorer has no CLIP for CLIP-I "
                                   "(set consistency.clip, or send a mask)", unmasked[0][0], "missing_mask")
        outputs = self.embedder.images([image for _, image, _ in unmasked])  # [N, D] unit norm
        references = self.embedder.images([reference for _, _, reference in unmasked])  # [N, D]
        cosines = (outputs * references).sum(-1).tolist()  # [N]
        for (index, _, _), cosine in zip(unmasked, cosines):
            results[index] = ScoreResult(max(cosine, 0.0), {"clip_i": cosine})


def consistency_scorer(settings) -> ConsistencyScorer:
    """BUILTIN_SCORERS factory: the consistency scorer from `settings.consistency` (loads its CLIP if set)."""
    config: ConsistencyConfig = settings.consistency
    if config.clip is None:
        return ConsistencyScorer(config)
    from rewards.clip_score import ClipEmbedder

    embedder, version = ClipEmbedder.from_config(config.clip, "consistency.clip")
    return ConsistencyScorer(config, embedder, version)
