"""User-style reward functions (`module:function`) the tests load into the reward service, as a
user's own module would be: plain functions of (images, prompts, metadatas)."""

from __future__ import annotations

import numpy as np

from rewards.scorer import ScoreResult


def redness(images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[ScoreResult]:
    """Share of the red channel in the image's total intensity (1 for pure red, 1/3 for grey), with the
    prompt's length as a detail to show that prompts and metadata arrive."""
    results = []
    for image, prompt, metadata in zip(images, prompts, metadatas):
        total = float(image.astype(np.float64).sum())
        share = float(image[..., 0].astype(np.float64).sum() / total) if total else 0.0
        results.append(ScoreResult(share, {"prompt_chars": len(prompt), "task": metadata.get("task", "")}))
    return results


def prompt_length(images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[float]:
    """Plain floats are accepted too."""
    return [float(len(prompt)) for prompt in prompts]


prompt_length.version = "prompt-length-2"  # a function may name its own version


def wrong_count(images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[float]:
    """A broken scorer: one reward too few (the service must refuse to pass that on)."""
    return [0.0] * (len(images) - 1)
