"""The steps in flight: launched, not yet trained, oldest first, sharing one set of lanes
(rl/run/lanes.py); and the rule of when a step is launched, hence which weights it samples with.

With `schedule.max_staleness: k` (async; sync is k = 0), once step t is trained and its weights
published, the steps up to t + 1 + k may be in flight, but never past the next checkpoint or eval step
(a barrier: a checkpoint has nothing in flight after it, an eval uses the workers):

    k = 2, checkpoint every 6          publish v0 (start)  launch 1 2 3      (all sample v0)
                                       train 1, publish v1 launch 4          (samples v1)
                                       train 2, publish v2 launch 5          (v2)
                                       train 3, publish v3 launch 6          (v3; 6 is a barrier)
                                       train 4, 5, 6; checkpoint 6           launch 7 8 9 (v6)

So step s samples with the weights after step j(s) = max(b(s), s - 1 - k), where b(s) is the last
barrier before s (0 at the start), and it is trained by a learner min(s - 1 - b(s), k) steps ahead:
its staleness. The rule depends on the config only, so a run resumed from a barrier's checkpoint
samples every later step with the same weights as the uninterrupted run. A step's rewards are never
waited for before the next steps sample: while step t waits for its judge, steps t + 1 .. t + k sample.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from rl.prompts.sources import SamplerState
from rl.run.lanes import Lanes
from rl.run.pipeline import ChunkFault, PendingStep, drain_steps, poll_steps, ready_refs


def launch_limit(trained: int, max_ahead: int, steps: int, is_barrier: Callable[[int], bool]) -> int:
    """The last step that may be in flight once step `trained` is trained and published:
    min(trained + 1 + max_ahead, steps, the first barrier after `trained`)."""
    limit = min(trained + 1 + max_ahead, steps)
    return next((s for s in range(trained + 1, limit) if is_barrier(s)), limit)


class InFlight:
    """The steps launched and not yet trained, oldest first, and the lanes they share."""

    def __init__(self, lanes: Lanes):
        self.lanes = lanes
        self.steps: deque[PendingStep] = deque()

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last(self) -> int | None:
        """The newest step launched (None: nothing in flight)."""
        return self.steps[-1].step if self.steps else None

    def add(self, pending: PendingStep) -> None:
        if self.steps and pending.step != self.steps[-1].step + 1:
            raise ValueError(f"step {pending.step} launched after step {self.steps[-1].step}: steps go in order")
        self.steps.append(pending)

    def head(self, step: int) -> PendingStep:
        """The oldest step in flight, which must be `step` (the one to train next)."""
        if not self.steps or self.steps[0].step != step:
            raise RuntimeError(f"step {step} is not the oldest step in flight ({[p.step for p in self.steps]})")
        return self.steps[0]

    def pop(self) -> PendingStep:
        """The oldest step, trained: it leaves the window."""
        return self.steps.popleft()

    def find(self, step: int) -> PendingStep:
        return next(p for p in self.steps if p.step == step)

    def earliest_sampler_state(self) -> SamplerState | None:
        """The prompt sampler's state before the oldest step in flight drew its prompts (None: none in
        flight): what a stop gives back, and what a checkpoint records."""
        return self.steps[0].sampler_state if self.steps else None

    def poll(self, stage_timeout_s: float, wait_for: list, wait_s: float = 1.0) -> list[ChunkFault]:
        """Every step at once (`poll_steps`): the faults found, each naming its step."""
        return poll_steps(list(self.steps), self.lanes, stage_timeout_s, wait_for, wait_s)

    def sampled(self) -> bool:
        """Every step's images exist: no task of theirs is left on a worker (rewards may be pending)."""
        ready = ready_refs(list(self.steps), self.lanes)
        return all(p.sampled(ready) for p in self.steps)

    def decode_refs(self) -> list:
        """The open decodes of every step (what waiting for `sampled` waits on)."""
        return [ref for p in self.steps for ref in p.open_refs("decode")]

    def drain(self, stage_timeout_s: float) -> list:
        """Drop every step, once its tasks are waited out (`drain_steps`); the workers that ran one
        past `stage_timeout_s` (hung: the caller restarts them)."""
        busy = drain_steps(list(self.steps), self.lanes, stage_timeout_s) if self.steps else []
        self.steps.clear()
        return busy
