"""The protocol every reward beyond OCR and GenEval speaks, in process and over HTTP.

OCR and GenEval keep their own routes (their requests carry a target text / GenEval metadata and
their answers a typed breakdown). Every other scorer (JPEG compressibility, CLIP-family models, a
user's Python function, a remote scorer over HTTP) takes the same three things per image and
answers the same two, so one route (`POST /v1/rewards/{name}`) and one client serve them all:

    request   {"items": [{"image": "<base64 PNG>", "prompt": "...", "metadata": {...}}]}
    answer    {"results": [{"reward": <float>, "details": {...}}], "scorer": name, "version": "..."}

`version` names the model (and its revision) behind the numbers, so a run can tell when the reward
it trains on changed.

Regions (optional, every scorer and route): `details.regions = [{"box": [x0, y0, x1, y1], "reward": r}]`
says where in the image the scorer found something right or wrong. Boxes are fractions of the
image's width and height (0 <= x0 <= x1 <= 1, 0 <= y0 <= y1 <= 1, y down), rewards finite and on the
scorer's own scale (higher is better, as its scalar). A run with spatial credit on projects them onto
the token and latent grids (rl/objectives/regions.py); a scorer that answers none gives no local signal.

Edits: an item may also carry the image that was edited (`source_image`) and the region the edit
was asked for (`mask`, white = edit). Scorers that compare with the source (consistency, the edit
checks: `reads_sources = True`) get them as one `EditSource` per image; every other scorer never
sees them, so a client may send them to every scorer of its mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np


@dataclass(frozen=True)
class ScoreResult:
    """One image's reward and whatever the scorer wants to explain it with (JSON-able)."""

    reward: float
    details: dict[str, Any] = field(default_factory=dict)


MASK_THRESHOLD = 128
"""A mask pixel is in the region to edit when the mean of its R, G, B is at least this (white = edit)."""


def mask_of(pixels: np.ndarray) -> np.ndarray:
    """uint8 mask pixels [H, W] or [H, W, C] -> bool [H, W], True where the edit goes (MASK_THRESHOLD)."""
    values = pixels.astype(np.float64)
    return (values.mean(axis=-1) if values.ndim == 3 else values) >= MASK_THRESHOLD


@dataclass(frozen=True)
class EditSource:
    """What an edited image is compared with: the image the edit started from and where the edit goes."""

    image: np.ndarray
    """The source, uint8 RGB [H, W, 3] (its size may differ from the edited image's)."""
    mask: np.ndarray | None = None
    """bool [H, W] of the source, True = the region to edit; None = no region given."""


class Condition(NamedTuple):
    """One image's condition as the server's batcher carries it to a generic scorer."""

    prompt: str
    metadata: dict
    source: EditSource | None = None


@dataclass(frozen=True)
class Region:
    """A part of the image and its reward (see the module docstring)."""

    box: tuple[float, float, float, float]
    """x0, y0, x1, y1 as fractions of the image's width and height."""
    reward: float

    def as_json(self) -> dict[str, Any]:
        return {"box": [float(v) for v in self.box], "reward": float(self.reward)}


def pixel_region(box, width: int, height: int, reward: float) -> Region:
    """A Region from a pixel box (x0, y0, x1, y1), clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    fx = [min(max(v / width, 0.0), 1.0) for v in (x0, x1)]
    fy = [min(max(v / height, 0.0), 1.0) for v in (y0, y1)]
    return Region((min(fx), min(fy), max(fx), max(fy)), float(reward))


def parse_regions(raw: Any) -> list[Region]:
    """`details["regions"]` as Regions; ValueError naming what is wrong (a box outside [0, 1], a
    non-finite reward, a missing key)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"details.regions must be a list, got {type(raw).__name__}")
    regions = []
    for index, item in enumerate(raw):
        try:
            box, reward = item["box"], float(item["reward"])
            x0, y0, x1, y1 = (float(v) for v in box)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"region {index}: want {{'box': [x0, y0, x1, y1], 'reward': r}}, got {item!r}") from None
        if not all(np.isfinite([x0, y0, x1, y1, reward])):
            raise ValueError(f"region {index}: box and reward must be finite")
        if not (0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1):
            raise ValueError(f"region {index}: box {box} is not 0 <= x0 <= x1 <= 1, 0 <= y0 <= y1 <= 1")
        regions.append(Region((x0, y0, x1, y1), reward))
    return regions


class ImageScorer(Protocol):
    """A loaded scorer: `score` is called from one worker thread at a time, batched."""

    name: str
    version: str

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[ScoreResult]:
        """Rewards of uint8 RGB [H, W, 3] images, one per image, in order. Bad input raises
        rewards.errors.RewardInputError (the API answers 422 for that item)."""
        ...


