"""Fault injection on CPU with the real thing: the driver (`python -m rl.run.train`) in a subprocess with
its own Ray cluster, vLLM, DeepSpeed, Ray Serve and PaddleOCR; workers are SIGKILLed while busy,
the reward server is taken away, the driver gets SIGTERM. Results are read back from the run store.
"""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest

from rewards.local_server import free_port, start_reward_server
from rl.prompts.sources import PromptSampler, PromptSourceConfig
from tests.support.chaos import inject_fault, worker_processes
from tests.train_support import RunningTrain, metric_table, only_run, small_config, train

pytestmark = pytest.mark.slow
OCR_TINY = ["--scorers", "ocr", "--ocr-size", "tiny"]


def recovered_versions(store, run_id) -> list[tuple[int, str, int]]:
    """(step, workers reloaded, version every worker served afterwards) of each recovery event."""
    found = []
    for event in store.events(run_id):
        if event.kind == "recovered":
            match = re.match(r"step (\d+): .*: reloaded (.+); every worker serves v(\d+)", event.message)
            assert match, event.message
            found.append((int(match[1]), match[2], int(match[3])))
    return found


def wait_for_replacement(root_pid: int, role: str, killed_at: float, timeout_s: float = 180):
    """The `role` process started after `killed_at` (time.time()) to take over from the killed one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in worker_processes(root_pid, role):
            try:
                if process.create_time() > killed_at - 1.0:  # psutil's start times are rounded
                    return process
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.5)
    raise AssertionError(f"no new {role} process within {timeout_s:.0f} s of the kill")


def assert_stopped_with_a_checkpoint(tmp_path, output: str, status: str, steps: int) -> str:
    """The run ended before its last step with `status` and said how to resume; its finished steps
    are contiguous and the last one was checkpointed on the way out. Returns the run id."""
    store, record = only_run(tmp_path / "runs")
    assert f"--resume {record.id}" in output
    assert record.status == status
    done = sorted(metric_table(store, record.id))
    assert done and done == list(range(1, done[-1] + 1)) and done[-1] < steps
    checkpoints = sorted((tmp_path / "runs" / "checkpoints" / record.id).glob("step-*"))
    assert checkpoints[-1].name == f"step-{done[-1]:06d}"
    return record.id


def assert_resume_finishes(tmp_path, config, run_id: str, steps: int) -> None:
    """`--resume run_id` runs exactly the steps left, and the run ends finished with every step."""
    store, record = only_run(tmp_path / "runs")
    last_done = max(metric_table(store, record.id))
    resumed = train(config, "--resume", run_id)
    assert f"steps {last_done + 1}..{steps}" in resumed.stdout
    store, record = only_run(tmp_path / "runs")
    assert record.status == "finished"
    assert sorted(metric_table(store, record.id)) == list(range(1, steps + 1))


def test_dead_and_hung_workers_come_back_with_current_weights_and_no_step_is_lost(tmp_path, glyph_model_dir):
    # steps of ~1 s on an idle box: a fault is injected some steps after the line it waits for (it waits
    # for the worker to be seen busy), so the injections are spread over enough steps to land in order
    steps, rows, hang_after = 30, 4 * 16, 20
    config = small_config(tmp_path, glyph_model_dir, steps=steps,
                          **{"data.prompts_per_step": 4, "checkpoint.every": 100, "schedule.stage_timeout_s": 30})
    run = RunningTrain(config)
    injected = []
    try:
        # the rollout worker late: by then the policy has trained (v > 0), so its reload is visible
        for after_step, role, kind in ((2, "reward", "kill"), (6, "decoder", "kill"), (12, "rollout", "kill"),
                                       (hang_after, "decoder", "hang")):
            run.wait_for(f"step {after_step}/")
            injected.append(inject_fault(run.pid, role, kind, timeout_s=300))
            if role == "reward":
                killed_at = time.time()
                replacement = wait_for_replacement(run.pid, "reward", killed_at)
        code = run.finish()
    finally:
        run.kill()
    print("\n".join(f"{f.kind} {f.role} pid {f.pid} ({f.title})" for f in injected))
    assert code == 0, run.output[-4000:]
    store, record = only_run(tmp_path / "runs")
    assert record.status == "finished"
    table = metric_table(store, record.id)
    assert sorted(table) == list(range(1, steps + 1))  # every step exactly once
    assert all(table[step]["rollout/rows"] == rows for step in table)  # no row lost
    faults = [e.message for e in store.events(record.id) if e.kind == "worker_fault"]
    assert any("rollout-0" in m and ("died" in m or "stale_weights" in m) for m in faults), faults
    assert any("decoder-0" in m and ("died" in m or "stale_weights" in m) for m in faults), faults
    hung = [int(m.split(":")[0].split()[1]) for m in faults if re.match(r"step \d+: decoder-0", m) and "hung" in m]
    assert hung and hung[0] > hang_after, faults  # found by the timeout, at a step after the injection
    # each restarted worker was reloaded before it served again, with the learner's version then:
    # the one after the previous step's update
    recoveries = recovered_versions(store, record.id)
    assert any("rollout-0" in reloaded for _, reloaded, _ in recoveries), recoveries
    assert sum("decoder-0" in reloaded for _, reloaded, _ in recoveries) == 2, recoveries  # dead, then hung
    for step, _, version in recoveries:
        assert version == table[step - 1]["policy/version"], (step, version)
    assert any(version > 0 for _, _, version in recoveries), "a reload to trained weights was not exercised"
    # Serve replaced the reward replica with a new process, which served the rest of the run (every
    # row of every step was scored, above). Whether the kill caught a request in flight depends on
    # timing (a process title can lag behind); that a failed request is retried and recorded is
    # tested exactly in tests/test_pipeline.py (a reward service failing its first request).
    assert replacement.pid != injected[0].pid and not psutil.pid_exists(injected[0].pid)


def test_reward_outage_past_budget_checkpoints_stops_and_resumes(tmp_path, glyph_model_dir):
    steps, port = 5, free_port()
    rewards = {"service": "url", "url": f"http://127.0.0.1:{port}", "outage_budget_s": 8, "backoff_s": 0.5}
    config = small_config(tmp_path, glyph_model_dir, steps=steps, rewards=rewards, **{"checkpoint.every": 100})
    server = start_reward_server(OCR_TINY, port=port)
    run = RunningTrain(config)
    try:
        run.wait_for("step 2/")
        server.process.kill()
        server.process.wait()
        started = time.monotonic()
        code = run.finish()
        stopped_after = time.monotonic() - started
    finally:
        run.kill()
        server.stop()
    assert code == 3, run.output[-4000:]
    assert stopped_after < 120  # the budget plus a checkpoint, not a hang
    assert "reward service down for longer than rewards.outage_budget_s (8 s)" in run.output
    run_id = assert_stopped_with_a_checkpoint(tmp_path, run.output, "stopped", steps)
    with start_reward_server(OCR_TINY, port=port):
        assert_resume_finishes(tmp_path, config, run_id, steps)


def test_sigterm_abandons_the_step_checkpoints_and_resume_sees_every_prompt_once(tmp_path, glyph_model_dir):
    steps, words = 5, ["cat", "dog", "sun", "sky", "red", "box"]
    config = small_config(tmp_path, glyph_model_dir, steps=steps,
                          **{"data.sources": [{"kind": "words", "words": words}], "checkpoint.every": 100})
    run = RunningTrain(config)
    try:
        run.wait_for("step 2/")
        os.kill(run.pid, signal.SIGTERM)  # what `ray job stop` sends
        code = run.finish()
    finally:
        run.kill()
    assert code == 0, run.output[-4000:]
    assert "SIGTERM: stopping after a checkpoint" in run.output
    store, record = only_run(tmp_path / "runs")
    assert record.status == "stopped"
    done = sorted(metric_table(store, record.id))
    assert done and done[-1] < steps
    assert [e.kind for e in store.events(record.id)][-1] == "stopped"

    resumed = train(config, "--resume")
    assert f"steps {done[-1] + 1}..{steps}" in resumed.stdout
    store, record = only_run(tmp_path / "runs")
    assert record.status == "finished"
    assert sorted(metric_table(store, record.id)) == list(range(1, steps + 1))
    # the abandoned step's prompts went back to the sampler: every step saw the prompts an
    # uninterrupted run draws (the sample records hold the first and the last group's prompt)
    sampler = PromptSampler([PromptSourceConfig(kind="words", words=words)], seed=0)
    for step in range(1, steps + 1):
        batch = sampler.next_batch(2)
        assert [s.prompt for s in store.samples(record.id, step)] == [batch[0].caption, batch[-1].caption], step


def test_a_worker_that_cannot_come_back_fails_the_run_after_a_checkpoint_and_resume_finishes(
        tmp_path, glyph_model_dir):
    steps = 5
    config = small_config(tmp_path, glyph_model_dir, steps=steps,
                          **{"faults.max_worker_restarts": 0, "checkpoint.every": 100})
    run = RunningTrain(config)
    try:
        run.wait_for("step 2/")
        inject_fault(run.pid, "decoder", "kill", timeout_s=300)  # Ray may not restart it
        code = run.finish()
    finally:
        run.kill()
    assert code == 4, run.output[-4000:]
    assert ("worker failure: a worker is dead for good (its start failed, or faults.max_worker_restarts = 0 are "
            "used up)") in run.output
    run_id = assert_stopped_with_a_checkpoint(tmp_path, run.output, "failed", steps)
    store, _ = only_run(tmp_path / "runs")
    assert any(e.kind == "worker_fault" and "decoder-0" in e.message for e in store.events(run_id))
    assert_resume_finishes(tmp_path, config, run_id, steps)  # on new workers


def test_a_restarted_worker_rejoins_the_broadcast_weight_group(tmp_path, glyph_model_dir):
    """The GPU configs publish over a process group (NCCL there, gloo here): a restarted worker is a
    new process that must join a new group with the others before the current weights reach it."""
    steps = 4
    config = small_config(tmp_path, glyph_model_dir, steps=steps,
                          **{"learner.sync.transport": "broadcast", "checkpoint.every": 100})
    run = RunningTrain(config)
    try:
        run.wait_for("step 2/")
        inject_fault(run.pid, "rollout", "kill", timeout_s=300)
        code = run.finish()
    finally:
        run.kill()
    assert code == 0, run.output[-4000:]
    store, record = only_run(tmp_path / "runs")
    assert record.status == "finished"
    table = metric_table(store, record.id)
    assert sorted(table) == list(range(1, steps + 1))
    faults = [e.message for e in store.events(record.id) if e.kind == "worker_fault"]
    assert any("rollout-0" in m and "died" in m for m in faults), faults
    recoveries = recovered_versions(store, record.id)
    assert recoveries, "no recovery recorded"
    for step, _, version in recoveries:
        assert version == table[step - 1]["policy/version"], (step, version)
    # every publish after the last recovery went through the new group: a publish to a broken group
    # would have failed and been recorded as a worker fault
    events = store.events(record.id)
    last_recovery = max(i for i, e in enumerate(events) if e.kind == "recovered")
    assert recoveries[-1][0] < steps, "no publish after the recovery"
    assert not [e.message for e in events[last_recovery + 1:] if e.kind == "worker_fault"]
