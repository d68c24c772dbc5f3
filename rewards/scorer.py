"""The protocol every reward beyond OCR and GenEval speaks, in process and over HTTP.

OCR and GenEval keep their own routes (their requests carry a target text / GenEval metadata and
their answers a typed breakdown). Every other scorer (JPEG compressibility, CLIP-family models, a
user's Python function, a remote scorer over HTTP) takes the same three things per image and
answers the same two, so one route (`POST /v1/rewards/{name}`) and one client serve them all:

    request   {"items": [{"image": "<base64 PNG>", "prompt": "...", "metadata": {...}}]}
    answer    {"results": [{"reward": <float>, "details": {...}}], "scorer": name, "version": "..."}

`version` names the model (and its revision) behind the numbers, so a run can tell when the reward
it trains on changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ScoreResult:
    """One image's reward and whatever the scorer wants to explain it with (JSON-able)."""

    reward: float
    details: dict[str, Any] = field(default_factory=dict)


class ImageScorer(Protocol):
    """A loaded scorer: `score` is called from one worker thread at a time, batched."""

    name: str
    version: str

    def score(self, images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[ScoreResult]:
        """Rewards of uint8 RGB [H, W, 3] images, one per image, in order. Bad input raises
        rewards.errors.RewardInputError (the API answers 422 for that item)."""
        ...


ScorerFactory = Callable[[Any], ImageScorer]
"""Builds a scorer from the server's Settings (slow: may load models)."""

BUILTIN_SCORERS: dict[str, str] = {
    "compressibility": "rewards.compressibility:compressibility_scorer",
    "incompressibility": "rewards.compressibility:incompressibility_scorer",
    "clipscore": "rewards.clip_score:clipscore_scorer",
    "pickscore": "rewards.clip_score:pickscore_scorer",
    "aesthetic": "rewards.aesthetic:aesthetic_scorer",
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

    def __init__(self, scorer: ImageScorer):
        self.inner = scorer
        self.name = scorer.name
        self.version = scorer.version

    def score_conditions(self, images: list[np.ndarray], conditions: list[tuple[str, dict]]) -> list[ScoreResult]:
        """The Batcher's calling convention: one (prompt, metadata) condition per image."""
        results = list(self.inner.score(images, [c[0] for c in conditions], [c[1] for c in conditions]))
        if len(results) != len(images):
            raise RuntimeError(f"scorer {self.name} returned {len(results)} results for {len(images)} images")
        for result in results:
            if not isinstance(result, ScoreResult) or not np.isfinite(result.reward):
                raise RuntimeError(f"scorer {self.name} returned {result!r}: want a ScoreResult with a finite reward")
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