class SourceScorer(Protocol):
    """A loaded scorer that compares each image with the one it was edited from (its `EditSource`,
    None for an item sent without `source_image`)."""

    name: str
    version: str
    reads_sources: bool
    """True: the server calls `score` with the items' sources."""

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict],
              sources: list[EditSource | None]) -> list[ScoreResult]:
        ...


ScorerFactory = Callable[[Any], ImageScorer | SourceScorer]
"""Builds a scorer from the server's Settings (slow: may load models)."""

BUILTIN_SCORERS: dict[str, str] = {
    "compressibility": "rewards.compressibility:compressibility_scorer",
    "incompressibility": "rewards.compressibility:incompressibility_scorer",
    "clipscore": "rewards.clip_score:clipscore_scorer",
    "pickscore": "rewards.clip_score:pickscore_scorer",
    "aesthetic": "rewards.aesthetic:aesthetic_scorer",
    "consistency": "rewards.consistency:consistency_scorer",
    "edit_ocr": "rewards.edit_checks:edit_ocr_scorer",
    "edit_color": "rewards.edit_checks:edit_color_scorer",
}
"""Generic scorers the reward server can load by name: name -> "module:factory" (imported only
when that scorer is asked for, so a server without CLIP does not import transformers)."""


def load_factory(spec: str) -> Callable:
    """The callable at "package.module:attribute"; ValueError with the reason otherwise."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"'{spec}' is not 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name} for '{spec}': {error}") from None
    target = getattr(module, attribute, None)
    if not callable(target):
        raise ValueError(f"{module_name} has no callable '{attribute}' (from '{spec}')")
    return target


class ServedScorer:
    """A generic scorer as the reward server runs it: checks what the scorer returns, so a user's
    function that answers the wrong number of rewards, or NaN, fails loudly instead of training on it."""

    def __init__(self, scorer: ImageScorer | SourceScorer):
        self.inner = scorer
        self.name = scorer.name
        self.version = scorer.version
        self.reads_sources = bool(getattr(scorer, "reads_sources", False))

    def score_conditions(self, images: list[np.ndarray], conditions: list[tuple]) -> list[ScoreResult]:
        """The Batcher's calling convention: one Condition (prompt, metadata[, source]) per image."""
        conditions = [Condition(*c) for c in conditions]
        prompts, metadatas = [c.prompt for c in conditions], [c.metadata for c in conditions]
        if self.reads_sources:
            results = list(self.inner.score(images, prompts, metadatas, [c.source for c in conditions]))
        else:
            results = list(self.inner.score(images, prompts, metadatas))
        if len(results) != len(images):
            raise RuntimeError(f"scorer {self.name} returned {len(results)} results for {len(images)} images")
        for result in results:
            if not isinstance(result, ScoreResult) or not np.isfinite(result.reward):
                raise RuntimeError(f"scorer {self.name} returned {result!r}: want a ScoreResult with a finite reward")
            try:
                parse_regions(result.details.get("regions"))
            except ValueError as error:
                raise RuntimeError(f"scorer {self.name} returned bad regions: {error}") from None
        return results


def build_builtin(name: str, settings: Any) -> ServedScorer:
    """The generic scorer `name` of BUILTIN_SCORERS, built from the server's settings."""
    return ServedScorer(load_factory(BUILTIN_SCORERS[name])(settings))


class FunctionScorer:
    """A user's plain function `f(images, prompts, metadatas)` as a generic scorer (the `python`
    rewards of a run config, `Settings.python_scorers`): a reward is added without forking the
    project. `f` answers one float or one ScoreResult per image.

    Its version is `f.version` when the function sets one, else `python:<spec>@<hash of its source
    file>`, so an edited function shows up in the run store as a new reward version."""

    def __init__(self, name: str, spec: str):
        self.name = name
        self.function = load_factory(spec)
        self.version = str(getattr(self.function, "version", "") or f"python:{spec}@{_source_hash(self.function)}")

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[ScoreResult]:
        answers = self.function(images, prompts, metadatas)
        return [a if isinstance(a, ScoreResult) else ScoreResult(float(a)) for a in answers]


def _source_hash(function: Callable) -> str:
    """First 12 hex digits of the sha256 of the file that defines `function` ("nosource" if none)."""
    import hashlib
    import inspect

    try:
        with open(inspect.getsourcefile(function), "rb") as source:
            return hashlib.sha256(source.read()).hexdigest()[:12]
    except (TypeError, OSError):
        return "nosource"


def build_python(name: str, spec: str) -> ServedScorer:
    """The python scorer `name` calling the function at "module:function", checked like any scorer."""
    return ServedScorer(FunctionScorer(name, spec))
