"""Joint AR + diffusion RL end to end on CPU: `train: [diffusion]` and `[ar, diffusion]`
runs of the tiny SANA model with the compressibility reward through the real path (vLLM, the SDE
sampler on the decoder worker, the reward API on Ray Serve, both DeepSpeed learners), driven as a
user does (`python -m rl.run.train`, tests/train_support.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from rl.checkpoint import policy_digest
from rl.evaluation.command import load_policy_weights, resolve_eval_model
from rollout.decoder_worker import DiffusionDecoderWorker
from tests.support.chaos import inject_fault
from tests.train_support import REPO, RunningTrain, metric_table, only_run, train, write_config

pytestmark = pytest.mark.slow

JOINT = REPO / "deploy" / "configs" / "tiny-cpu-sana-joint.yaml"
DIFFUSION = REPO / "deploy" / "configs" / "tiny-cpu-sana-diffusion.yaml"


def sana_config(tmp_path: Path, demo: Path, model: Path, **changes) -> Path:
    """A demo config on the session's tiny SANA model, writing under `tmp_path`."""
    raw = yaml.safe_load(demo.read_text())
    raw["model"] = {"path": str(model)}
    raw["logging"] = {"runs_dir": str(tmp_path / "runs"), "samples_per_step": 2}
    return write_config(tmp_path, raw, changes)


def test_diffusion_only_run_learns_survives_a_dead_decoder_and_leaves_the_ar_policy_frozen(tmp_path, tiny_model_dir):
    """[diffusion]: the transformer's version rises every step, the AR policy stays at v0 (no AR
    learner, no AR checkpoint); a decoder killed mid-run comes back with the current transformer
    (recovery republishes that stream); the images become more compressible."""
    steps = 20  # JPEG size falls ~4% by then (measured: first 6 steps -0.007474, steps 15-20 -0.007159)
    config = sana_config(tmp_path, DIFFUSION, tiny_model_dir, steps=steps, **{"checkpoint.every": 100})
    run = RunningTrain(config)
    try:
        run.wait_for("step 3/")
        killed = inject_fault(run.pid, "decoder", "kill", timeout_s=120)
        code = run.finish()
    finally:
        run.kill()
    assert code == 0, run.output[-4000:]
    store, record = only_run(tmp_path / "runs")
    table = metric_table(store, record.id)
    assert sorted(table) == list(range(1, steps + 1))
    assert all(table[s]["policy/version"] == 0 and table[s]["diffusion/version"] == s for s in table)
    assert not any(key.startswith("policy/") and key not in ("policy/version", "policy/staleness")
                   for s in table for key in table[s])  # no AR learner numbers
    # sampler and learner agree at the sampling weights (the first ratio is 1): measured every step
    assert max(table[s]["diffusion/logprob_diff"] for s in table) < 1e-4
    # the killed decoder was restarted and reloaded with the current transformer: the previous step's
    # when a chunk found it dead, the new one when the publish after the update did
    recoveries = [e.message for e in store.events(record.id) if e.kind == "recovered"]
    assert recoveries and "decoder-0 (transformer v0)" in recoveries[0], (killed, recoveries)
    match = re.match(r"step (\d+): (.*): reloaded .*; every worker serves v0, transformer v(\d+)", recoveries[0])
    step, why, version = int(match[1]), match[2], int(match[3])
    assert version == (step if why == "weight publish failed" else step - 1), recoveries[0]
    # a measurable learning signal: JPEG size (reward = -kB / 500) falls
    rewards = [table[s]["reward/mean"] for s in range(1, steps + 1)]
    first, last = float(np.mean(rewards[:6])), float(np.mean(rewards[-6:]))
    print(f"[diffusion] compressibility first 6 steps {first:.6f}, last 6 {last:.6f}; {recoveries[0]}")
    assert last > first + 0.02 * abs(first), rewards
    checkpoint = tmp_path / "runs" / "checkpoints" / record.id / f"step-{steps:06d}"
    assert (checkpoint / "diffusion_learner").is_dir() and (checkpoint / "diffusion_policy").is_dir()
    assert not (checkpoint / "learner").exists() and not (checkpoint / "policy").exists()
    assert policy_digest(checkpoint / "diffusion_policy") != policy_digest(tiny_model_dir / "sana" / "transformer")
    # `blip3o-rl eval` of the run takes the trained transformer (and the AR model as it was)
    model = resolve_eval_model(str(checkpoint.parent))
    assert (model.checkpoint, model.policy_version, model.decoder_version) == (checkpoint, 0, steps)
    decoder = DiffusionDecoderWorker(model.decoder)
    decoder.update_decoder_weights(model.decoder_version, load_policy_weights(checkpoint / "diffusion_policy"))
    assert decoder.served_decoder_version() == steps and decoder.served_version() == 0


