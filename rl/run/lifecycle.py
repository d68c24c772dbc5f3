"""How a run begins (a new one in the store, or one resumed at its last checkpoint) and how it ends
before its last step: the errors that stop it, and each one's run status and exit code.

    error (raised in the loop)      status    exit   the run store's reason
    StopRequested (SIGTERM, Ctrl-C) stopped   0      stop requested (SIGTERM)
    RewardOutageError               stopped   3      reward service down for longer than rewards.outage_budget_s
    WorkerFailedError               failed    4      worker failure: ...
    GuardTripped                    stopped   5      reward-hacking guard: ...
    anything else                   failed    4      error: Type: first line (a stage's own error, a
                                                     learner error, a bug)
The trainer checkpoints the finished steps first, then raises RunStopped (rl/run/trainer.py `_stop`).
"""

from __future__ import annotations

from pathlib import Path

from rl.checkpoint import CheckpointDir, CheckpointError, TrainerState
from rl.guard.rollback import GuardTripped
from rl.prompts.sources import SamplerState
from rl.run.config import ConfigError, TrainConfig
from rl.run.fleet import WorkerFailedError
from rl.run.pipeline import RewardOutageError
from rl.run_store import RunStore


class StopRequested(Exception):
    """SIGTERM / Ctrl-C asked the run to stop."""


class RunStopped(Exception):
    """The run stopped before its last step, after checkpointing what it finished."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
        """0: a stop someone asked for (SIGTERM / Ctrl-C); 3: reward outage; 4: a failure (a worker
        that cannot come back, a stage's own error, any other error in the loop); 5: the
        reward-hacking guard stopped it (config `guard`)."""


def one_line(error: BaseException) -> str:
    """`Type: first line` of an error, its cause's if Ray wrapped it (what the run store records)."""
    from ray.exceptions import RayTaskError

    cause = (error.cause or error) if isinstance(error, RayTaskError) else error
    text = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{type(cause).__name__}: {text}" if not text.startswith(type(cause).__name__) else text


STOPS = (StopRequested, RewardOutageError, WorkerFailedError, GuardTripped)
"""The errors that are an expected way for a run to stop (anything else also prints its traceback)."""


def stop_of(error: Exception, outage_budget_s: float) -> tuple[str, str, int]:
    """(reason, run status, exit code) of the error that ended the loop."""
    if isinstance(error, StopRequested):
        return f"stop requested ({error})", "stopped", 0
    if isinstance(error, RewardOutageError):
        return (f"reward service down for longer than rewards.outage_budget_s ({outage_budget_s:.0f} s): {error}",
                "stopped", 3)
    if isinstance(error, WorkerFailedError):
        return f"worker failure: {error}", "failed", 4
    if isinstance(error, GuardTripped):
        return f"reward-hacking guard: {error}", "stopped", 5
    return f"error: {one_line(error)}", "failed", 4  # a stage's own error (StageError), a learner error, a bug


def open_run(config: TrainConfig, store: RunStore, resume: str | None) -> tuple[str, TrainerState, Path | None]:
    """(run id, state, checkpoint to resume from): a new run in the store, or run `resume` ("latest":
    the newest of this name) at its last complete checkpoint (ConfigError if it has none)."""
    if resume is None:
        run_id = store.create_run(config.name, config.model_dump(mode="json"))
        fresh = SamplerState(cursors=[0] * len(config.data.sources))
        learner, diffusion = config.learner, config.diffusion_learner
        return run_id, TrainerState(0, learner.initial_version if learner else 0, run_id, fresh,
                                    diffusion.initial_version if diffusion else 0), None
    if resume == "latest":
        runs = [r for r in store.list_runs() if r.name == config.name]
        if not runs:
            raise ConfigError(f"no earlier run named '{config.name}' in {config.logging.runs_dir} to resume")
        resume = max(runs, key=lambda r: r.started_at).id
    try:
        checkpoint = CheckpointDir(Path(config.logging.runs_dir) / "checkpoints" / resume).latest()
    except CheckpointError as error:
        raise ConfigError(f"run '{resume}' cannot be resumed: {error}") from None
    if checkpoint is None:
        raise ConfigError(f"run '{resume}' has no complete checkpoint to resume from")
    state = CheckpointDir(checkpoint.parent).load_state(checkpoint)
    store.resume_run(resume, state.step)
    return resume, state, checkpoint
