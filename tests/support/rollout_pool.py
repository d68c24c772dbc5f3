"""A pool of AR rollout actors that answers one request with one batch (tests, benchmarks); the
trainer does not use it: its step dataflow (rl/run/pipeline.py) spreads chunks itself."""

from __future__ import annotations

import ray
import torch

from rollout.ar_worker import ARRolloutActor
from rollout.config import RolloutConfig, SamplingConfig
from rollout.pool import concat_batches, split_evenly
from rollout.records import RolloutBatch


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
