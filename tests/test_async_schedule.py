"""The async schedule with several steps in flight (rl/run/in_flight.py, rl/run/lanes.py, rl/run/trainer.py):
the real Trainer loop on stand-in workers (a real Ray cluster, the real reward app with a stub OCR model
over a socket), observed from the workers' side: each generate appends (step, seed, version served,
start time) to a file, so the record survives a worker's restart.

Expected versions and staleness come from the rule, worked by hand for each config below: step s
samples with the weights after step max(b(s), s - 1 - k), b(s) the last checkpoint or eval step before s.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rl.run.in_flight import launch_limit
from rl.run.step_report import StepSchedule, schedule_metrics
from tests.rewards_support import StubOcr, serve_in_thread
from tests.test_pipeline import FOUR, StandInDecoder, StandInLearner, StandInSampler, endpoint
from tests.train_support import DEMO, small_config, write_config

ROWS = 32  # small_config: 2 prompts x 16 samples a step, one prompt per chunk
SEED_STRIDE = 65_537  # step_seed(0, s) = 65_537 s for the small s here: a row's seed // 65_537 is its step


def test_launch_limit_stops_at_k_ahead_at_the_run_end_and_at_barriers():
    every_4 = lambda s: s % 4 == 0 or s == 6  # noqa: E731 (checkpoint every 4 of 6 steps)
    # k = 2: after step t, steps up to t + 3, not past 4 (a barrier) until 4 is trained, never past 6
    assert [launch_limit(t, 2, 6, every_4) for t in range(7)] == [3, 4, 4, 4, 6, 6, 6]
    assert [launch_limit(t, 0, 6, every_4) for t in range(6)] == [1, 2, 3, 4, 5, 6]  # sync: the next one only
    assert [launch_limit(t, 4, 10, lambda s: s == 10) for t in (0, 5, 6)] == [5, 10, 10]


def test_schedule_metrics_over_the_rows():
    # 4 rows: two sampled 2 versions behind the learner, one 1 behind, one current
    metrics = schedule_metrics(StepSchedule(2, [2, 2, 1, 0], stale_rows_resampled=16))
    assert metrics == {"schedule/in_flight_steps": 2.0, "schedule/staleness_mean": 1.25, "schedule/staleness_min": 0.0,
                       "schedule/staleness_max": 2.0, "schedule/stale_rows_resampled": 16.0}
    assert StepSchedule(0, []).staleness_max == 0


class LoggedSampler(StandInSampler):
    """A stand-in rollout worker that keeps its delay across publishes and logs every generate to
    `log` (one JSON line: step, seed, version served, start and end time); `die_at_call` n: the n-th
    generate of the actor's life kills the process once (a marker file remembers it)."""

    def __init__(self, log: str = "", delay_s: float = 0.0, die_at_call: int | None = None, marker: str = ""):
        super().__init__(0, delay_s)
        self.log, self.die_at_call, self.marker = log, die_at_call, marker

    def reset(self, log: str, delay_s: float) -> None:
        """A fresh start for the next test's trainer (the actor is shared: starting one costs seconds)."""
        self.log, self.delay_s, self.version, self.calls = log, delay_s, 0, 0

    def set(self, version: int) -> None:  # a publish
        self.version = version

    def served_version(self) -> int:
        return self.version

    def generate(self, captions, group_size, seed):
        start = time.time()
        if self.calls + 1 == self.die_at_call and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        batch = super().generate(captions, group_size, seed)
        with open(self.log, "a") as out:
            out.write(json.dumps({"step": seed // SEED_STRIDE, "seed": seed, "version": batch.policy_version,
                                  "start": start, "end": time.time(), "pid": os.getpid()}) + "\n")
        return batch


class ServingDecoder(StandInDecoder):
    def served_version(self) -> int:
        return self.version

    def reset(self, error: Exception | None = None, fail_from_call: int = 1) -> None:
        self.version, self.error, self.fail_from_call, self.calls = 0, error, fail_from_call, 0


class ResumableLearner(StandInLearner):
    """The stand-in learner with what a resume and a recovery ask of it; `bump`: versions per update."""

    def __init__(self, ray, workers: list, bump: int = 1):
        super().__init__(ray, workers)
        self.bump = bump

    def train_step(self, batch, advantages, regions=None):
        metrics = super().train_step(batch, advantages, regions)
        self.version += self.bump - 1
        metrics.policy_version = self.version
        return metrics

    def connect_workers(self, workers) -> None:
        pass

    def load_checkpoint(self, directory: str, version: int | None = None) -> int:
        self.version = int((Path(directory) / "version").read_text())
        return self.version

    def shutdown(self) -> None:
        pass


