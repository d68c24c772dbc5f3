"""A pool of AR rollout actors: spreads the captions of a request across them, gathers in order.

Each worker gets a contiguous slice of the captions and the seed its first row would have had in
one big request, so a pool returns the same rows as a single worker (row r sampled with seed + r).
"""

from __future__ import annotations

import ray
import torch

from rollout.ar_worker import ARRolloutActor
from rollout.config import RolloutConfig, SamplingConfig
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
    return RolloutBatch(
        prompt_ids=[p for part in parts for p in part.prompt_ids],
        group_index=[g + off for part, off in zip(parts, group_offsets) for g in part.group_index],
        image_tokens=torch.cat([part.image_tokens for part in parts]),  # [B*G, N]
        logprobs=torch.cat([part.logprobs for part in parts]),  # [B*G, N]
        policy_version=min(part.policy_version for part in parts),
        seed=seed,
        timings={"generate": max(part.timings.get("generate", 0.0) for part in parts)},
    )


class RolloutPool:
    """N `ARRolloutActor`s serving the same policy."""

    def __init__(self, actors: list):
        if not actors:
            raise ValueError("a rollout pool needs at least one worker")
        self.actors = actors

    def generate(
        self, captions: list[str], group_size: int, seed: int, sampling: SamplingConfig | None = None
    ) -> RolloutBatch:
        if not captions:
            raise ValueError("generate needs at least one caption")
        slices = split_evenly(len(captions), len(self.actors))
        refs = [
            actor.generate.remote(captions[start:stop], group_size, seed + start * group_size, sampling)
            for actor, (start, stop) in zip(self.actors, slices)
        ]
        parts = ray.get(refs)
        return concat_batches(parts, [start for start, _ in slices], seed)

    def update_weights(self, version: int, weights: dict[str, torch.Tensor]) -> list[int]:
        """Send one copy of the weights through the object store to every worker; returns the
        version each now serves. A refusal by any worker raises its WeightUpdateError."""
        weights_ref = ray.put(weights)
        return ray.get([actor.update_weights.remote(version, weights_ref) for actor in self.actors])

    def served_versions(self) -> list[int]:
        return ray.get([actor.served_version.remote() for actor in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def start_rollout_workers(config: RolloutConfig, n_workers: int, num_cpus_per_worker: float = 1.0) -> RolloutPool:
    """Start n workers (Ray must be initialised) and wait until every engine is up, so startup
    errors surface here rather than at the first generate."""
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    actors = [ARRolloutActor.options(num_cpus=num_cpus_per_worker).remote(config) for _ in range(n_workers)]
    ray.get([actor.served_version.remote() for actor in actors])
    return RolloutPool(actors)
