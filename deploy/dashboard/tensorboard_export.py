"""Export a run's metrics from the run store to TensorBoard event files (for people who live there).

A snapshot, not a live mirror: run it again to pick up new steps (it rewrites the event file).
Uses torch's `SummaryWriter` (classic scalar events, read by every TensorBoard version).
"""

from __future__ import annotations

from pathlib import Path

from rl.run_store import RunStore


def export_tensorboard(store: RunStore, run_id: str, log_dir: str | Path) -> Path:
    """Write every finite metric of `run_id` to `<log_dir>/<run_id>/`; returns that directory."""
    store.get_run(run_id)  # an unknown id fails here, before the slow import
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(log_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("events.out.tfevents.*"):  # a rerun replaces the snapshot, never doubles it
        old.unlink()
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        for step, key, value, wall_time in store.scalars(run_id):
            writer.add_scalar(key, value, global_step=step, walltime=wall_time)
    finally:
        writer.close()
    return run_dir