class TimedOcr(StubOcr):
    """The stub OCR taking `seconds` a call (a slow judge), logging when each call ended and which steps'
    rows it read (the stand-in decoder draws row seed s as the number the stub reads)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.calls = seconds, []

    def score(self, images, targets):
        time.sleep(self.seconds)
        results = super().score(images, targets)
        steps = {int(r.recognized.removeprefix("id-")) for r in results}
        self.calls.append((time.time(), steps))
        return results


class StepDecoder(ServingDecoder):
    """Draws each row as its step number (seed // 65_537) instead of its seed."""

    def decode(self, batch, seed):
        decoded = super().decode(batch, seed)
        decoded.images[..., 0], decoded.images[..., 1] = seed // SEED_STRIDE % 256, seed // SEED_STRIDE // 256
        return decoded


@dataclass
class Rig:
    """What the trainer tests share: Ray, the reward app (its judge's seconds set per test), one
    logged sampler and one decoder (reset for each trainer)."""

    ray: object
    url: str
    ocr: TimedOcr
    sampler: object
    decoder: object


@pytest.fixture(scope="module")
def rig(ray_cluster):
    """The reward app, one call per chunk of 16 images, one call at a time."""
    from rewards.app.main import create_app
    from rewards.app.settings import Settings

    ocr = TimedOcr(0.0)
    with serve_in_thread(create_app(Settings(scorers=["ocr"], batch_size=16), scorers={"ocr": ocr})) as url:
        sampler, decoder = ray_cluster.remote(LoggedSampler).remote(), ray_cluster.remote(StepDecoder).remote()
        yield Rig(ray_cluster, url, ocr, sampler, decoder)
        for actor in (sampler, decoder):
            ray_cluster.kill(actor)


def make_trainer(rig: Rig, tmp_path: Path, *, steps: int, k: int, every: int = 100, delay_s: float = 0.05,
                 judge_s: float = 0.0, resume: str | None = None, runs: Path | None = None, bump: int = 1,
                 die_at_call: int | None = None, stop_after: int | None = None,
                 decoder_error: Exception | None = None):
    """A Trainer of the small demo config (async, max_staleness k, a checkpoint every `every` steps) on
    one logged sampler (`delay_s` a generate), one decoder and the stand-in learner, the judge taking
    `judge_s` a call; `die_at_call`: on workers of its own (the sampler dies once); `stop_after`:
    request a stop once that step is recorded. Returns the trainer and the sampler's log file."""
    from rl.run.config import load_config
    from rl.run.fleet import Fleet
    from rl.run.trainer import Trainer

    tmp_path.mkdir(parents=True, exist_ok=True)
    runs = runs or tmp_path / "runs"
    changes = {"steps": steps, "schedule.mode": "async", "schedule.max_staleness": k, "checkpoint.every": every,
               "logging.runs_dir": str(runs), "logging.samples_per_step": 1}
    config = load_config(small_config(tmp_path, tmp_path / "no-model", **changes))

    class StoppingTrainer(Trainer):
        def _record(self, step, *args):
            metrics = super()._record(step, *args)
            if step == stop_after:
                self.request_stop("test")
            return metrics

    trainer = StoppingTrainer(config, resume=resume)
    log = tmp_path / f"generate-{trainer.run_id}-{time.monotonic_ns()}.jsonl"
    ray, rig.ocr.seconds = rig.ray, judge_s
    if die_at_call is None:
        sampler, decoder = rig.sampler, rig.decoder
        ray.get([sampler.reset.remote(str(log), delay_s), decoder.reset.remote(decoder_error, 3)])  # 3rd decode on
    else:
        sampler = ray.remote(LoggedSampler).options(max_restarts=1, max_task_retries=0).remote(
            str(log), delay_s, die_at_call, str(tmp_path / "died"))
        decoder = ray.remote(StepDecoder).remote()
    trainer.endpoint = endpoint(rig.url)
    learner = ResumableLearner(ray, [sampler, decoder], bump)
    trainer.attach(Fleet([sampler], [decoder], learner, max_worker_restarts=1, restart_timeout_s=60, call_timeout_s=30,
                         log_event=trainer._log_event))
    if trainer.state.step > 0:
        trainer.restore_weights()
    return trainer, log


def generates(log: Path) -> dict[int, list[dict]]:
    """The log's generates by step, in the order they started."""
    by_step: dict[int, list[dict]] = {}
    for line in sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda g: g["start"]):
        by_step.setdefault(line["step"], []).append(line)
    return by_step


