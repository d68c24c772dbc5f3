"""How a step's dataflow finds faults (rl/run/pipeline.py), with small stand-in workers on a real Ray
cluster and the real reward app (stub OCR model) over a socket. The real workers are killed and
hung in tests/test_faults.py; here each kind of fault is made to happen exactly."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from rl.prompts.sources import PromptItem, SamplerState
from rl.run.pipeline import PendingStep, RewardOutageError, StageError
from rl.scoring.service import RewardEndpoint
from rollout.decoder_worker import DecodeInfo, DecoderVersionError
from rollout.records import DecodedImages, RolloutBatch
from tests.rewards_support import StubOcr, serve_in_thread

GROUP = 4
ITEMS = [PromptItem(f'an image with the text "id-{n}"', "ocr") for n in range(3)]


class StandInSampler:
    """Answers like ARRolloutWorker.generate, stamped with the version it is told to serve;
    `hang_on_call` n: the n-th generate (from 1) never answers."""

    def __init__(self, version: int = 0, delay_s: float = 0.0, hang_on_call: int | None = None,
                 slow: dict[int, float] | None = None):
        """`slow`: seed -> seconds a generate of that chunk seed takes instead of `delay_s`."""
        self.version, self.delay_s, self.hang_on_call, self.calls = version, delay_s, hang_on_call, 0
        self.slow, self.seeds = slow or {}, []

    def set(self, version: int, delay_s: float = 0.0) -> None:
        self.version, self.delay_s = version, delay_s

    def pid(self) -> int:
        return os.getpid()

    def generated_seeds(self) -> list[int]:
        """The chunk seeds of every generate that ran, in order."""
        return self.seeds

    def generate(self, captions: list[str], group_size: int, seed: int) -> RolloutBatch:
        self.calls += 1
        self.seeds.append(seed)
        time.sleep(3600 if self.calls == self.hang_on_call else self.slow.get(seed, self.delay_s))
        rows = len(captions) * group_size
        return RolloutBatch(prompt_ids=[[1, 2]] * rows, group_index=[r // group_size for r in range(rows)],
                            image_tokens=torch.zeros(rows, 4, dtype=torch.long), logprobs=torch.zeros(rows, 4),
                            policy_version=self.version, seed=seed, timings={"generate": 0.01})


class StandInDecoder:
    """Draws row r of a chunk as an image the stub OCR reads as "id-<seed + r>"; like the real
    decoder it refuses tokens of another version than it serves. `error`: raised by every decode
    from call `fail_from_call` on (counted from 1)."""

    def __init__(self, version: int = 0, error: Exception | None = None, fail_from_call: int = 1):
        self.version, self.error, self.fail_from_call, self.calls = version, error, fail_from_call, 0

    def set(self, version: int) -> None:
        self.version = version

    def decode(self, batch: RolloutBatch, seed: int) -> DecodedImages:
        self.calls += 1
        if self.error is not None and self.calls >= self.fail_from_call:
            raise self.error
        if batch.policy_version != self.version:
            raise DecoderVersionError(self.version, batch.policy_version)
        images = np.zeros((len(batch.prompt_ids), 8, 8, 3), np.uint8)  # [R, 8, 8, 3]
        for row in range(len(images)):
            number = seed + row
            images[row, ..., 0], images[row, ..., 1] = number % 256, number // 256 % 256
        return DecodedImages(images=images, policy_version=self.version, timings={"decode": 0.01})

    @ray.method(num_returns=2)
    def decode_split(self, batch: RolloutBatch, seed: int) -> tuple[DecodeInfo, np.ndarray]:
        decoded = self.decode(batch, seed)
        return DecodeInfo(len(decoded.images), decoded.policy_version, decoded.timings), decoded.images


@pytest.fixture(scope="module")
def reward_url():
    from rewards.app.deps import get_ocr_scorer
    from rewards.app.main import create_app
    from rewards.app.settings import Settings

    app = create_app(Settings(scorers=[]))
    app.dependency_overrides[get_ocr_scorer] = StubOcr
    with serve_in_thread(app) as url:
        yield url


def endpoint(url: str, outage_budget_s: float = 30.0) -> RewardEndpoint:
    return RewardEndpoint(url=url, token=None, timeout_s=10, outage_budget_s=outage_budget_s, backoff_s=0.05)


def launch(ray, sampler, decoder, url: str, version: int = 0, items=ITEMS, chunk_prompts=2, **kwargs) -> PendingStep:
    return PendingStep(items, GROUP, seed=100, rollout_actors=[sampler], decoder_actors=[decoder],
                       endpoint=endpoint(url, **kwargs), chunk_prompts=chunk_prompts, policy_version=version,
                       sampler_state=SamplerState(cursors=[0]))


def poll_until_settled(pending: PendingStep, stage_timeout_s: float = 60, deadline_s: float = 60):
    deadline = time.monotonic() + deadline_s
    while not pending.done:
        faults = pending.poll(stage_timeout_s, wait_s=0.2)
        if faults:
            return faults
        assert time.monotonic() < deadline, "step did not settle"
    return []


def faults_of_every_chunk(pending: PendingStep, deadline_s: float = 60) -> list:
    """The first fault of each chunk: one poll may see one chunk's fault before the other's."""
    found: dict[int, object] = {}
    deadline = time.monotonic() + deadline_s
    while len(found) < len(pending.chunks):
        for fault in pending.poll(60, wait_s=0.2):
            found.setdefault(fault.chunk, fault)
        assert time.monotonic() < deadline, f"only chunks {sorted(found)} reported a fault"
    return [found[chunk] for chunk in sorted(found)]


def test_a_clean_step_keeps_every_row_in_order(ray_cluster, reward_url):
    sampler, decoder = ray_cluster.remote(StandInSampler).remote(), ray_cluster.remote(StandInDecoder).remote()
    pending = launch(ray_cluster, sampler, decoder, reward_url)
    assert poll_until_settled(pending) == []
    scored = pending.result()
    assert len(pending.chunks) == 2 and len(scored.rewards) == len(ITEMS) * GROUP
    # row r of the step is image "id-(100 + r)": chunk seeds continue the row count across chunks
    assert [r.recognized for r in scored.rewards] == [f"id-{100 + row}" for row in range(len(ITEMS) * GROUP)]
    assert scored.batch.group_index == [row // GROUP for row in range(len(ITEMS) * GROUP)]
    # the images stayed in the object store (chunk 0: rows 0-7, chunk 1: rows 8-11); a few rows are
    # fetched on demand, in the order asked: row r is drawn with number 100 + r in its red channel
    assert [(c.first, c.rows, type(c.ref)) for c in scored.images] == [(0, 8, ray.ObjectRef), (8, 4, ray.ObjectRef)]
    sampled = scored.sample_images([11, 0, 5])
    assert [int(image[0, 0, 0]) for image in sampled] == [111, 100, 105]
    assert all(image.shape == (8, 8, 3) for image in sampled)


def test_a_worker_serving_older_weights_than_launched_is_a_fault_and_the_redo_uses_new_ones(ray_cluster, reward_url):
    sampler, decoder = ray_cluster.remote(StandInSampler).remote(0), ray_cluster.remote(StandInDecoder).remote(3)
    pending = launch(ray_cluster, sampler, decoder, reward_url, version=3)
    faults = faults_of_every_chunk(pending)
    assert {(f.chunk, f.stage, f.kind) for f in faults} == {(0, "rollout", "stale_weights"),
                                                            (1, "rollout", "stale_weights")}
    assert "served v0, launched at v3" in faults[0].detail
    ray_cluster.get(sampler.set.remote(3))  # what a recovery does: publish the current weights
    for fault in faults:
        pending.redo(fault)
    assert poll_until_settled(pending) == []
    assert pending.result().batch.policy_version == 3
    assert [chunk.attempts for chunk in pending.chunks] == [2, 2]


def test_a_dead_worker_is_a_fault_and_its_restart_redoes_the_chunk(ray_cluster, reward_url):
    import signal

    sampler = ray_cluster.remote(StandInSampler).options(max_restarts=1, max_task_retries=0).remote(0, 3.0)
    decoder = ray_cluster.remote(StandInDecoder).remote()
    pid = ray_cluster.get(sampler.pid.remote())
    pending = launch(ray_cluster, sampler, decoder, reward_url)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)  # mid-generate
    faults = poll_until_settled(pending)
    assert faults and all((f.stage, f.kind) == ("rollout", "died") for f in faults)
    while True:  # calls fail fast while Ray restarts it (the trainer's recovery waits the same way)
        try:
            ray_cluster.get(sampler.set.remote(0, 0.0))  # its constructor ran again: delay 3 s
            break
        except ray_cluster.exceptions.ActorUnavailableError:
            time.sleep(0.5)
    assert ray_cluster.get(sampler.pid.remote()) != pid  # a new process
    for fault in faults:
        pending.redo(fault)
    assert poll_until_settled(pending) == [] and len(pending.result().rewards) == len(ITEMS) * GROUP


def test_a_stage_past_its_timeout_is_a_hang(ray_cluster, reward_url):
    sampler = ray_cluster.remote(StandInSampler).remote(0, 30.0)
    decoder = ray_cluster.remote(StandInDecoder).remote()
    pending = launch(ray_cluster, sampler, decoder, reward_url)
    faults = poll_until_settled(pending, stage_timeout_s=1.0, deadline_s=20)
    assert faults and faults[0].stage == "rollout" and faults[0].kind == "hung"
    assert "no answer after" in faults[0].detail
    ray_cluster.kill(sampler)


def test_a_reward_service_down_past_its_budget_raises_an_outage(ray_cluster):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sampler, decoder = ray_cluster.remote(StandInSampler).remote(), ray_cluster.remote(StandInDecoder).remote()
    pending = launch(ray_cluster, sampler, decoder, closed, outage_budget_s=1.0)
    started = time.monotonic()
    with pytest.raises(RewardOutageError, match=r"kept failing for \d+ s .*retry budget 1 s.*ConnectError"):
        poll_until_settled(pending)
    assert time.monotonic() - started < 30


class SlowOcr(StubOcr):
    """A reward model that takes `seconds` per call: a slow (or remote) reward service."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def score(self, images, targets):
        time.sleep(self.seconds)
        return super().score(images, targets)


