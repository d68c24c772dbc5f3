"""The GRPO run end to end on CPU: real vLLM, Ray (+ Serve), DeepSpeed, the glyph decoder, real OCR.

Each test runs the driver as a user does (`python -m rl.run.train --config ...`) in a subprocess with
its own local Ray cluster, and reads the results back from the run store.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from rewards.local_server import free_port
from tests.train_support import (
    REPO,
    RunningTrain,
    metric_table,
    only_run,
    small_config,
    train,
)

pytestmark = pytest.mark.slow


def test_glyph_ocr_run_learns(tmp_path, glyph_model_dir):
    steps = 24
    config = small_config(tmp_path, glyph_model_dir, steps=steps, **{"checkpoint.every": 100})
    result = train(config)
    store, run = only_run(tmp_path / "runs")
    assert run.status == "finished"
    table = metric_table(store, run.id)
    assert sorted(table) == list(range(1, steps + 1))  # every step exactly once
    rewards = [table[step]["reward/mean"] for step in range(1, steps + 1)]
    first, last = float(np.mean(rewards[:6])), float(np.mean(rewards[-6:]))
    print(f"mean reward first 6 steps {first:.3f}, last 6 steps {last:.3f}")
    assert last > first + 0.05, rewards
    # the sync schedule trains on fresh rollouts only; versions advance with every real update
    assert all(table[s]["policy/staleness"] == 0 for s in table)
    assert table[steps]["policy/version"] > 0
    # ... so every update measures the learner against vLLM at the sampling weights: fp32 agrees to
    # float rounding (policy/logprob_diff, max over the step's tokens), far below the run alarm's 0.05
    gaps = [table[s]["policy/logprob_diff"] for s in table if "policy/loss" in table[s]]
    print(f"max |learner - vLLM| token log-prob over the run: {max(gaps):.2e}")
    assert len(gaps) == sum("policy/loss" in table[s] for s in table) and max(gaps) < 1e-3
    assert "alarm" not in [e.kind for e in store.events(run.id)]
    # progress lines a person can follow, and the samples behind the numbers
    assert f"step {steps}/{steps} | reward" in result.stdout
    # a quiet console: no worker output (vLLM, Serve, learner) and no INFO lines; it names the folder
    # under the run directory where the worker logs are
    console = result.stdout + result.stderr
    assert not re.search(r"\(\w[\w:]* pid=\d+\)|\bINFO\b", console), console[-3000:]
    logs = Path(re.search(r"^worker logs: (\S+)", result.stdout, re.M)[1])
    assert logs.parent == tmp_path / "runs" / run.id / "logs"
    # rglob: Ray's log monitor moves an exited worker's files to old/ when it closes its files
    assert any("Resolved architecture" in f.read_text(errors="replace") for f in logs.rglob("worker-*.out"))
    samples = store.samples(run.id, steps)
    [word] = yaml.safe_load(config.read_text())["data"]["sources"][0]["words"]  # the demo's one word
    assert len(samples) == 2 and all(s.prompt == f'an image with the text "{word}"' for s in samples)
    # the final checkpoint's policy is a Hugging Face dir vLLM and transformers load
    policy = next((tmp_path / "runs" / "checkpoints" / run.id).glob("step-*")) / "policy"
    assert (policy / "config.json").is_file() and (policy / "tokenizer.json").is_file()


def test_async_schedule_learns_with_bounded_staleness(tmp_path, glyph_model_dir):
    steps = 24
    config = small_config(tmp_path, glyph_model_dir, steps=steps, **{"schedule.mode": "async", "checkpoint.every": 100})
    train(config)
    store, run = only_run(tmp_path / "runs")
    table = metric_table(store, run.id)
    staleness = [table[s]["policy/staleness"] for s in sorted(table)]
    assert max(staleness) <= 1 and staleness.count(1) >= steps // 2, staleness
    # the learner is a version ahead of stale rollouts: their log-prob gap is not an agreement measure
    assert not any("policy/logprob_diff" in table[s] for s in table if table[s]["policy/staleness"] == 1)
    rewards = [table[s]["reward/mean"] for s in sorted(table)]
    first, last = float(np.mean(rewards[:6])), float(np.mean(rewards[-6:]))
    print(f"async: mean reward first 6 steps {first:.3f}, last 6 steps {last:.3f}")
    assert last > first + 0.05, rewards


def run_until_killed(config: Path, kill_after_step: int) -> None:
    """Start a run and SIGKILL the driver (and its Ray cluster) as soon as it printed `kill_after_step`."""
    run = RunningTrain(config)
    try:
        run.wait_for(f"step {kill_after_step}/")
    finally:
        run.kill()


def test_killed_run_resumes_exactly(tmp_path, glyph_model_dir):
    """A run SIGKILLed right after logging step 4 and resumed from its step-3 checkpoint redoes
    step 4 exactly as it first ran (rewards, loss, version, the prompts sampled), then finishes.
    One run against itself: equal numbers need the trained weights, the optimizer state and the
    prompt sampler restored."""
    steps = 5
    # 4 prompts x 16 samples: with seed 0 the policy takes its first update before the step-3
    # checkpoint, so the resumed run must restore trained weights and optimizer state
    config = small_config(tmp_path, glyph_model_dir, **{"steps": steps, "checkpoint.every": 3,
                                                        "data.prompts_per_step": 4})
    run_until_killed(config, kill_after_step=4)  # the last checkpoint is step 3
    store, record = only_run(tmp_path / "runs")
    before = metric_table(store, record.id)
    assert sorted(before) == [1, 2, 3, 4]
    prompts_before = [s.prompt for s in store.samples(record.id, 4)]
    resumed = train(config, "--resume")
    assert "steps 4..5" in resumed.stdout

    store, record = only_run(tmp_path / "runs")
    assert record.status == "finished"
    after = metric_table(store, record.id)
    assert sorted(after) == list(range(1, steps + 1))  # step 4 was logged twice, stored once
    assert before[3]["policy/version"] >= 1 and after[steps]["policy/version"] > before[3]["policy/version"]
    # the redone step runs in a new process: weights, optimizer state and sampler come back bit for
    # bit, but CPU kernels may sum in another order there (tensors at other addresses), so the
    # learner's floats agree to float32 rounding (rel 1e-5); the rewards are exact functions of the
    # sampled tokens, which a rounding difference flips only at a near-tie of two sampled logits.
    # A resume that lost any of the restored state samples other tokens: these numbers move by far more.
    for key in ("reward/mean", "reward/std", "policy/version", "policy/loss", "policy/entropy"):
        assert after[4].get(key, "absent") == pytest.approx(before[4].get(key, "absent"), rel=1e-5, abs=1e-6), key
    assert [s.prompt for s in store.samples(record.id, 4)] == prompts_before
    assert "resume" in [e.kind for e in store.events(record.id)]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on ports of its own, with Ray's token auth; yields (address, env)
    once its job API and job agent answer."""
    venv_bin = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{venv_bin}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    if not (Path.home() / ".ray" / "auth_token").is_file() and "RAY_AUTH_TOKEN" not in env:
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # a fresh machine has no token file: the cluster's own
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"rayjob{os.getpid()}"
    # every port of our own: another Ray on the machine (the session fixture, a run's local cluster)
    # holds the defaults, and a head whose job agent cannot bind answers "No available agent"
    own_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "ray-client-server-port", "runtime-env-agent-port")]
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--temp-dir", str(temp_dir),
         "--include-dashboard", "true", *own_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 180
        while True:  # the job API answers once the dashboard is up
            probe = subprocess.run(["ray", "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert time.time() < deadline, probe.stderr[-2000:]
            time.sleep(3)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # stops the cluster this test started, and only it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def submit_job(address: str, env: dict, config: Path, *flags: str, repo: Path = REPO) -> tuple[str, str]:
    """`repo`/deploy/ray_job.sh CONFIG [flags] against `address`: (submission id, output)."""
    for _ in range(20):  # the job agent comes up a little after the job API answers
        submitted = subprocess.run([str(repo / "deploy" / "ray_job.sh"), str(config), *flags],
                                   env=dict(env, RAY_ADDRESS=address), cwd=repo, capture_output=True, text=True,
                                   timeout=900)
        output = submitted.stdout + submitted.stderr
        if "No available agent to submit job" not in output:
            break
        time.sleep(3)
    job_ids = re.findall(r"Job '(raysubmit_\w+)' (?:submitted|succeeded)", output)
    assert job_ids, output[-4000:]
    return job_ids[-1], output


def job_status(address: str, env: dict, job_id: str) -> str:
    status = subprocess.run(["ray", "job", "status", "--address", address, job_id], env=env,
                            capture_output=True, text=True, timeout=120)
    return status.stdout + status.stderr


def test_ray_job_submit_to_a_local_head_succeeds(tmp_path, glyph_model_dir, ray_head):
    """deploy/ray_job.sh (`ray job submit` with Ray's token auth) to a `ray start --head` cluster."""
    address, env = ray_head
    config = small_config(tmp_path, glyph_model_dir, steps=2, **{"checkpoint.every": 100})
    job_id, output = submit_job(address, env, config)
    # the CLI's own exit code is not reliable here (it streams logs, then may exit 1 after the
    # job ended); the job's status is what counts. `ray job status` renders SUCCEEDED as "succeeded"
    assert f"Job '{job_id}' succeeded" in job_status(address, env, job_id)
    assert "step 2/2 | reward" in output
    store, run = only_run(tmp_path / "runs")
    assert run.status == "finished" and sorted(metric_table(store, run.id)) == [1, 2]


def test_ray_job_stop_checkpoints_and_marks_the_run_stopped(tmp_path, glyph_model_dir, ray_head):
    address, env = ray_head
    config = small_config(tmp_path, glyph_model_dir, steps=500, **{"checkpoint.every": 1000})
    job_id, _ = submit_job(address, env, config, "--no-wait")
    deadline = time.time() + 600
    while "step 2/" not in (logs := subprocess.run(["ray", "job", "logs", "--address", address, job_id], env=env,
                                                   capture_output=True, text=True).stdout):
        assert time.time() < deadline and "finished" not in logs, logs[-3000:]
        time.sleep(2)
    subprocess.run(["ray", "job", "stop", "--address", address, job_id], env=env, capture_output=True, timeout=700)
    deadline = time.time() + 300
    while "stopped" not in (status := job_status(address, env, job_id)).lower():
        assert time.time() < deadline, status
        time.sleep(2)
    store, run = only_run(tmp_path / "runs")
    assert run.status == "stopped", store.events(run.id)
    done = sorted(metric_table(store, run.id))
    checkpoints = sorted((tmp_path / "runs" / "checkpoints" / run.id).glob("step-*"))
    assert checkpoints and checkpoints[-1].name == f"step-{done[-1]:06d}"  # saved before Ray's SIGKILL


def test_tiny_sana_config_runs_the_full_real_path(tmp_path):
    """tiny-cpu-sana.yaml: Qwen3 -> connector -> tiny SANA + DC-AE -> GenEval (tiny Mask2Former +
    CLIP) and OCR through Ray Serve -> GRPO with a KL reference, building its tiny models itself."""
    raw = yaml.safe_load((REPO / "deploy" / "configs" / "tiny-cpu-sana.yaml").read_text())
    raw["model"]["path"] = str(tmp_path / "models" / "tiny-sana")
    raw["rewards"]["server"]["geneval"] = {"detector": str(tmp_path / "models" / "geneval" / "mask2former"),
                                           "clip": str(tmp_path / "models" / "geneval" / "clip")}
    raw["logging"] = {"runs_dir": str(tmp_path / "runs"), "samples_per_step": 8}
    raw["steps"] = 2
    config = tmp_path / "sana.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = train(config)
    assert "building tiny 'sana' model" in result.stdout and "building tiny GenEval models" in result.stdout
    store, run = only_run(tmp_path / "runs")
    table = metric_table(store, run.id)
    assert run.status == "finished" and sorted(table) == [1, 2]
    # the sampler is deterministic: seed 0 draws one GenEval and one OCR prompt in each step, so
    # both rewards must have been scored through the reward API, every step
    for step, metrics in table.items():
        assert {"reward/geneval", "reward/ocr"} <= set(metrics), (step, sorted(metrics))
    samples = store.samples(run.id, 1)
    image = np.asarray(Image.open(store.runs_dir / samples[0].image))
    assert image.shape == (64, 64, 3) and image.std() > 0  # a real decoded 64 px image, not a blank