def metric(trainer, key: str) -> dict[int, float]:
    return {step: value for step, name, value, _ in trainer.store.scalars(trainer.run_id) if name == key}


def test_steps_sample_while_the_judge_scores_with_the_rules_versions(rig, tmp_path):
    """k = 2, 6 steps, no checkpoint before the last: steps 1-3 sample with v0, then step s with
    v(s - 3) (launched right after v(s - 3) is published); staleness at the update = the learner's
    version (s - 1) minus that: 0, 1, 2, 2, 2, 2; in flight beyond the step trained: 2, 2, 2, 2, 1, 0.
    With a judge of 0.3 s a chunk (0.6 s a step, one chunk at a time) and sampling of 0.05 s a chunk,
    step t + 1 starts sampling before step t's last reward arrives (the old schedule launched it only
    after). Checked for t = 1, 2, whose order does not depend on the machine's load; later launches
    follow publishes, and when they sample against which rewards depends on how fast the scoring tasks'
    processes start (after a slow start the judge may have scored them all): their versions show the rule."""
    trainer, log = make_trainer(rig, tmp_path, steps=6, k=2, judge_s=0.3)
    started = time.time()
    trainer.run()
    runs = generates(log)
    assert {s: sorted({g["version"] for g in gens}) for s, gens in runs.items()} == {
        1: [0], 2: [0], 3: [0], 4: [1], 5: [2], 6: [3]}
    assert all(len(gens) == 2 for gens in runs.values())  # no chunk sampled twice
    assert metric(trainer, "schedule/staleness_max") == {1: 0, 2: 1, 3: 2, 4: 2, 5: 2, 6: 2}
    assert metric(trainer, "schedule/staleness_min") == metric(trainer, "schedule/staleness_max")
    assert metric(trainer, "policy/staleness") == metric(trainer, "schedule/staleness_max")
    assert metric(trainer, "schedule/in_flight_steps") == {1: 2, 2: 2, 3: 2, 4: 2, 5: 1, 6: 0}
    assert set(metric(trainer, "schedule/stale_rows_resampled").values()) == {0.0}
    last_reward = {}  # step -> when its last chunk's rewards were in
    for ended, steps in (call for call in rig.ocr.calls if call[0] > started):
        for step in steps:
            last_reward[step] = max(last_reward.get(step, 0.0), ended)
    for step in (1, 2):  # 2 and 3 launched at the start: sampled while 1 and 2 wait for the judge
        assert runs[step + 1][0]["start"] < last_reward[step], f"step {step + 1} waited for step {step}'s rewards"


