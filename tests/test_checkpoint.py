"""Checkpoint folder: atomic commit, latest pointer, pruning, state round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.checkpoint import (
    MANIFEST_FILE,
    CheckpointDir,
    CheckpointError,
    TrainerState,
    check_probes,
    commit_rank_part,
    write_probe,
)
from rl.prompts.sources import SamplerState


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


def deepspeed_like_save(learner: Path, ranks: int) -> None:
    """The files DeepSpeed's ZeRO save writes: per-rank optimizer shards, rank 0's model states and tag."""
    (learner / "learner").mkdir(parents=True, exist_ok=True)
    (learner / "latest").write_text("learner")
    (learner / "learner" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 10)
    for rank in range(ranks):
        (learner / "learner" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * (20 + rank))


def test_the_driver_commits_only_after_every_rank_committed_its_part(tmp_path):
    checkpoints = CheckpointDir(tmp_path / "ckpt")
    tmp = checkpoints.begin(3)
    deepspeed_like_save(tmp / "learner", ranks=2)
    # rank 0 owns the shared files and its shard; rank 1 its shard only
    assert commit_rank_part(tmp / "learner", 0) == {"latest": 7, "learner/mp_rank_00_model_states.pt": 10,
                                                    "learner/zero_pp_rank_0_mp_rank_00_optim_states.pt": 20}
    with pytest.raises(CheckpointError, match=r"rank 1 committed no part"):
        checkpoints.commit(tmp, TrainerState(3, 3, "r"), learner_ranks=2)
    assert checkpoints.latest() is None
    assert commit_rank_part(tmp / "learner", 1) == {"learner/zero_pp_rank_1_mp_rank_00_optim_states.pt": 21}
    # a shard that changed after its rank committed (or is not fully visible here) is refused
    shard = tmp / "learner" / "learner" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"o" * 5)
    with pytest.raises(CheckpointError, match=r"rank 1: learner/zero_pp_rank_1_mp_rank_00_optim_states.pt is a "
                                              r"different size"):
        checkpoints.commit(tmp, TrainerState(3, 3, "r"), learner_ranks=2)
    commit_rank_part(tmp / "learner", 1)  # rank 1 saves again and commits what it wrote: 5 bytes
    path = checkpoints.commit(tmp, TrainerState(3, 3, "r"), learner_ranks=2)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["learner_ranks"] == 2 and manifest["files"]["learner/learner/zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 5
    assert "learner/parts/rank-1.json" in manifest["files"] and "trainer.json" in manifest["files"]
    assert checkpoints.latest() == path


def test_resume_refuses_a_checkpoint_that_lost_a_file(tmp_path):
    checkpoints = CheckpointDir(tmp_path / "ckpt")
    tmp = checkpoints.begin(1)
    deepspeed_like_save(tmp / "learner", ranks=1)
    commit_rank_part(tmp / "learner", 0)
    path = checkpoints.commit(tmp, TrainerState(1, 1, "r"), learner_ranks=1)
    (path / "learner" / "learner" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"is damaged: 1 files missing or changed"):
        checkpoints.latest()


def test_the_shared_folder_is_proven_by_reading_each_ranks_probe(tmp_path):
    root, elsewhere = tmp_path / "ckpt", tmp_path / "node-b-local-disk"
    hosts = [write_probe(root, 0, "n1"), write_probe(root, 1, "n1")]
    check_probes(root, hosts, "n1")
    assert not list(root.glob(".probe-*"))  # cleaned up
    # rank 1's node has its own disk at that path: the driver never sees its file
    hosts = [write_probe(root, 0, "n2"), write_probe(elsewhere, 1, "n2")]
    with pytest.raises(CheckpointError, match=rf"cannot see the files written there by rank 1 on {hosts[1]}"):
        check_probes(root, hosts, "n2")
