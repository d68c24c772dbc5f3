"""Who is busy with what: one `Lane` per worker and one for the reward service, shared by every step
in flight (rl/run/in_flight.py), each with the stage clock that finds hangs.

    rollout-0 lane:  [step 4 chunk 0 generate] [step 4 chunk 1 generate] [step 5 chunk 0 generate] ...
                      ^ head: the only task running, the only one timed
    decoder-0 lane:  [step 4 chunk 0 decode (after its tokens)] [step 4 chunk 1 decode] ...
    reward lane:     [step 3 chunk 1 score] [step 4 chunk 0 score] ...   (in the order images appeared)

A synchronous Ray actor runs one caller's tasks in submission order, and one waiting for its input
holds back the later ones: a chunk of step t+1 queued behind step t's on the same worker has not
started, so its clock must not run. One lane per worker for all steps (not one per step) is what
keeps that true when several steps are in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Stage = Literal["rollout", "decode", "reward"]


@dataclass
class StageTask:
    """One submitted stage of one chunk."""

    owner: Any
    """The `PendingStep` the chunk belongs to (a hang is reported to it)."""
    chunk: int
    stage: Stage
    ref: Any
    after: Any = None
    """The upstream result it cannot start without (None: nothing)."""


class Lane:
    """Work that runs one task at a time, in order: a synchronous worker, or the reward service,
    modelled the same way with chunks in the order their images appeared.

    Only the task at the head is running, so only it has a clock: it starts when the driver first
    sees that task able to run (every earlier task done, its input there). A chunk queued behind
    others, or behind a slow reward service, is therefore never timed; and because the driver only
    sees progress when it polls, a clock starts late rather than early (a hang is found a little
    later, never one that is not there)."""

    def __init__(self, actor: Any):
        self.actor = actor
        """The worker (None: the reward service)."""
        self.tasks: list[StageTask] = []
        self.head_since: float | None = None

    def running(self, ready: set, now: float) -> StageTask | None:
        """Drop the finished tasks at the front; the head if it can run (its clock started)."""
        while self.tasks and self.tasks[0].ref in ready:
            self.tasks.pop(0)
            self.head_since = None
        if not self.tasks or (self.tasks[0].after is not None and self.tasks[0].after not in ready):
            return None
        if self.head_since is None:
            self.head_since = now
        return self.tasks[0]

    def refs(self) -> list:
        return [ref for task in self.tasks for ref in (task.ref, task.after) if ref is not None]


def actor_key(actor: Any) -> str:
    return actor._actor_id.hex()


class Lanes:
    """Every worker's lane and the reward service's: one set for the run (the trainer's window), or
    a step's own when it runs alone (tests of one step)."""

    def __init__(self, rollout_actors: list, decoder_actors: list):
        self.workers = {actor_key(a): Lane(a) for a in [*rollout_actors, *decoder_actors]}
        self.reward = Lane(None)

    def of(self, actor: Any) -> Lane:
        return self.workers[actor_key(actor)]

    def all(self) -> list[Lane]:
        return [*self.workers.values(), self.reward]

    def refs(self) -> list:
        return [ref for lane in self.all() for ref in lane.refs()]

    def restart_clocks(self) -> None:
        """After a recovery the driver waited on: time spent waiting for it is not a hang."""
        for lane in self.all():
            lane.head_since = None

    def idle(self) -> bool:
        """No task of any step left on any lane (all done, or the lanes just built)."""
        return not any(lane.tasks for lane in self.all())