def test_a_stop_gives_back_the_oldest_steps_prompts_and_resumes_redo_them(rig, tmp_path):
    """k = 2, 6 steps, a checkpoint every 4. Uninterrupted: steps 1-3 sample v0, 4 v1 (launched after
    step 1, before the barrier 4), 5 and 6 v4 (launched once 4 is checkpointed). Interrupted: stopped
    after step 2 with steps 3 and 4 in flight, the run checkpoints step 2 with the prompt sampler as it
    was before step 3 drew; resumed, it redoes 3 and 4 with the same prompts and seeds but v2 (the weights
    it has: documented), stops after the barrier 4; resumed from that, 5 and 6 are exactly the
    uninterrupted run's (same prompts, seeds and versions)."""
    from rl.checkpoint import CheckpointDir
    from rl.run.lifecycle import RunStopped

    whole, whole_log = make_trainer(rig, tmp_path / "whole", steps=6, k=2, every=4)
    whole.run()
    runs = tmp_path / "parts" / "runs"
    first, first_log = make_trainer(rig, tmp_path / "parts", steps=6, k=2, every=4, stop_after=2)
    with pytest.raises(RunStopped) as stopped:
        first.run()
    assert stopped.value.exit_code == 0 and "stopped after step 2" in str(stopped.value)
    assert [p.step for p in first.in_flight.steps] == [3, 4]  # abandoned
    checkpoints = CheckpointDir(runs / "checkpoints" / first.run_id)
    state = checkpoints.load_state(checkpoints.latest())
    assert (state.step, state.sampler.step) == (2, 2)  # steps 3 and 4's prompts given back
    second, second_log = make_trainer(rig, tmp_path / "parts", steps=6, k=2, every=4,
                                      resume=first.run_id, runs=runs, stop_after=4)
    with pytest.raises(RunStopped):
        second.run()
    third, third_log = make_trainer(rig, tmp_path / "parts", steps=6, k=2, every=4,
                                    resume=first.run_id, runs=runs)
    third.run()

    def seen(log):
        return {s: [(g["seed"], g["version"]) for g in gens] for s, gens in generates(log).items()}

    whole_runs, parts = seen(whole_log), seen(first_log) | seen(second_log) | seen(third_log)
    assert {s: {v for _, v in gens} for s, gens in whole_runs.items()} == {1: {0}, 2: {0}, 3: {0}, 4: {1}, 5: {4},
                                                                          6: {4}}
    for step in (1, 2, 5, 6):
        assert sorted(parts[step]) == sorted(whole_runs[step]), step
    for step in (3, 4):  # the same rows, sampled with the weights of step 2
        assert sorted(seed for seed, _ in parts[step]) == sorted(seed for seed, _ in whole_runs[step])
        assert {v for _, v in parts[step]} == {2}
    assert metric(third, "schedule/staleness_max") == {1: 0, 2: 1, 3: 0, 4: 1, 5: 0, 6: 1}


def test_rows_more_than_k_versions_behind_are_sampled_again_and_counted(rig, tmp_path):
    """A learner whose update moves 3 versions (more than k = 2): steps 1-3 launched at v0, 4 at v3.
    Step 2's rows are 3 versions behind when it trains (learner v3): both chunks are sampled again with
    v3; step 3's are 6 behind (v6), step 4's too (v3 vs v9): each is resampled, 32 rows a step."""
    trainer, log = make_trainer(rig, tmp_path, steps=4, k=2, bump=3)
    trainer.run()
    runs = generates(log)
    assert {s: [g["version"] for g in gens] for s, gens in runs.items()} == {
        1: [0, 0], 2: [0, 0, 3, 3], 3: [0, 0, 6, 6], 4: [3, 3, 9, 9]}
    assert metric(trainer, "schedule/stale_rows_resampled") == {1: 0, 2: ROWS, 3: ROWS, 4: ROWS}
    assert metric(trainer, "schedule/staleness_max") == {1: 0, 2: 0, 3: 0, 4: 0}
    events = [e.message for e in trainer.store.events(trainer.run_id) if e.kind == "stale_rollouts"]
    assert len(events) == 6 and "its rows of v0 are 3 versions behind the learner's v3 (max_staleness 2)" in events[0]


def test_a_dead_worker_with_several_steps_in_flight_has_every_chunk_on_it_redone(rig, tmp_path):
    """k = 2: steps 1-3 (6 chunks) are queued on the one sampler at the start; it dies in its 3rd
    generate (step 2's first chunk). That chunk and the ones queued behind it (step 2's second, step
    3's two) fail; after the recovery each is sampled again, and every step trains on all its rows."""
    trainer, log = make_trainer(rig, tmp_path, steps=4, k=2, delay_s=0.3, die_at_call=3)
    trainer.run()
    trainer.fleet.shutdown()
    runs = generates(log)
    assert [len(runs[s]) for s in (1, 2, 3, 4)] == [2, 2, 2, 2]  # the log holds finished generates only
    assert {g["pid"] for g in runs[1]}.isdisjoint(g["pid"] for s in (2, 3) for g in runs[s])  # by the new process
    faults = [e.message for e in trainer.store.events(trainer.run_id) if e.kind == "worker_fault"]
    assert {m.split(":")[0] for m in faults} >= {"step 2", "step 3"} and all("died" in m for m in faults)
    assert any(e.kind == "recovered" for e in trainer.store.events(trainer.run_id))
    assert metric(trainer, "rollout/rows") == {s: ROWS for s in (1, 2, 3, 4)}
    assert max(metric(trainer, "schedule/staleness_max").values()) <= 2


