"""Programmatic checks that an edit was made, for the CPU edit demos, with the copy guard.

edit_ocr: the edited image must show the item's target text (`metadata.target.text`, the edit
data's `target` field) where the edit was asked for: Flow-GRPO's OCR reward (rewards/ocr.py
`ocr_reward`) of what PaddleOCR reads against that text. With a mask, PaddleOCR reads the mask's
bounding box, edge-padded by a quarter of its shorter side (`ocr_region`); without one, the whole
output. Why the box: the formula compares the target with *all* the text read, and the kept
background ("sun" of "cat sun") would otherwise cap every near miss at distance len(target), reward
0 ("dxg sun" against "dog": distance 4 -> 0; its box reads "dxg": 1 - 1/3), and text elsewhere
could pass the check.

edit_color: the edit region must take the item's target colour (`metadata.target.color`, one of
GenEval's 10 colour names): reward = the share of the mask's pixels (the whole image's without one)
whose nearest reference colour, by Euclidean distance in RGB, is the target. Reference colours are
the CSS / X11 colour keywords of the same names (`PALETTE`). A crude, model-free check for the
tiny-model demos, where no CLIP can name colours: GenEval's CLIP colour classifier
(rewards/colour.py) needs a real CLIP and an object class.

Regions (spatial credit, rl/objectives/regions.py): edit_ocr answers the OCR reward's per-character regions
(right 1, wrong or missing 0) of what it read in the box, placed on the image; a copy answers none.

Copy guard: an output nearly identical to its source inside the edit region gets no edit reward,
so a policy cannot earn the edit reward by returning the source (for instance when the source
already shows the target text). "Nearly identical" is the PSNR of the output against the source
over the pixels of the edit region (the mask; the whole image without one), on the 0-1 scale:

    copied = region_psnr(output, source, edit region) >= copy_psnr_db       (default 40 dB)
    reward = 0 if copied else the check's reward

40 dB is an RMS difference of 2.55 grey levels: a re-encode of the same picture, not an edit.
The guard lives in the edit scorer (a setting, `edit.copy_psnr_db`; null turns it off) rather
than in the reward mix: the mix adds weighted components and has no notion of one gating
another. Consistency (rewards/consistency.py) has no guard: a copy is perfect consistency, so
copying alone earns exactly the consistency weight of the mix and nothing of the edit's.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rewards.consistency import aligned, edit_region, region_psnr, require_source
from rewards.errors import RewardInputError
from rewards.geneval_rules import COLORS
from rewards.ocr import OcrScorer, Reading, character_regions, normalise, ocr_reward
from rewards.scorer import EditSource, Region, ScoreResult, pixel_region

PALETTE = {"red": (255, 0, 0), "orange": (255, 165, 0), "yellow": (255, 255, 0), "green": (0, 128, 0),
           "blue": (0, 0, 255), "purple": (128, 0, 128), "pink": (255, 192, 203), "brown": (165, 42, 42),
           "black": (0, 0, 0), "white": (255, 255, 255)}
"""edit_color's reference colours: the CSS / X11 colour keywords of GenEval's 10 colour names."""
assert tuple(PALETTE) == COLORS


class EditCheckConfig(BaseModel):
    """The edit checks (rewards/edit_checks.py): their copy guard."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    copy_psnr_db: float | None = Field(40.0, gt=0)
    """Copy guard: an output whose PSNR against the source inside the edit region is at least this
    (dB, 0-1 scale) is a copy and gets edit reward 0; null = no guard (then items need no source_image)."""


def target_text(metadata: dict, index: int) -> str:
    """`metadata["target"]["text"]`, non-empty after removing spaces; a RewardInputError otherwise."""
    target = metadata.get("target")
    text = target.get("text") if isinstance(target, dict) else None
    if not isinstance(text, str) or not normalise(text):
        raise RewardInputError('edit_ocr needs metadata {"target": {"text": "..."}} with a non-empty text',
                               index, "missing_target")
    return text


def target_color(metadata: dict, index: int) -> str:
    """`metadata["target"]["color"]`, one of GenEval's colour names; a RewardInputError otherwise."""
    target = metadata.get("target")
    color = target.get("color") if isinstance(target, dict) else None
    if color not in PALETTE:
        raise RewardInputError(f'edit_color needs metadata {{"target": {{"color": C}}}}, C one of {", ".join(COLORS)}; '
                               f"got {color!r}", index, "missing_target")
    return color


def color_share(image: np.ndarray, region: np.ndarray, color: str) -> float:
    """Share of the pixels of bool `region` [H, W] in `image` [H, W, 3] whose nearest PALETTE colour
    (Euclidean in RGB) is `color`: argmin_c |p - c|^2 = argmin_c (|c|^2 - 2 p.c)."""
    pixels = image[region].astype(np.float32)  # [P, 3]
    palette = np.asarray(list(PALETTE.values()), dtype=np.float32)  # [10, 3]
    nearest = ((palette**2).sum(-1) - 2 * pixels @ palette.T).argmin(-1)  # [P]
    return float(np.mean(nearest == list(PALETTE).index(color))) if pixels.size else 0.0


class CopyGuard:
    """copied = PSNR inside the edit region >= threshold (module docstring); threshold None = off."""

    def __init__(self, threshold_db: float | None):
        self.threshold_db = threshold_db

    def check(self, image: np.ndarray, source: tuple[np.ndarray, np.ndarray | None] | None, index: int,
              scorer: str) -> dict:
        """The guard's details for one output, given its (source, mask) at the output's size:
        {"copied": bool, "edit_region_psnr": dB} (nothing when off)."""
        if self.threshold_db is None:
            return {}
        if source is None:
            require_source(None, index, scorer)  # raises: the guard compares with the source
        reference, mask = source
        psnr = region_psnr(image, reference, edit_region(mask, image.shape))
        return {"copied": psnr >= self.threshold_db, "edit_region_psnr": psnr}