@pytest.fixture(scope="module")
def slow_reward_url():
    from rewards.app.main import create_app
    from rewards.app.settings import Settings

    # one chunk per model call, one call at a time: chunk c's rewards wait for chunks 0..c-1's
    app = create_app(Settings(scorers=["ocr"], batch_size=GROUP), scorers={"ocr": SlowOcr(1.0)})
    with serve_in_thread(app) as url:
        yield url


FOUR = [PromptItem(f'an image with the text "id-{n}"', "ocr") for n in range(4)]


def test_chunks_queued_behind_others_or_a_slow_reward_service_are_not_hangs(ray_cluster, slow_reward_url):
    """4 chunks on one sampler (1 s each) and a reward service taking 1 s a chunk, one at a time:
    the last chunk is done ~5 s after launch, but no stage ever runs for 3 s."""
    from rl.run.pipeline import _remote_score_task

    sampler = ray_cluster.remote(StandInSampler).remote(0, 1.0)
    decoder = ray_cluster.remote(StandInDecoder).remote()
    ray_cluster.get([sampler.pid.remote(), decoder.set.remote(0)])  # started, as the trainer's are before a step
    warm = np.zeros((1, 8, 8, 3), np.uint8)  # a scoring worker process too
    ray_cluster.get(_remote_score_task().remote(endpoint(slow_reward_url), warm, FOUR[:1]))
    pending = launch(ray_cluster, sampler, decoder, slow_reward_url, items=FOUR, chunk_prompts=1)
    started = time.monotonic()
    assert poll_until_settled(pending, stage_timeout_s=3.0) == []
    assert time.monotonic() - started > 4.5  # the chain really was longer than the stage timeout
    assert [r.recognized for r in pending.result().rewards] == [f"id-{100 + row}" for row in range(4 * GROUP)]