def test_a_later_steps_own_error_stops_the_run_after_the_earlier_steps_trained(rig, tmp_path):
    """k = 2: step 2's first decode runs out of memory while step 1 waits for its judge. Step 1 still
    trains and is checkpointed; the error stops the run when step 2 is collected (failed, exit 4)."""
    from rl.checkpoint import CheckpointDir
    from rl.run.lifecycle import RunStopped

    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    trainer, _ = make_trainer(rig, tmp_path, steps=4, k=2, decoder_error=oom, judge_s=0.2)
    with pytest.raises(RunStopped) as stopped:
        trainer.run()
    assert stopped.value.exit_code == 4
    assert "failed after step 1: error: StageError: chunk 0 decode: RuntimeError: CUDA out of memory" in str(
        stopped.value)
    assert CheckpointDir(tmp_path / "runs" / "checkpoints" / trainer.run_id).latest().name == "step-000001"


def test_a_rollback_waits_out_every_step_in_flight(rig, tmp_path):
    """Three steps in flight (k = 2 at the start), 4 chunks of 0.3 s on one sampler: a rollback's drop
    waits for every one of their tasks, leaves no task on any lane and the window empty."""
    trainer, log = make_trainer(rig, tmp_path, steps=6, k=2, delay_s=0.3)
    trainer._fill()
    assert [p.step for p in trainer.in_flight.steps] == [1, 2, 3]
    started = time.monotonic()
    trainer._drop_in_flight("test")
    assert time.monotonic() - started > 1.2  # 6 generates of 0.3 s, none cancelled
    assert len(trainer.in_flight) == 0 and trainer.in_flight.lanes.idle()
    assert sorted(len(gens) for gens in generates(log).values()) == [2, 2, 2]
    assert not [e for e in trainer.store.events(trainer.run_id) if e.kind == "recovered"]  # nothing hung


def shared_steps(sampler, decoder, url, lanes):
    from rl.prompts.sources import SamplerState
    from rl.run.pipeline import PendingStep

    return [PendingStep(FOUR[:2], 4, seed=100 * (n + 1), rollout_actors=[sampler], decoder_actors=[decoder],
                        endpoint=endpoint(url), chunk_prompts=1, policy_version=0, sampler_state=SamplerState(),
                        step=n + 1, lanes=lanes) for n in range(2)]


def poll_both(steps, lanes, stage_timeout_s: float, deadline_s: float = 30) -> list:
    from rl.run.pipeline import poll_steps

    deadline = time.monotonic() + deadline_s
    while not all(p.done for p in steps):
        faults = poll_steps(steps, lanes, stage_timeout_s, [r for p in steps for r in p.open_refs("reward")], 0.2)
        if faults:
            return faults
        assert time.monotonic() < deadline, "steps did not settle"
    return []


def test_a_chunk_queued_behind_another_steps_chunk_is_not_a_hang(rig, tmp_path):
    """Two steps of 2 chunks (1 s each) on one sampler, a 1.5 s stage timeout: step 2's chunks wait
    2-3 s behind step 1's. With the lanes shared, none is timed while queued; with a lane per step (the
    old layout) step 2's first chunk is timed from the first poll and taken for a hang."""
    from rl.run.lanes import Lanes

    ray, url, decoder = rig.ray, rig.url, rig.decoder
    sampler, rig.ocr.seconds = ray.remote(StandInSampler).remote(0, 1.0), 0.0
    ray.get([sampler.pid.remote(), decoder.reset.remote()])  # started, as the trainer's are
    lanes = Lanes([sampler], [decoder])
    steps = shared_steps(sampler, decoder, url, lanes)
    assert poll_both(steps, lanes, stage_timeout_s=1.5) == []
    assert all(len(p.result().rewards) == 8 for p in steps)
    own = shared_steps(sampler, decoder, url, None)  # each step with lanes of its own
    faults, deadline = [], time.monotonic() + 30
    while not faults and not all(p.done for p in own):  # both polled, as steps in flight must be
        faults = [f for p in own for f in p.poll(1.5, wait_s=0.1)]
        assert time.monotonic() < deadline
    assert [(f.step, f.chunk, f.kind) for f in faults] == [(2, 0, "hung")]  # while step 1's chunk 1 ran
    ray.kill(sampler)


