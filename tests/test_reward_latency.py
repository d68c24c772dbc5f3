"""Reward latency per component (rl/scoring/latency.py): the step's percentiles by hand, the metrics a
step logs through step_metrics, and each request's round trip recorded by a real `score_images` call
to a real reward app and an http scorer held by the benchmark's latency proxy."""

from __future__ import annotations

import numpy as np
import pytest

from bench.latency_proxy import serve_proxy
from rewards.app.deps import get_ocr_scorer
from rewards.app.main import create_app
from rewards.app.settings import Settings
from rl.learners.ar_learner import LearnerMetrics
from rl.prompts.sources import PromptItem
from rl.run.fleet import Versions
from rl.run.step_report import step_metrics
from rl.scoring.latency import request_latencies, reward_latency_metrics
from rl.scoring.reward_mix import RewardComponentConfig
from rl.scoring.service import RewardEndpoint, ScoredImages, score_images
from tests.rewards_support import StubOcr, serve_in_thread
from tests.support.http_scorers import ControlledScorer
from tests.test_step_metrics import TIMINGS, scored

# Four chunks: the judge answered each (1, 2, 4, 3 s); OCR three of them (the third had no OCR row).
CHUNKS = [{"judge": 1.0, "ocr": 0.1}, {"judge": 2.0, "ocr": 0.3}, {"judge": 4.0}, {"judge": 3.0, "ocr": 0.2}]
# numpy's linear percentile over sorted x_0..x_{n-1}: p_q = x_i + f (x_{i+1} - x_i), i + f = q (n - 1) / 100.
# judge [1, 2, 3, 4], n = 4: p50 at 1.5 -> 2.5; p90 at 2.7 -> 3.7; p99 at 2.97 -> 3.97; max 4.
# ocr [0.1, 0.2, 0.3], n = 3: p50 at 1.0 -> 0.2; p90 at 1.8 -> 0.28; p99 at 1.98 -> 0.298; max 0.3.
EXPECTED = {
    "reward_latency/judge/p50": 2.5, "reward_latency/judge/p90": 3.7, "reward_latency/judge/p99": 3.97,
    "reward_latency/judge/max": 4.0,
    "reward_latency/ocr/p50": 0.2, "reward_latency/ocr/p90": 0.28, "reward_latency/ocr/p99": 0.298,
    "reward_latency/ocr/max": 0.3,
}


def chunk(seconds: dict[str, float]) -> ScoredImages:
    return ScoredImages(rewards=[], failures=[], seconds=max(seconds.values()), request_seconds=seconds)


def test_the_steps_latency_percentiles_equal_hand_values():
    latencies = request_latencies([chunk(c) for c in CHUNKS])
    assert latencies == {"judge": [1.0, 2.0, 4.0, 3.0], "ocr": [0.1, 0.3, 0.2]}  # chunk order, gaps skipped
    metrics = reward_latency_metrics(latencies)
    assert metrics == pytest.approx(EXPECTED, abs=1e-12)
    assert list(metrics) == list(EXPECTED)  # components by name, then p50, p90, p99, max
    # one request: every statistic is that request; a component with none logs nothing
    assert reward_latency_metrics({"judge": [1.5], "gen": []}) == {
        f"reward_latency/judge/{stat}": 1.5 for stat in ("p50", "p90", "p99", "max")}


def test_step_metrics_logs_the_latency_of_the_steps_requests():
    latencies = request_latencies([chunk(c) for c in CHUNKS])
    nothing = LearnerMetrics(policy_version=0, sampler_version=0, optimizer_steps=0, rows=0, zero_signal_share=1.0)
    metrics = step_metrics(scored([0.0, 1.0], reward_latency=latencies), nothing, None, Versions(0), staleness=0,
                           timings=TIMINGS)
    assert {k: v for k, v in metrics.items() if k.startswith("reward_latency/")} == pytest.approx(EXPECTED, abs=1e-12)
    without = step_metrics(scored([0.0, 1.0]), nothing, None, Versions(0), staleness=0, timings=TIMINGS)
    assert not any(key.startswith("reward_latency/") for key in without)  # no request timed: no panel


DELAY_S = 0.4


def test_score_images_records_each_components_round_trip():
    """OCR from the reward app (a stub model) and an http judge (the example scorer) behind the latency
    proxy holding each POST DELAY_S; GenEval is in the mix but the chunks hold only OCR prompts."""
    app = create_app(Settings(scorers=[]))
    app.dependency_overrides[get_ocr_scorer] = StubOcr
    judge = ControlledScorer()
    with serve_in_thread(app) as service, serve_in_thread(judge.app) as judge_url, \
            serve_proxy(judge_url, DELAY_S) as held:
        mix = (RewardComponentConfig(name="ocr", scorer="ocr"), RewardComponentConfig(name="gen", scorer="geneval"),
               RewardComponentConfig(name="judge", scorer="http", url=f"{held}/score"))
        endpoint = RewardEndpoint(url=service, token=None, timeout_s=30, outage_budget_s=10, backoff_s=0.05, mix=mix)
        items = [PromptItem('an image with the text "id-7"', "ocr")] * 2
        images = np.zeros((2, 4, 4, 3), np.uint8)
        images[..., 0] = 7  # the stub OCR reads "id-7"
        chunks = [score_images(endpoint, images, items, mix) for _ in range(2)]
    assert judge.requests == 2 and all(c.failures == [] for c in chunks)
    for scored_chunk in chunks:
        seconds = scored_chunk.request_seconds
        assert set(seconds) == {"ocr", "judge"}  # GenEval had no row: no request, no entry
        assert DELAY_S <= seconds["judge"] < DELAY_S + 5  # the proxy's hold, plus a loaded machine's slack
        assert 0 < seconds["ocr"] <= scored_chunk.seconds and seconds["judge"] <= scored_chunk.seconds
    metrics = reward_latency_metrics(request_latencies(chunks))
    judged = sorted(c.request_seconds["judge"] for c in chunks)
    assert metrics["reward_latency/judge/max"] == judged[1]
    assert metrics["reward_latency/judge/p50"] == pytest.approx(sum(judged) / 2, abs=1e-12)  # n = 2: the midpoint
    assert set(metrics) == {f"reward_latency/{name}/{stat}" for name in ("judge", "ocr")
                            for stat in ("p50", "p90", "p99", "max")}
