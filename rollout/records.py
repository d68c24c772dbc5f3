"""Typed records handed between the stages of a GRPO step (driver <-> workers <-> learner).

Tensors are CPU tensors so Ray can move the records through its object store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from policy.logprobs import Truncation


@dataclass
class RolloutBatch:
    """G samples for each of B prompts, as sampled by one policy version. Rows are sample-major:
    row r belongs to prompt `group_index[r]`; rows of one group are contiguous."""

    prompt_ids: list[list[int]]
    """Rollout prompt token ids of each row (chat template + `<im_start><S0>`)."""
    group_index: list[int]
    """Index of the row's prompt within the request (0..B-1)."""
    image_tokens: torch.Tensor
    """[B*G, N] long: sampled image-token ids (vocabulary ids, not codebook indices)."""
    logprobs: torch.Tensor
    """[B*G, N] float32: masked log-prob of each sampled token under the sampling distribution."""
    policy_version: int
    """Weight version the engine served while sampling."""
    seed: int
    """Base seed of the request; row r used seed + r."""
    temperature: float = 1.0
    """Sampling temperature."""
    truncation: Truncation = field(default_factory=Truncation)
    """Top-k / top-p the tokens were sampled with: the learner scores the same distribution."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent per phase (e.g. "generate")."""

    def __len__(self) -> int:
        return self.image_tokens.shape[0]


@dataclass
class DecodedImages:
    """Images rendered for a rollout batch, row for row."""

    images: np.ndarray
    """[B*G, H, W, 3] uint8 RGB."""
    policy_version: int
    """AR weight version the images belong to: the one whose hidden states conditioned SANA; for a
    decoder whose images do not depend on the weights (glyph), the tokens' own version."""
    timings: dict[str, float] = field(default_factory=dict)
