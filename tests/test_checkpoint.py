"""Checkpoint folder: atomic commit, latest pointer, pruning, state round trip."""

from __future__ import annotations

from rl.checkpoint import CheckpointDir, TrainerState
from rl.prompts import SamplerState


def test_commit_round_trip_and_latest(tmp_path):
    checkpoints = CheckpointDir(tmp_path / "ckpt", keep_last=2)
    assert checkpoints.latest() is None
    for step in (2, 4, 6):
        tmp = checkpoints.begin(step)
        (tmp / "learner").mkdir()
        state = TrainerState(step=step, policy_version=step, run_id="r1", sampler=SamplerState(step=step, cursors=[step * 3]))
        checkpoints.commit(tmp, state)
    latest = checkpoints.latest()
    assert latest == tmp_path / "ckpt" / "step-000006"
    assert checkpoints.load_state(latest) == TrainerState(6, 6, "r1", SamplerState(6, [18]))
    # only the last two complete checkpoints are kept
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-000004", "step-000006"]


def test_interrupted_save_keeps_previous_latest(tmp_path):
    checkpoints = CheckpointDir(tmp_path / "ckpt")
    checkpoints.commit(checkpoints.begin(1), TrainerState(1, 1, "r"))
    half_written = checkpoints.begin(2)  # killed before commit
    (half_written / "learner").mkdir()
    assert checkpoints.latest().name == "step-000001"
    # a retried save of the same step starts clean
    assert not any(checkpoints.begin(2).iterdir())