def test_a_real_hang_among_queued_chunks_is_still_caught_and_blamed_on_the_running_one(ray_cluster, reward_url):
    from rl.run.pipeline import _remote_score_task

    sampler = ray_cluster.remote(StandInSampler).remote(0, 0.5, hang_on_call=2)
    decoder = ray_cluster.remote(StandInDecoder).remote()
    ray_cluster.get([sampler.pid.remote(), decoder.set.remote(0)])
    # a scoring worker process too: run first in a session, starting one ate the 2 s of chunk 0's reward stage
    ray_cluster.get(_remote_score_task().remote(endpoint(reward_url), np.zeros((1, 8, 8, 3), np.uint8), FOUR[:1]))
    pending = launch(ray_cluster, sampler, decoder, reward_url, items=FOUR, chunk_prompts=1)
    started = time.monotonic()
    faults = poll_until_settled(pending, stage_timeout_s=2.0, deadline_s=30)
    found_after = time.monotonic() - started
    assert [(f.chunk, f.stage, f.kind) for f in faults] == [(1, "rollout", "hung")]  # not chunks 2, 3 behind it
    assert found_after > 2.0
    ray_cluster.kill(sampler)


def test_tokens_overtaken_by_a_publish_are_sampled_again_and_then_decoded_with_their_own_version(
        ray_cluster, reward_url):
    """Async: tokens sampled at v0, then v1 lands on the decoder before it renders them."""
    sampler, decoder = ray_cluster.remote(StandInSampler).remote(0), ray_cluster.remote(StandInDecoder).remote(1)
    pending = launch(ray_cluster, sampler, decoder, reward_url, version=0)
    faults = faults_of_every_chunk(pending)
    assert {(f.chunk, f.stage, f.kind, f.actor) for f in faults} == {(0, "rollout", "resample", None),
                                                                     (1, "rollout", "resample", None)}
    assert "tokens sampled at v0, decoder serves v1" in faults[0].detail
    ray_cluster.get(sampler.set.remote(1))  # the publish reached the sampler too: the redo samples at v1
    for fault in faults:
        pending.redo(fault)
    assert poll_until_settled(pending) == []
    assert pending.result().batch.policy_version == 1
    assert [chunk.attempts for chunk in pending.chunks] == [1, 1]  # a resample is not a failed try


