"""One step's rollouts as a Ray dataflow: sample -> decode -> score, pipelined per chunk of prompts.

    chunk 0:  generate(worker a) --> decode(decoder a) --> score (Ray task -> reward API)
    chunk 1:  generate(worker b) --> decode(decoder b) --> score
    ...
Each arrow passes an ObjectRef, so a chunk's decoding starts the moment its tokens exist, while
other chunks are still sampling; the driver only polls.
Row r of chunk c is sampled with seed step_seed + (first row of c) + r: the same rows as one big
request, whatever the chunking or the number of workers.

Faults are found per chunk by `PendingStep.poll`:
  died          the worker's process is gone (Ray restarts it, with the weights on disk);
  hung          the chunk has been at one stage for longer than the stage timeout;
  stale_weights a worker answered with weights older than those the chunk was launched with
                (a restarted worker that has not been given the current weights yet).
The caller brings the workers back to the current weights and calls `redo`, which submits the chunk
again from the failed stage. Same seed, same weights: redone work is the same work, nothing is lost.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from rl.prompts import PromptItem, SamplerState
from rl.scoring import RewardEndpoint, SampleReward, ScoredImages, score_images
from rollout.pool import concat_batches
from rollout.records import DecodedImages, RolloutBatch


class RewardOutageError(RuntimeError):
    """The reward service stayed down for longer than the outage budget."""


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
    retried_requests: list[str] = field(default_factory=list)
    """Reward requests that failed and were retried (replica restarts, blips)."""

    def reward_tensor(self) -> torch.Tensor:
        return torch.tensor([r.reward for r in self.rewards], dtype=torch.float32)  # [R]


_REMOTE_SCORE = None


def _remote_score_task():
    """The scoring Ray task, registered once per driver (no CPU reserved: it waits on HTTP)."""
    global _REMOTE_SCORE
    if _REMOTE_SCORE is None:
        import ray

        def score(endpoint: RewardEndpoint, decoded: DecodedImages, items: list[PromptItem]) -> ScoredImages:
            return score_images(endpoint, decoded.images, items)

        _REMOTE_SCORE = ray.remote(num_cpus=0, max_retries=3)(score)  # retried if its process crashes
    return _REMOTE_SCORE


Stage = Literal["rollout", "decode", "reward"]


@dataclass
class Chunk:
    """A few prompts' groups on their way through one sampler and one decoder."""

    index: int
    start: int
    """Index of the chunk's first prompt in the step."""
    items: list[PromptItem]
    seed: int
    sampler: Any
    """ARRolloutActor handle."""
    decoder: Any
    """DiffusionDecoderActor handle."""
    launched_version: int
    """The policy version every worker served when the chunk was submitted."""
    rollout_ref: Any = None
    decode_ref: Any = None
    score_ref: Any = None
    stage_started_at: float = 0.0
    attempts: int = 0
    result: tuple[RolloutBatch, DecodedImages, ScoredImages] | None = None


@dataclass(frozen=True)
class ChunkFault:
    chunk: int
    stage: Stage
    kind: Literal["died", "hung", "stale_weights"]
    detail: str
    actor: Any
    """The worker at fault (None for the reward stage)."""
    attempts: int
    """Tries of this chunk so far."""

    def describe(self) -> str:
        return f"chunk {self.chunk} {self.stage}: worker {self.kind} ({self.detail}); try {self.attempts} failed"


