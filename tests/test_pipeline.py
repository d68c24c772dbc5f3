"""How a step's dataflow finds faults (rl/pipeline.py), with small stand-in workers on a real Ray
cluster and the real reward app (stub OCR model) over a socket. The real workers are killed and
hung in tests/test_faults.py; here each kind of fault is made to happen exactly."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import torch

from rl.pipeline import PendingStep, RewardOutageError
from rl.prompts import PromptItem, SamplerState
from rl.scoring import RewardEndpoint
from rollout.records import DecodedImages, RolloutBatch
from tests.rewards_support import StubOcr, serve_in_thread

GROUP = 4
ITEMS = [PromptItem(f'an image with the text "id-{n}"', "ocr") for n in range(3)]


class StandInSampler:
    """Answers like ARRolloutWorker.generate, stamped with the version it is told to serve."""

    def __init__(self, version: int = 0, delay_s: float = 0.0):
        self.version, self.delay_s = version, delay_s

    def set(self, version: int, delay_s: float = 0.0) -> None:
        self.version, self.delay_s = version, delay_s

    def pid(self) -> int:
        return os.getpid()

    def generate(self, captions: list[str], group_size: int, seed: int) -> RolloutBatch:
        time.sleep(self.delay_s)
        rows = len(captions) * group_size
        return RolloutBatch(prompt_ids=[[1, 2]] * rows, group_index=[r // group_size for r in range(rows)],
                            image_tokens=torch.zeros(rows, 4, dtype=torch.long), logprobs=torch.zeros(rows, 4),
                            policy_version=self.version, seed=seed, timings={"generate": 0.01})


class StandInDecoder:
    """Draws row r of a chunk as an image the stub OCR reads as "id-<seed + r>"."""

    def __init__(self, version: int = 0):
        self.version = version

    def decode(self, batch: RolloutBatch, seed: int) -> DecodedImages:
        images = np.zeros((len(batch.prompt_ids), 8, 8, 3), np.uint8)  # [R, 8, 8, 3]
        for row in range(len(images)):
            number = seed + row
            images[row, ..., 0], images[row, ..., 1] = number % 256, number // 256
        return DecodedImages(images=images, policy_version=self.version, timings={"decode": 0.01})


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


def launch(ray, sampler, decoder, url: str, version: int = 0, **kwargs) -> PendingStep:
    return PendingStep(ITEMS, GROUP, seed=100, rollout_actors=[sampler], decoder_actors=[decoder],
                       endpoint=endpoint(url, **kwargs), chunk_prompts=2, policy_version=version,
                       sampler_state=SamplerState(cursors=[0]))


def poll_until_settled(pending: PendingStep, stage_timeout_s: float = 60, deadline_s: float = 60):
    deadline = time.monotonic() + deadline_s
    while not pending.done:
        faults = pending.poll(stage_timeout_s, wait_s=0.2)
        if faults:
            return faults
        assert time.monotonic() < deadline, "step did not settle"
    return []


def test_a_clean_step_keeps_every_row_in_order(ray_cluster, reward_url):
    sampler, decoder = ray_cluster.remote(StandInSampler).remote(), ray_cluster.remote(StandInDecoder).remote()
    pending = launch(ray_cluster, sampler, decoder, reward_url)
    assert poll_until_settled(pending) == []
    scored = pending.result()
    assert len(pending.chunks) == 2 and len(scored.rewards) == len(ITEMS) * GROUP
    # row r of the step is image "id-(100 + r)": chunk seeds continue the row count across chunks
    assert [r.recognized for r in scored.rewards] == [f"id-{100 + row}" for row in range(len(ITEMS) * GROUP)]
    assert scored.batch.group_index == [row // GROUP for row in range(len(ITEMS) * GROUP)]


def test_a_worker_serving_older_weights_than_launched_is_a_fault_and_the_redo_uses_new_ones(ray_cluster, reward_url):
    sampler, decoder = ray_cluster.remote(StandInSampler).remote(0), ray_cluster.remote(StandInDecoder).remote(3)
    pending = launch(ray_cluster, sampler, decoder, reward_url, version=3)
    faults = poll_until_settled(pending)
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