def test_a_decoder_behind_the_tokens_is_stale_and_is_redone_from_the_decode(ray_cluster, reward_url):
    """A restarted decoder serves the weights on disk (v0) until the recovery reloads it."""
    sampler, decoder = ray_cluster.remote(StandInSampler).remote(2), ray_cluster.remote(StandInDecoder).remote(0)
    pending = launch(ray_cluster, sampler, decoder, reward_url, version=2)
    faults = faults_of_every_chunk(pending)
    assert {(f.chunk, f.stage, f.kind) for f in faults} == {(0, "decode", "stale_weights"),
                                                            (1, "decode", "stale_weights")}
    ray_cluster.get(decoder.set.remote(2))
    for fault in faults:
        pending.redo(fault)
    assert poll_until_settled(pending) == [] and pending.result().batch.policy_version == 2


def test_a_dropped_step_is_waited_out_before_the_next_one(ray_cluster, reward_url):
    """A step dropped with 4 chunks of 1 s on one sampler, the first one generating (an async rollback
    drops the next step): its tasks are waited out, and the next step, launched right after, is timed
    from its own start. Without this its first chunk waits ~3 s behind the dropped ones and, with a
    2.5 s stage timeout, is taken for a hang."""
    from rl.run.pipeline import _remote_score_task

    sampler = ray_cluster.remote(StandInSampler).remote(0, 1.0)
    decoder = ray_cluster.remote(StandInDecoder).remote()
    ray_cluster.get([sampler.pid.remote(), decoder.set.remote(0)])  # started, as the trainer's are
    warm = np.zeros((1, 8, 8, 3), np.uint8)  # a scoring worker process too
    ray_cluster.get(_remote_score_task().remote(endpoint(reward_url), warm, FOUR[:1]))
    dropped = launch(ray_cluster, sampler, decoder, reward_url, items=FOUR, chunk_prompts=1)
    time.sleep(0.5)  # chunk 0 is generating, chunks 1-3 are queued behind it
    started = time.monotonic()
    assert dropped.drain(stage_timeout_s=2.5) == []  # every worker came free within its stage timeout
    assert time.monotonic() - started > 2.5  # the three queued chunks ran (1 s each): drained, not abandoned
    assert all(chunk.score_ref in dropped._ready() for chunk in dropped.chunks)  # its scoring too
    after = launch(ray_cluster, sampler, decoder, reward_url, items=FOUR[:2], chunk_prompts=1)
    assert poll_until_settled(after, stage_timeout_s=2.5) == []
    assert ray_cluster.get(sampler.generated_seeds.remote()) == [100, 104, 108, 112, 100, 104]