class PendingStep:
    """A step whose chunks are in flight; `poll` until `done`, then `result`."""

    def __init__(self, items: list[PromptItem], group_size: int, seed: int, rollout_actors: list,
                 decoder_actors: list, endpoint: RewardEndpoint, chunk_prompts: int, policy_version: int,
                 sampler_state: SamplerState):
        self.items, self.group_size, self.seed, self.endpoint = items, group_size, seed, endpoint
        self.sampler_state = copy.deepcopy(sampler_state)
        """The prompt sampler's state before this step drew its prompts (to give them back if it is abandoned)."""
        self.launched_at = time.perf_counter()
        self.chunks = [
            Chunk(index=c, start=start, items=items[start : start + chunk_prompts], seed=seed + start * group_size,
                  sampler=rollout_actors[c % len(rollout_actors)], decoder=decoder_actors[c % len(decoder_actors)],
                  launched_version=policy_version)
            for c, start in enumerate(range(0, len(items), chunk_prompts))
        ]
        for chunk in self.chunks:
            self._submit(chunk, "rollout")

    def _submit(self, chunk: Chunk, stage: Stage) -> None:
        """(Re)submit `chunk` from `stage` on: later stages chain on the earlier refs."""
        if stage == "rollout":
            captions = [item.caption for item in chunk.items]
            chunk.rollout_ref = chunk.sampler.generate.remote(captions, self.group_size, chunk.seed)
        if stage in ("rollout", "decode"):
            chunk.decode_ref = chunk.decoder.decode.remote(chunk.rollout_ref, chunk.seed)
        row_items = [item for item in chunk.items for _ in range(self.group_size)]
        chunk.score_ref = _remote_score_task().remote(self.endpoint, chunk.decode_ref, row_items)
        chunk.stage_started_at = time.perf_counter()
        chunk.attempts += 1

    @property
    def done(self) -> bool:
        return all(chunk.result is not None for chunk in self.chunks)

    def poll(self, stage_timeout_s: float, wait_s: float = 1.0) -> list[ChunkFault]:
        """Wait up to `wait_s` for progress; returns the faults found (each chunk at most one).
        Raises RewardOutageError when the reward service stayed down past its budget, and a worker's
        own error (bad input, a bug) as it is: those are not fixed by trying again."""
        import ray

        open_chunks = [chunk for chunk in self.chunks if chunk.result is None]
        if open_chunks:
            ray.wait([chunk.score_ref for chunk in open_chunks], num_returns=len(open_chunks), timeout=wait_s)
        faults = [self._check(chunk, stage_timeout_s) for chunk in open_chunks]
        return [fault for fault in faults if fault is not None]

    def _check(self, chunk: Chunk, stage_timeout_s: float) -> ChunkFault | None:
        import ray
        from ray.exceptions import RayActorError

        from rewards.client import RewardServerError

        def fault(stage: Stage, kind, detail: str, actor) -> ChunkFault:
            return ChunkFault(chunk.index, stage, kind, detail, actor, chunk.attempts)

        busy_for = time.perf_counter() - chunk.stage_started_at
        values = []
        stages = (("rollout", chunk.rollout_ref, chunk.sampler), ("decode", chunk.decode_ref, chunk.decoder))
        for stage, ref, actor in stages:
            if not ray.wait([ref], timeout=0)[0]:
                if busy_for > stage_timeout_s:
                    return fault(stage, "hung", f"no answer after {busy_for:.0f} s", actor)
                return None
            try:
                value = ray.get(ref)
            except RayActorError as error:
                return fault(stage, "died", str(error).splitlines()[0][:200], actor)
            if value.policy_version < chunk.launched_version:
                return fault(stage, "stale_weights", f"served v{value.policy_version}, launched at "
                                                     f"v{chunk.launched_version}", actor)
            values.append(value)
        if not ray.wait([chunk.score_ref], timeout=0)[0]:
            if busy_for > stage_timeout_s:
                ray.cancel(chunk.score_ref, force=True)
                return fault("reward", "hung", f"no rewards after {busy_for:.0f} s", None)
            return None
        try:
            scored: ScoredImages = ray.get(chunk.score_ref)
        except RewardServerError as error:  # Ray re-raises the task's error as a subclass of it
            raise RewardOutageError(str(getattr(error, "cause", None) or error).strip().splitlines()[-1]) from None
        chunk.result = (values[0], values[1], scored)
        return None

    def restart_stage_clocks(self) -> None:
        """After a recovery the driver waited on: time spent waiting for it is not a hang."""
        now = time.perf_counter()
        for chunk in self.chunks:
            chunk.stage_started_at = now

    def redo(self, fault: ChunkFault) -> None:
        """Submit the faulty chunk again from the failed stage (the workers must serve current weights)."""
        chunk = self.chunks[fault.chunk]
        chunk.result = None
        self._submit(chunk, fault.stage)

    def result(self) -> ScoredStep:
        """The step, row for row in prompt order; every row of every chunk, or an error."""
        if not self.done:
            raise RuntimeError("result() before every chunk finished")
        parts = [chunk.result[0] for chunk in self.chunks]
        decoded = [chunk.result[1] for chunk in self.chunks]
        scored = [chunk.result[2] for chunk in self.chunks]
        batch = concat_batches(parts, [chunk.start for chunk in self.chunks], self.seed)
        images = np.concatenate([d.images for d in decoded])  # [R, H, W, 3]
        rewards = [r for s in scored for r in s.rewards]
        rows = len(self.items) * self.group_size
        if not (len(batch.prompt_ids) == len(images) == len(rewards) == rows):
            raise RuntimeError(f"step lost rows: {len(batch.prompt_ids)} rollouts, {len(images)} images, "
                               f"{len(rewards)} rewards for {rows} rows")
        timings = {
            "rollout": sum(p.timings.get("generate", 0.0) for p in parts),
            "decode": sum(sum(d.timings.values()) for d in decoded),
            "reward": sum(s.seconds for s in scored),
            "collect": time.perf_counter() - self.launched_at,
        }
        retried = [failure for s in scored for failure in s.failures]
        return ScoredStep(self.items, batch, images, rewards, timings, retried)