def ocr_window(mask: np.ndarray | None) -> tuple[int, int, int, int, int] | None:
    """(y0, y1, x0, x1, pad) of what the OCR check reads: the bounding box of bool `mask` [H, W] and a
    padding of a quarter of its shorter side; None when there is no mask or it is empty."""
    if mask is None or not mask.any():
        return None
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
    return y0, y1, x0, x1, max(1, min(y1 - y0, x1 - x0) // 4)


def ocr_region(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """What the OCR check reads: the bounding box of bool `mask` [H, W] in `image` [H, W, 3], padded by
    a quarter of its shorter side with its edge pixels (room for the text detector); the whole image
    when there is no mask or it is empty."""
    window = ocr_window(mask)
    if window is None:
        return image
    y0, y1, x0, x1, pad = window
    return np.pad(image[y0:y1, x0:x1], ((pad, pad), (pad, pad), (0, 0)), mode="edge")  # [h + 2 pad, w + 2 pad, 3]


def image_regions(reading: Reading, target: str, crop_shape: tuple[int, ...], mask: np.ndarray | None,
                  image_shape: tuple[int, ...]) -> list[Region]:
    """The OCR reward's per-character regions of a reading of the crop (rewards/ocr.py `character_regions`:
    right characters 1, wrong and missing ones 0), moved from the crop onto the image: a crop pixel
    (u, v) is the image pixel (x0 - pad + u, y0 - pad + v). Spatial credit reads them."""
    window = ocr_window(mask)
    y0, _, x0, _, pad = window if window is not None else (0, 0, 0, 0, 0)
    (crop_h, crop_w), (height, width) = crop_shape[:2], image_shape[:2]
    return [pixel_region((x0 - pad + r.box[0] * crop_w, y0 - pad + r.box[1] * crop_h,
                          x0 - pad + r.box[2] * crop_w, y0 - pad + r.box[3] * crop_h), width, height, r.reward)
            for r in character_regions(reading, target, crop_w, crop_h)]


def guard_and_masks(guard: CopyGuard, images: list[np.ndarray], sources: list[EditSource | None],
                    scorer: str) -> tuple[list[dict], list[np.ndarray | None]]:
    """Per image: the copy guard's details, and the mask at the image's size (None without one)."""
    guards, masks = [], []
    for index, (image, source) in enumerate(zip(images, sources, strict=True)):
        try:
            reference = aligned(source, image.shape)[:2] if source is not None else None  # (image, mask)
            guards.append(guard.check(image, reference, index, scorer))
        except RewardInputError as error:
            raise error.at(index) from None
        masks.append(reference[1] if reference is not None else None)
    return guards, masks


def guarded_version(guard: CopyGuard) -> str:
    return "copy-guard:" + ("off" if guard.threshold_db is None else f"{guard.threshold_db:g}dB")


class EditOcrScorer:
    """The OCR edit check as a generic scorer (`POST /v1/rewards/edit_ocr`)."""

    name = "edit_ocr"
    reads_sources = True

    def __init__(self, ocr: OcrScorer, guard: CopyGuard):
        self.ocr, self.guard = ocr, guard
        self.version = f"{ocr.version}+{guarded_version(guard)}"

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict],
              sources: list[EditSource | None]) -> list[ScoreResult]:
        targets = [target_text(metadata, index) for index, metadata in enumerate(metadatas)]
        guards, masks = guard_and_masks(self.guard, images, sources, self.name)
        crops = [ocr_region(image, mask) for image, mask in zip(images, masks)]
        results = []
        for image, crop, mask, reading, target, guard in zip(images, crops, masks, self.ocr.readings(crops), targets,
                                                             guards, strict=True):
            ocr = ocr_reward(reading.text, target)
            copied = bool(guard.get("copied"))
            # a copy earns no edit reward, so none of its regions either
            regions = [] if copied else image_regions(reading, target, crop.shape, mask, image.shape)
            results.append(ScoreResult(0.0 if copied else ocr, {"recognized": reading.text, "target": target,
                                                                "ocr": ocr, **guard,
                                                                "regions": [r.as_json() for r in regions]}))
        return results


class EditColorScorer:
    """The colour edit check as a generic scorer (`POST /v1/rewards/edit_color`)."""

    name = "edit_color"
    reads_sources = True

    def __init__(self, guard: CopyGuard):
        self.guard = guard
        self.version = f"css-palette-share+{guarded_version(guard)}"

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict],
              sources: list[EditSource | None]) -> list[ScoreResult]:
        colors = [target_color(metadata, index) for index, metadata in enumerate(metadatas)]
        guards, masks = guard_and_masks(self.guard, images, sources, self.name)
        results = []
        for image, mask, color, guard in zip(images, masks, colors, guards, strict=True):
            share = color_share(image, edit_region(mask, image.shape), color)
            reward = 0.0 if guard.get("copied") else share
            results.append(ScoreResult(reward, {"color": color, "share": share, **guard}))
        return results


def edit_color_scorer(settings) -> EditColorScorer:
    """BUILTIN_SCORERS factory: the colour check with the copy guard of `settings.edit`."""
    return EditColorScorer(CopyGuard(settings.edit.copy_psnr_db))


def edit_ocr_scorer(settings) -> EditOcrScorer:
    """BUILTIN_SCORERS factory: PaddleOCR from `settings.ocr`, the copy guard from `settings.edit`."""
    return EditOcrScorer(OcrScorer(settings.ocr), CopyGuard(settings.edit.copy_psnr_db))