def test_joint_run_updates_both_policies_and_resumes_exactly(tmp_path, tiny_model_dir):
    """[ar, diffusion]: both versions rise every step; a run killed right after logging step 4 and
    resumed from its step-3 checkpoint redoes step 4 exactly as it first ran (rewards, both losses,
    both versions: restored weights, optimizers and prompt sampler of both learners), then finishes."""
    steps = 5
    config = sana_config(tmp_path, JOINT, tiny_model_dir, steps=steps, **{"checkpoint.every": 3})
    run = RunningTrain(config)
    try:
        run.wait_for("step 4/")
    finally:
        run.kill()
    store, record = only_run(tmp_path / "runs")
    before = metric_table(store, record.id)
    assert sorted(before) == [1, 2, 3, 4]  # killed before step 5 logged
    resumed = train(config, "--resume")
    assert "steps 4..5" in resumed.stdout
    store, record = only_run(tmp_path / "runs")
    after = metric_table(store, record.id)
    assert record.status == "finished" and sorted(after) == list(range(1, steps + 1))
    assert [after[s]["policy/version"] for s in after] == [after[s]["diffusion/version"] for s in after] \
        == list(range(1, steps + 1))
    # a new process redoes step 4 from bit-identical restored state, so the learners' floats agree to
    # float32 rounding (rel 1e-5: tensors at other addresses may sum in another order). The JPEG
    # reward sees every pixel, so this also needs the decoder to render the same uint8 images: it
    # holds the same weights at the same file offsets and runs 1 thread in both runs
    for key in ("reward/mean", "reward/std", "policy/version", "policy/loss", "policy/entropy", "diffusion/version",
                "diffusion/loss", "diffusion/kl", "diffusion/clip_fraction"):
        assert after[4][key] == pytest.approx(before[4][key], abs=1e-6, rel=1e-5), key
    resumes = [e.message for e in store.events(record.id) if e.kind == "resume"]
    assert any(m.startswith("weights v3, transformer v3 published") for m in resumes), resumes


def test_guard_rollback_restores_both_learners_exactly(tmp_path, tiny_model_dir):
    """A guard rollback in a joint run restores both learners from the step-2 checkpoint (each
    proven by its weights' sha256 against the checkpoint's export), serves them as new versions of
    both streams and halves both learning rates; the rule firing again after the one allowed
    rollback stops the run (exit 5)."""
    guard = {"action": "rollback", "rollback": {"max_rollbacks": 1, "lr_scale": 0.5},
             "rules": [{"kind": "band", "metric": "diffusion/version", "baseline_steps": 2, "tolerance": 1.0,
                        "relative": False}]}  # centre 1.5: fires at step 3 (v3), after the step-2 checkpoint
    config = sana_config(tmp_path, JOINT, tiny_model_dir, steps=4, guard=guard, **{"checkpoint.every": 2})
    run = RunningTrain(config)
    try:
        code = run.finish()
    finally:
        run.kill()
    assert code == 5, run.output[-4000:]
    store, record = only_run(tmp_path / "runs")
    rollback = [e.message for e in store.events(record.id) if e.kind == "rollback"]
    assert len(rollback) == 1 and rollback[0].startswith("rollback 1/1 to step-000002"), rollback
    assert "policy sha256" in rollback[0] and "diffusion_policy sha256" in rollback[0]
    assert "served as v4, transformer v4" in rollback[0] and "lr x0.5 (0.001, 0.0005)" in rollback[0]
    table = metric_table(store, record.id)  # step 3 redone after the rollback: its record replaced
    assert table[3]["policy/version"] == table[3]["diffusion/version"] == 5
    assert table[3]["policy/lr"] == pytest.approx(0.001) and table[3]["diffusion/lr"] == pytest.approx(0.0005)
    assert record.status == "stopped"
