"""One step's rollouts as a Ray dataflow: sample -> decode -> score, pipelined per chunk of prompts.

    chunk 0:  generate(worker a) --> decode(decoder a) --> score (Ray task -> reward API)
    chunk 1:  generate(worker b) --> decode(decoder b) --> score
    ...
Each arrow passes an ObjectRef, so a chunk's decoding starts the moment its tokens exist, while
other chunks are still sampling; the driver only blocks in `PendingStep.collect`.
Row r of chunk c is sampled with seed step_seed + (first row of c) + r: the same rows as one big
request, whatever the chunking or the number of workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from rl.prompts import PromptItem
from rl.scoring import RewardEndpoint, SampleReward, score_images
from rollout.pool import concat_batches
from rollout.records import DecodedImages, RolloutBatch


class StageTimeoutError(TimeoutError):
    """A step's rollouts, images or rewards did not arrive in time."""


@dataclass
class ScoredStep:
    """Everything a step sampled, rendered and scored, row for row."""

    items: list[PromptItem]
    """One per group (prompt)."""
    batch: RolloutBatch
    images: np.ndarray
    """[R, H, W, 3] uint8."""
    rewards: list[SampleReward]
    timings: dict[str, float]
    """Busy seconds per stage summed over chunks (rollout, decode, reward) and the wall time (collect)."""

    def reward_tensor(self) -> torch.Tensor:
        return torch.tensor([r.reward for r in self.rewards], dtype=torch.float32)  # [R]


def _score_task(endpoint: RewardEndpoint, decoded: DecodedImages, items: list[PromptItem]) -> tuple[list[SampleReward], float]:
    start = time.perf_counter()
    return score_images(endpoint, decoded.images, items), time.perf_counter() - start


_REMOTE_SCORE = None


def _remote_score_task():
    """The scoring Ray task, registered once per driver (no CPU reserved: it waits on HTTP)."""
    global _REMOTE_SCORE
    if _REMOTE_SCORE is None:
        import ray

        _REMOTE_SCORE = ray.remote(num_cpus=0)(_score_task)
    return _REMOTE_SCORE


@dataclass
class PendingStep:
    items: list[PromptItem]
    rollout_refs: list
    decode_refs: list
    score_refs: list
    chunk_starts: list[int]
    seed: int
    launched_at: float

    def collect(self, timeout_s: float) -> ScoredStep:
        """Wait for every chunk; a chunk that does not finish in time fails the step with a message."""
        import ray

        refs = self.rollout_refs + self.decode_refs + self.score_refs
        ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if not_ready:
            raise StageTimeoutError(f"{len(not_ready)} of {len(refs)} rollout/decode/score tasks unfinished after {timeout_s:.0f} s")
        parts: list[RolloutBatch] = ray.get(self.rollout_refs)
        decoded: list[DecodedImages] = ray.get(self.decode_refs)
        scored = ray.get(self.score_refs)
        batch = concat_batches(parts, self.chunk_starts, self.seed)
        images = np.concatenate([d.images for d in decoded])  # [R, H, W, 3]
        rewards = [r for chunk_rewards, _ in scored for r in chunk_rewards]
        timings = {
            "rollout": sum(p.timings.get("generate", 0.0) for p in parts),
            "decode": sum(sum(d.timings.values()) for d in decoded),
            "reward": sum(seconds for _, seconds in scored),
            "collect": time.perf_counter() - self.launched_at,
        }
        return ScoredStep(self.items, batch, images, rewards, timings)


def launch_step(
    items: list[PromptItem],
    group_size: int,
    seed: int,
    rollout_actors: list,
    decoder_actors: list,
    endpoint: RewardEndpoint,
    chunk_prompts: int,
) -> PendingStep:
    """Submit the whole dataflow of one step and return at once."""
    score = _remote_score_task()
    rollout_refs, decode_refs, score_refs, starts = [], [], [], []
    for chunk, start in enumerate(range(0, len(items), chunk_prompts)):
        chunk_items = items[start : start + chunk_prompts]
        chunk_seed = seed + start * group_size
        sampler = rollout_actors[chunk % len(rollout_actors)]
        decoder = decoder_actors[chunk % len(decoder_actors)]
        rollout_ref = sampler.generate.remote([item.caption for item in chunk_items], group_size, chunk_seed)
        decode_ref = decoder.decode.remote(rollout_ref, chunk_seed)
        row_items = [item for item in chunk_items for _ in range(group_size)]
        score_refs.append(score.remote(endpoint, decode_ref, row_items))
        rollout_refs.append(rollout_ref)
        decode_refs.append(decode_ref)
        starts.append(start)
    return PendingStep(items, rollout_refs, decode_refs, score_refs, starts, seed, time.perf_counter())