def test_a_real_hang_behind_another_steps_chunks_is_found_and_blamed_on_its_step(rig, tmp_path):
    from rl.run.lanes import Lanes

    ray, url, decoder = rig.ray, rig.url, rig.decoder
    sampler, rig.ocr.seconds = ray.remote(StandInSampler).remote(0, 0.3, hang_on_call=3), 0.0  # step 2's chunk 0
    ray.get([sampler.pid.remote(), decoder.reset.remote()])
    lanes = Lanes([sampler], [decoder])
    steps = shared_steps(sampler, decoder, url, lanes)
    started = time.monotonic()
    faults = poll_both(steps, lanes, stage_timeout_s=1.5)
    assert [(f.step, f.chunk, f.stage, f.kind) for f in faults] == [(2, 0, "rollout", "hung")]
    assert time.monotonic() - started > 1.5 and steps[0].done
    ray.kill(sampler)


@pytest.mark.parametrize("train", [["diffusion"], ["ar", "diffusion"]])
def test_async_refuses_a_trained_diffusion_policy_whatever_the_staleness(tmp_path, train):
    """Flow-GRPO's SDE rollouts must come from the transformer being updated: no step may be in flight."""
    from rl.run.config import ConfigError, load_config

    raw = yaml.safe_load((DEMO.parent / "tiny-cpu-sana-joint.yaml").read_text())
    if train == ["diffusion"]:
        raw.pop("learner")
    changes = {"train": train, "schedule": {"mode": "async", "max_staleness": 2}}
    with pytest.raises(ConfigError, match="schedule.mode must be 'sync', whatever schedule.max_staleness"):
        load_config(write_config(tmp_path, raw, changes))


@pytest.mark.slow
def test_the_glyph_demo_overlaps_steps_behind_a_slow_judge(tmp_path, glyph_model_dir):
    """The real trainer (Ray, vLLM, DeepSpeed, PaddleOCR tiny as a reward server process) with async
    k = 2 for 4 steps, behind the latency proxy holding every scoring request 1 s. In flight beyond
    the step trained: 2, 2, 1, 0 (steps 1-3 launched at the start, 4 after step 1); staleness at most
    0, 1, 2, 2. Steps 2 and 3 waited for their judge while the loop waited for and trained earlier
    steps (the old schedule launched step t + 1 only once step t's rewards were in)."""
    from bench.latency_proxy import serve_proxy
    from rewards.local_server import start_reward_server
    from tests.train_support import metric_table, only_run, train

    env = {**os.environ, "BLIP3O_RL_REWARDS_OCR__CACHE_SIZE": "100000"}  # the demo's OCR cache, as its Serve app
    ocr = ["--scorers", "ocr", "--ocr-size", "tiny"]
    with start_reward_server(ocr, env=env, log=tmp_path / "rewards.log") as server, \
            serve_proxy(server.url, delay_s=1.0) as proxy:
        config = small_config(tmp_path, glyph_model_dir, steps=4, **{
            "schedule.mode": "async", "schedule.max_staleness": 2, "checkpoint.every": 100,
            "rewards.service": "url", "rewards.url": proxy})
        train(config)
    store, run = only_run(tmp_path / "runs")
    table = metric_table(store, run.id)
    assert [table[s]["schedule/in_flight_steps"] for s in (1, 2, 3, 4)] == [2, 2, 1, 0]
    # in steps, 0 1 2 2 behind; in versions at most that (a step whose groups all read alike makes no update)
    assert all(table[s]["schedule/staleness_max"] <= min(s - 1, 2) for s in table)
    assert all(table[s]["time/reward"] >= 2 * 1.0 for s in table)  # 2 chunks a step, each request held 1 s
    # steps 2 and 3 were sampled and scored (their requests held 1 s each) while the loop waited for and
    # trained step 1 (and 2): time from launch to the loop's wait for them, whatever the machine's load
    hidden = [table[s]["time/collect"] - table[s]["time/collect_wait"] for s in (2, 3)]
    assert min(hidden) >= 1.0, hidden
    waits = [table[s]["time/collect_wait"] for s in (2, 3, 4)]
    stages = [[round(table[s][f"time/{k}"], 2) for k in ("step", "reward", "wait_sampled", "sync")] for s in table]
    print(f"collect waits of steps 2-4: {waits}; per step, seconds of step, reward requests (summed), "
          f"wait_sampled, sync: {stages}")
