"""Waiting for the steps in flight (rl/run/in_flight.py) with the run's fault recovery.

    collect       the oldest step, scored (its rewards waited for)
    wait_sampled  every step in flight has its images (before a publish: see `wait_sampled`)
Both poll every step in flight (`poll_steps`), and handle the faults of any of them:
      resample          a publish overtook the chunk's tokens: an event, then sampled again (no recovery)
      died, hung,       an event and a `fault:` console line each; hung workers are killed (Ray restarts
      stale_weights     them like dead ones); every worker is brought to the learners' current weights
                        once (Fleet.recover, which proves each one serves them); then the chunks are
                        redone from the stage that failed, each in its own step. A dead worker fails
                        the queued tasks of every step on it: each of those chunks is redone too.
                        A chunk past `faults.max_chunk_attempts` tries ends the run (WorkerFailedError).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rl.run.fleet import Fleet, LogEvent, Versions, WorkerFailedError
from rl.run.in_flight import InFlight
from rl.run.pipeline import ChunkFault, ScoredStep

if TYPE_CHECKING:
    from rl.run.config import TrainConfig


def collect(window: InFlight, step: int, versions: Versions, fleet: Fleet, config: TrainConfig,
            log_event: LogEvent, check_stop: Callable[[], None]) -> ScoredStep:
    """Wait for step `step` (the oldest in flight), redoing the chunks of dead, hung or stale workers
    (and resampling those whose tokens a publish overtook) of every step in flight; `versions`: what
    every worker must serve. A stage's own error is raised (StageError); `check_stop` is called
    between polls (it raises to stop the run)."""
    pending = window.head(step)
    while not pending.done:
        check_stop()
        faults = window.poll(config.schedule.stage_timeout_s, pending.open_refs("reward"))
        if pending.error is not None:  # a stage's own error or an outage (a later step's waits for its collect)
            raise pending.error
        if faults:
            handle_faults(window, faults, versions, fleet, config.faults.max_chunk_attempts, log_event)
    scored = pending.result()
    if scored.retried_requests:
        log_event("reward_retry", f"step {step}: {len(scored.retried_requests)} reward requests failed and were "
                                  f"retried; first: {scored.retried_requests[0][:200]}")
    return scored


def wait_sampled(window: InFlight, versions: Versions, fleet: Fleet, config: TrainConfig, log_event: LogEvent) -> None:
    """Wait until every step in flight has its images, their faults handled (`versions`: the learners'
    new weights, not published yet: a recovery on the way publishes them).

    Why, before each publish: a worker is a synchronous actor that runs calls in arrival order. A
    publish reaching a rollout worker waits behind the generates queued there anyway; one reaching a
    decoder between a chunk's tokens and its decode would make the decoder serve newer weights than
    the tokens (a resample: the chunk sampled again, and its version no longer the schedule's). So the
    publish waits for the decodes too; the learner itself is not held (its update is done), and the
    wait is at most the sampling of the steps in flight, which the publish could not overtake anyway.
    No stop check here, and a later step's own error (StageError, a reward outage) waits for that
    step's collect: stopping now would find the learner ahead of the last recorded step."""
    while True:
        sampled = window.sampled()  # before the poll: a decode the poll sees done had its faults checked
        faults = window.poll(config.schedule.stage_timeout_s, [] if sampled else window.decode_refs())
        if faults:
            handle_faults(window, faults, versions, fleet, config.faults.max_chunk_attempts, log_event)
        elif sampled:
            return


def handle_faults(window: InFlight, faults: list[ChunkFault], versions: Versions, fleet: Fleet,
                  max_attempts: int, log_event: LogEvent) -> None:
    """Record the faults, restart hung workers, bring every worker to `versions` once, then redo the
    chunks, each in its own step."""
    for fault in (f for f in faults if f.kind == "resample"):  # not a failure: no recovery needed
        log_event("resampled", f"step {fault.step}: {fault.describe()}")
        print(f"resample: step {fault.step} {fault.describe()}", flush=True)
    failures = [f for f in faults if f.kind != "resample"]
    names = []
    for fault in failures:
        name = fleet.name(fault.actor) if fault.actor is not None else "reward task"
        names.append(f"{name} {fault.kind}")
        log_event("worker_fault", f"step {fault.step}: {name}: {fault.describe()}")
        print(f"fault: step {fault.step}: {name}: {fault.describe()}", flush=True)
        if fault.attempts >= max_attempts:
            raise WorkerFailedError(f"{fault.describe()}: giving up after faults.max_chunk_attempts = {max_attempts}")
    for actor in {f.actor._actor_id.hex(): f.actor for f in failures if f.kind == "hung" and f.actor}.values():
        fleet.restart(actor)
    if failures:
        steps = ", ".join(str(s) for s in sorted({f.step for f in failures}))
        fleet.recover(versions, f"step{'s' if ',' in steps else ''} {steps}: {', '.join(sorted(set(names)))}")
        window.lanes.restart_clocks()
    for fault in faults:
        window.find(fault.step).redo(fault)
