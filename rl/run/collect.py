"""Waiting for a step's dataflow (rl/run/pipeline.py) with the run's fault recovery.

    PendingStep.poll -> [ChunkFault]
      resample          a publish overtook the chunk's tokens: an event, then sampled again (no recovery)
      died, hung,       an event and a `fault:` console line each; hung workers are killed (Ray restarts
      stale_weights     them like dead ones); every worker is brought to the learners' current weights
                        once (Fleet.recover, which proves each one serves them); then the chunks are
                        redone from the stage that failed. A chunk past `faults.max_chunk_attempts`
                        tries ends the run (WorkerFailedError).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rl.run.fleet import Fleet, LogEvent, Versions, WorkerFailedError
from rl.run.pipeline import ChunkFault, PendingStep, ScoredStep

if TYPE_CHECKING:
    from rl.run.config import TrainConfig


def collect(pending: PendingStep, step: int, versions: Versions, fleet: Fleet, config: TrainConfig,
            log_event: LogEvent, check_stop: Callable[[], None]) -> ScoredStep:
    """Wait for step `step`, redoing the chunks of dead, hung or stale workers (and resampling those
    whose tokens a publish overtook); `versions`: what every worker must serve. A stage's own error is
    raised (StageError); `check_stop` is called between polls (it raises to stop the run)."""
    while not pending.done:
        check_stop()
        faults = pending.poll(config.schedule.stage_timeout_s)
        if faults:
            handle_faults(pending, faults, step, versions, fleet, config.faults.max_chunk_attempts, log_event)
    scored = pending.result()
    if scored.retried_requests:
        log_event("reward_retry", f"step {step}: {len(scored.retried_requests)} reward requests failed and were "
                                  f"retried; first: {scored.retried_requests[0][:200]}")
    return scored


def handle_faults(pending: PendingStep, faults: list[ChunkFault], step: int, versions: Versions, fleet: Fleet,
                  max_attempts: int, log_event: LogEvent) -> None:
    """Record the faults, restart hung workers, bring every worker to `versions` once, then redo the chunks."""
    for fault in (f for f in faults if f.kind == "resample"):  # not a failure: no recovery needed
        log_event("resampled", f"step {step}: {fault.describe()}")
        print(f"resample: {fault.describe()}", flush=True)
    failures = [f for f in faults if f.kind != "resample"]
    names = []
    for fault in failures:
        name = fleet.name(fault.actor) if fault.actor is not None else "reward task"
        names.append(f"{name} {fault.kind}")
        log_event("worker_fault", f"step {step}: {name}: {fault.describe()}")
        print(f"fault: {name}: {fault.describe()}", flush=True)
        if fault.attempts >= max_attempts:
            raise WorkerFailedError(f"{fault.describe()}: giving up after faults.max_chunk_attempts = {max_attempts}")
    for actor in {f.actor._actor_id.hex(): f.actor for f in failures if f.kind == "hung" and f.actor}.values():
        fleet.restart(actor)
    if failures:
        fleet.recover(versions, f"step {step}: {', '.join(sorted(set(names)))}")
        pending.restart_stage_clocks()
    for fault in faults:
        pending.redo(fault)