def test_a_dropped_steps_hung_task_names_its_worker(ray_cluster, reward_url):
    sampler = ray_cluster.remote(StandInSampler).remote(0, 0.0, hang_on_call=1)
    decoder = ray_cluster.remote(StandInDecoder).remote()
    dropped = launch(ray_cluster, sampler, decoder, reward_url)
    started = time.monotonic()
    [hung] = dropped.drain(stage_timeout_s=1.0)  # chunk 1's generate and both decodes wait behind it
    assert hung == sampler and 1.0 < time.monotonic() - started < 10
    ray_cluster.kill(sampler)


def test_a_stages_own_error_is_raised_naming_the_chunk_and_stage(ray_cluster, reward_url):
    sampler = ray_cluster.remote(StandInSampler).remote()
    decoder = ray_cluster.remote(StandInDecoder).remote(0, RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    pending = launch(ray_cluster, sampler, decoder, reward_url)
    with pytest.raises(StageError, match=r"chunk 0 decode: RuntimeError: CUDA out of memory"):
        poll_until_settled(pending)


class StandInLearner:
    """What Trainer.run (through its Fleet) needs of LearnerGroup: each update bumps the version, each publish sets it
    on the stand-in workers, checkpoints are marker files."""

    def __init__(self, ray, workers: list):
        self.ray, self.workers, self.version = ray, workers, 0

    def train_step(self, batch, advantages, regions=None):
        from rl.learners.ar_learner import LearnerMetrics

        self.version += 1
        return LearnerMetrics(policy_version=self.version, sampler_version=batch.policy_version, optimizer_steps=1,
                              rows=len(batch), zero_signal_share=0.0)

    def publish_weights(self):
        from rl.weight_sync import SyncReport

        self.ray.get([worker.set.remote(self.version) for worker in self.workers])
        return SyncReport(self.version, "stand-in", 0, 0.01, 0.0, len(self.workers), 1)

    def save_checkpoint(self, directory: str) -> None:
        from rl.checkpoint import commit_rank_part

        self.export_policy(directory)
        for rank in range(2):  # the config's learner.world_size: each rank commits its part
            commit_rank_part(Path(directory), rank)

    def export_policy(self, directory: str) -> None:
        Path(directory).mkdir(parents=True)
        (Path(directory) / "version").write_text(str(self.version))


@pytest.fixture(scope="module")
def flaky_reward_url():
    """The stub reward app, answering its first scoring request with a 503 (a replica restarting)."""
    from fastapi.responses import JSONResponse

    from rewards.app.main import create_app
    from rewards.app.settings import Settings

    app = create_app(Settings(scorers=["ocr"]), scorers={"ocr": StubOcr()})
    failed = []

    @app.middleware("http")
    async def fail_once(request, call_next):
        if request.method == "POST" and not failed:
            failed.append(request.url.path)
            return JSONResponse({"error": "restarting", "message": "replica restarting", "item": None}, status_code=503)
        return await call_next(request)

    with serve_in_thread(app) as url:
        yield url


def test_a_stage_error_mid_run_stops_it_failed_with_a_checkpoint_of_the_last_finished_step(
        ray_cluster, flaky_reward_url, tmp_path):
    """A decoder running out of memory in step 2 (its 3rd chunk): not a Ray actor error, yet the run
    stops like one: step 1 checkpointed, the error recorded, status failed, exit code 4. On the way,
    step 1's reward request that failed with a 503 was retried and recorded."""
    from rl.checkpoint import CheckpointDir
    from rl.run.config import load_config
    from rl.run.fleet import Fleet
    from rl.run.lifecycle import RunStopped
    from rl.run.trainer import Trainer
    from rl.run_store import RunStore
    from tests.train_support import small_config

    config = load_config(small_config(tmp_path, tmp_path / "no-model", steps=3, **{"checkpoint.every": 100}))
    trainer = Trainer(config)
    sampler = ray_cluster.remote(StandInSampler).remote()
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    decoder = ray_cluster.remote(StandInDecoder).remote(0, oom, fail_from_call=3)
    trainer.endpoint = endpoint(flaky_reward_url)
    trainer.attach(Fleet([sampler], [decoder], StandInLearner(ray_cluster, [sampler, decoder]), max_worker_restarts=0,
                         restart_timeout_s=30, call_timeout_s=30, log_event=trainer._log_event))
    with pytest.raises(RunStopped) as stopped:
        trainer.run()
    assert stopped.value.exit_code == 4
    assert ("failed after step 1: error: StageError: chunk 0 decode: RuntimeError: CUDA out of memory"
            in str(stopped.value))
    store = RunStore(config.logging.runs_dir)
    record = store.list_runs()[0]
    assert record.status == "failed"
    events = store.events(record.id)
    assert events[-1].kind == "failed" and "CUDA out of memory" in events[-1].message
    assert [e.message[:76] for e in events if e.kind == "reward_retry"] == [  # each failure names its reward
        "step 1: 1 reward requests failed and were retried; first: ocr: HTTP 503: {\"e"]
    latest = CheckpointDir(config.logging.runs_dir / "checkpoints" / record.id).latest()
    assert latest is not None and latest.name == "step-000001"
    assert (latest / "learner" / "version").read_text() == "1"


def test_an_edit_chunk_reads_its_sources_once_and_a_redo_sends_the_same_pixels(tmp_path):
    from PIL import Image

    from rl.prompts.edit import EditRecord
    from rl.run.pipeline import Chunk

    paths = [tmp_path / f"source-{n}.png" for n in range(2)]
    for n, path in enumerate(paths):
        Image.fromarray(np.full((6, 10, 3), 40 * n, np.uint8)).save(path)
    items = [PromptItem(f"make it red {n}", "edit", edit=EditRecord(f"make it red {n}", path))
             for n, path in enumerate(paths)]
    chunk = Chunk(index=0, start=0, items=items, seed=0, sampler=None, decoder=None, launched_version=0)
    first = chunk.edit_sources()
    assert [int(source.image[0, 0, 0]) for source in first] == [0, 40] and first[0].image.shape == (6, 10, 3)
    for path in paths:
        path.unlink()  # a redo must not need the files again
    assert chunk.edit_sources() is first
    text = Chunk(index=1, start=2, items=ITEMS[:1], seed=0, sampler=None, decoder=None, launched_version=0)
    assert text.edit_sources() == []
