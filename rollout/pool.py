"""Spreading one request's captions over several AR rollout workers and joining their answers.

Each worker gets a contiguous slice of the captions and the seed its first row would have had in
one big request, so the joined batch has the same rows as a single worker's (row r sampled with
seed + r). The step's dataflow (rl/run/pipeline.py) joins its chunks with `concat_batches`.
"""

from __future__ import annotations

import torch

from rollout.records import RolloutBatch


def split_evenly(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) slices of n_items over at most n_parts parts, sizes differing by <= 1."""
    n_parts = min(n_parts, n_items)
    base, extra = divmod(n_items, n_parts)
    slices, start = [], 0
    for part in range(n_parts):
        stop = start + base + (1 if part < extra else 0)
        slices.append((start, stop))
        start = stop
    return slices


def concat_batches(parts: list[RolloutBatch], group_offsets: list[int], seed: int) -> RolloutBatch:
    """Join per-worker batches in caption order. The batch's version is the OLDEST one served:
    a request that straddles a weight update is as stale as its stalest rows (each row's
    log-probs are still exact for the weights that sampled it)."""
    settings = {(part.temperature, part.truncation) for part in parts}
    if len(settings) != 1:
        raise ValueError(f"batches sampled with different temperature / truncation cannot be joined: {settings}")
    temperature, truncation = settings.pop()
    return RolloutBatch(
        prompt_ids=[p for part in parts for p in part.prompt_ids],
        group_index=[g + off for part, off in zip(parts, group_offsets) for g in part.group_index],
        image_tokens=torch.cat([part.image_tokens for part in parts]),  # [B*G, N]
        logprobs=torch.cat([part.logprobs for part in parts]),  # [B*G, N]
        policy_version=min(part.policy_version for part in parts),
        seed=seed,
        temperature=temperature,
        truncation=truncation,
        timings={"generate": max(part.timings.get("generate", 0.0) for part in parts)},
    )
