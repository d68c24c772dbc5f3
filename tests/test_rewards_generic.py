"""The generic scorer route, POST /v1/rewards/{name}, with the real JPEG scorers over a real socket:
results equal the in-process scorer, versions on /readyz and in every answer, and the checks that
keep a bad scorer from training a run on nonsense."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from rewards.app.main import create_app
from rewards.app.settings import Settings
from rewards.client import encode_png
from rewards.compressibility import jpeg_size_kb
from rewards.scorer import ScoreResult, ServedScorer
from tests.rewards_support import serve_in_thread


@pytest.fixture(scope="module")
def http():
    app = create_app(Settings(scorers=["compressibility", "incompressibility"], max_items=4))
    with serve_in_thread(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return [flat, noise]


def test_generic_route_answers_the_in_process_rewards_with_the_scorer_version(http):
    ready = http.get("/readyz").json()
    assert ready["scorers"] == ["compressibility", "incompressibility"]
    assert ready["versions"] == {"compressibility": "jpeg-q95", "incompressibility": "jpeg-q95"}
    body = {"items": [{"image": encode_png(image), "prompt": "a cat"} for image in images()]}
    answer = http.post("/v1/rewards/compressibility", json=body)
    assert answer.status_code == 200, answer.text
    sizes = [jpeg_size_kb(image) for image in images()]
    assert [r["reward"] for r in answer.json()["results"]] == pytest.approx([-s / 500 for s in sizes])
    assert [r["details"]["jpeg_kb"] for r in answer.json()["results"]] == pytest.approx(sizes)
    assert answer.json()["scorer"] == "compressibility" and answer.json()["version"] == "jpeg-q95"
    incompressible = http.post("/v1/rewards/incompressibility", json=body).json()["results"]
    assert incompressible[1]["reward"] > incompressible[0]["reward"]  # noise is bigger as JPEG


def test_unknown_scorer_named_route_and_limits(http):
    one = {"items": [{"image": encode_png(images()[0])}]}
    missing = http.post("/v1/rewards/pickscore", json=one)
    assert missing.status_code == 404 and missing.json()["error"] == "scorer_not_loaded"
    assert "compressibility" in missing.json()["message"]
    too_many = http.post("/v1/rewards/compressibility", json={"items": one["items"] * 5})
    assert too_many.status_code == 413 and too_many.json()["error"] == "too_many_items"
    extra = http.post("/v1/rewards/compressibility", json={"items": [{**one["items"][0], "target": "x"}]})
    assert extra.status_code == 422 and extra.json()["item"] == 0


def test_served_scorer_refuses_wrong_counts_and_non_finite_rewards():
    class Bad:
        name, version = "bad", "0"

        def __init__(self, answer):
            self.answer = answer

        def score(self, images, prompts, metadatas):
            return self.answer

    image = images()[0]
    with pytest.raises(RuntimeError, match="returned 0 results for 1 images"):
        ServedScorer(Bad([])).score_conditions([image], [("", {})])
    with pytest.raises(RuntimeError, match="finite reward"):
        ServedScorer(Bad([ScoreResult(float("nan"))])).score_conditions([image], [("", {})])
    ok = ServedScorer(Bad([ScoreResult(0.5, {"k": 1})])).score_conditions([image], [("p", {"m": 2})])
    assert ok == [ScoreResult(0.5, {"k": 1})]


def test_settings_refuse_unknown_scorer_names():
    with pytest.raises(ValueError, match="unknown scorers"):
        Settings(scorers=["ocr", "clipscroe"])
