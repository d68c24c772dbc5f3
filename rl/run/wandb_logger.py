"""Optional Weights & Biases logging: a copy of the run store's metrics in a W&B run.

The run store stays the record (the dashboard, `--resume` and the TensorBoard export read it);
W&B gets each step's metrics as the store commits them, through the store's metrics listener, so
every writer of metrics (training steps, in-run eval, the guard) reaches W&B through one place.
Keys are the store's (`reward/mean`, `policy/kl`, `eval/...`) and the run id is W&B's run id, so a
resumed run continues the same W&B run. Values that were not measured (absent, NaN) are left out,
as on the dashboard.

Two step axes. A guard rollback (and a `--resume`) redoes steps W&B has already seen, and W&B
drops whatever is logged at a step below its current one. So W&B's own step is a log counter that
only grows (kept in `<run_dir>/wandb/log_count`, so a resumed run continues it), and the training
step is the metric `trainer/step`, declared (`define_metric`) as the x-axis of every other key:
charts are drawn against the training step, and a redone step appears again at its step, beside
the abandoned one, instead of being lost. (W&B's run rewind, `resume_from`, would replace the
abandoned steps instead, but it needs W&B's server: it is a private preview there, and offline
runs cannot use it.)

Config: `logging.wandb: {project: NAME, mode: online|offline}`. Offline runs are written under
`<runs_dir>/<run_id>/wandb/` and uploaded later with `wandb sync DIR`. `wandb` is an optional
dependency: `pip install 'blip3o-rl[wandb]'`.
"""

from __future__ import annotations

import atexit
import math
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from rl.run.config import INSTALL_HINT, WandbSection

if TYPE_CHECKING:
    from rl.run_store import RunStore


class WandbNotInstalledError(ImportError):
    """The config asks for W&B logging and the `wandb` package is not installed."""


def import_wandb() -> ModuleType:
    try:
        import wandb
    except ImportError as error:
        raise WandbNotInstalledError(f"logging.wandb is set but the wandb package is not installed: "
                                     f"{INSTALL_HINT}") from error
    return wandb


STEP_METRIC = "trainer/step"
"""The training step, logged with every record: the x-axis of every chart."""
LOG_COUNT_FILE = "log_count"


class WandbLogger:
    """One W&B run mirroring one run-store run; call it as a store metrics listener."""

    def __init__(self, settings: WandbSection, run_id: str, name: str, config: dict, run_dir: Path):
        wandb = import_wandb()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.run = wandb.init(
            project=settings.project, mode=settings.mode, id=run_id, name=name, config=config,
            dir=str(run_dir), resume="allow",
            # console "off": W&B would otherwise capture this process's console and copy it into the run
            settings=wandb.Settings(console="off", silent=True),
        )
        self.dir = Path(self.run.dir).parent  # .../wandb/<offline-run|run>-<time>-<id>
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)
        self.count_file = run_dir / "wandb" / LOG_COUNT_FILE
        saved = int(self.count_file.read_text()) if self.count_file.is_file() else 0
        self.logged = max(saved, self.run.step)
        """W&B's step of the next record: the records logged to this W&B run so far (by any attempt)."""

    def __call__(self, run_id: str, step: int, metrics: dict[str, float | None]) -> None:
        if run_id != self.run_id:
            return
        finite = {key: value for key, value in metrics.items() if value is not None and math.isfinite(value)}
        if finite:
            self.run.log({**finite, STEP_METRIC: step}, step=self.logged)
            self.logged += 1
            tmp = self.count_file.with_suffix(".tmp")
            tmp.write_text(str(self.logged))
            os.replace(tmp, self.count_file)

    def describe(self, mode: str) -> str:
        """One console line saying where the W&B run is."""
        if mode == "offline":
            return f"W&B (offline): {self.dir}; upload it with `wandb sync {self.dir}`"
        return f"W&B: {self.run.url}"

    def close(self) -> None:
        """Finish the run and wait until W&B has written it (`finish` alone returns before an offline
        run's file is complete). The exit code is the one W&B's hook on sys.exit saw, else 0."""
        self.run.finish()
        import_wandb().teardown()


def attach_wandb(store: RunStore, settings: WandbSection, run_id: str, name: str, config: dict) -> WandbLogger:
    """Open the W&B run of `run_id` (files under `<runs_dir>/<run_id>/`) and mirror the store's
    metrics to it from now on."""
    logger = WandbLogger(settings, run_id, name, config, store.runs_dir / run_id)
    store.add_metrics_listener(logger)
    atexit.register(logger.close)  # runs before W&B's own exit hook (registered earlier): nothing is lost
    return logger


def export_wandb(store: RunStore, run_id: str, settings: WandbSection) -> WandbLogger:
    """Log every step a run has in the store to its W&B run (for a run trained without W&B), then
    finish it. Returns the finished logger (its `dir` holds an offline run)."""
    run = store.get_run(run_id)
    logger = WandbLogger(settings, run_id, run.name, run.config, store.runs_dir / run_id)
    series = store.metrics(run_id)
    for i, step in enumerate(series.steps):
        logger(run_id, step, {key: values[i] for key, values in series.values.items()})
    logger.close()
    return logger
