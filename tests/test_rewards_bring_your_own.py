"""Bring-your-own scorers over real sockets: a Python scorer loaded from its module path inside the
reward app, the example HTTP scorer (examples/http_scorer) through the trainer's client, a chunk
scored by a whole mix (each component through its own client, batched to its own limits), a
failing scorer that fails alone within its own budget, and the start-up check that refuses a mix
the service cannot score."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from rewards.app.deps import get_geneval_scorer, get_ocr_scorer
from rewards.app.main import create_app, load_scorers
from rewards.app.run import add_serve_arguments, settings_from_args
from rewards.app.schemas import Limits
from rewards.app.settings import Settings
from rewards.client import RewardClient, RewardRequestError, RewardServerError, encode_png
from rewards.geneval_rules import GenevalMetadata, evaluate
from rewards.scorer import build_python
from rl.prompts.sources import PromptItem
from rl.run.config import ConfigError, load_config
from rl.run.reward_checks import check_reward_service, check_rows_fit_config
from rl.scoring.reward_mix import RewardComponentConfig
from rl.scoring.service import RewardEndpoint, score_images
from tests.rewards_support import StubGeneval, StubOcr, serve_in_thread
from tests.support.http_scorers import ControlledScorer
from tests.train_support import small_config

SUPPORT = "tests.support.python_scorers"
PYTHON = {name: f"{SUPPORT}:{name}" for name in ("redness", "prompt_length", "wrong_count")}
GENEVAL_LINE = json.dumps({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"})


@pytest.fixture(scope="module")
def service():
    """The reward app with the python scorers loaded from their module paths (the real loading
    path, as `rewards serve --python-scorer` and a run's Serve deployment do) and a stub OCR model."""
    app = create_app(Settings(scorers=["compressibility"], python_scorers=PYTHON, max_items=4))
    app.dependency_overrides[get_ocr_scorer] = StubOcr
    app.dependency_overrides[get_geneval_scorer] = StubGeneval
    with serve_in_thread(app) as url:
        yield url


def flat(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (4, 4, 3)).copy()


def endpoint(url: str, mix=(), **fields) -> RewardEndpoint:
    return RewardEndpoint(url=url, token=None, timeout_s=10, outage_budget_s=fields.pop("outage_budget_s", 10),
                          backoff_s=0.05, mix=tuple(mix), **fields)


def test_a_python_scorer_loads_from_its_module_path_inside_the_reward_app(service):
    ready = httpx.get(f"{service}/readyz").json()
    assert {"compressibility", "redness", "prompt_length", "wrong_count"} == set(ready["scorers"])
    assert ready["versions"]["prompt_length"] == "prompt-length-2"  # the function's own version
    assert re.fullmatch(rf"python:{SUPPORT}:redness@[0-9a-f]{{12}}", ready["versions"]["redness"])  # its source hash

    async def ask(name, images, prompts, metadatas):
        async with RewardClient(service, retries=0) as client:
            return await client.score(name, images, prompts, metadatas)

    images = [flat((200, 0, 0)), flat((90, 90, 90)), flat((0, 0, 0))]
    red = asyncio.run(ask("redness", images, ["a", "abc", ""], [{"task": "ocr"}, {}, {}]))
    assert [r.reward for r in red.results] == pytest.approx([1.0, 1 / 3, 0.0])
    assert red.results[0].details == {"prompt_chars": 1, "task": "ocr"} and red.results[1].details["prompt_chars"] == 3
    assert red.version == ready["versions"]["redness"]
    # 5 items on a server taking 4 a request: two requests, results in item order
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    lengths = asyncio.run(ask("prompt_length", [flat((1, 1, 1))] * 5, prompts, [{}] * 5))
    assert [r.reward for r in lengths.results] == [1.0, 2.0, 3.0, 4.0, 5.0]
    # a function answering the wrong number of rewards is a server error, never passed on
    broken = httpx.post(f"{service}/v1/rewards/wrong_count", json={"items": [{"image": encode_png(flat((1, 1, 1)))}] * 2})
    assert broken.status_code == 500 and broken.json()["error"] == "internal_error"


def test_python_scorers_that_cannot_load_or_would_shadow_a_builtin_are_refused():
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_scorers(Settings(scorers=[], python_scorers={"x": f"{SUPPORT}:nope"}))
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        load_scorers(Settings(scorers=[], python_scorers={"x": "no_such_module:f"}))
    with pytest.raises(ValueError, match="taken by a built-in scorer"):
        Settings(python_scorers={"ocr": f"{SUPPORT}:redness"})
    parser = argparse.ArgumentParser()  # `rewards serve --python-scorer NAME=module:function`
    add_serve_arguments(parser)
    flags = ["--scorers", "compressibility", "--python-scorer", f"red={PYTHON['redness']}"]
    assert settings_from_args(parser.parse_args(flags)).python_scorers == {"red": PYTHON["redness"]}


def test_a_chunk_is_scored_by_every_component_each_within_its_own_limits(service):
    scorer = ControlledScorer()
    with serve_in_thread(scorer.app) as http_url:
        mix = [RewardComponentConfig(name="ocr", scorer="ocr"), RewardComponentConfig(name="gen", scorer="geneval"),
               RewardComponentConfig(name="redness", scorer="python", function=PYTHON["redness"]),
               RewardComponentConfig(name="bright", scorer="http", url=f"{http_url}/score", normalize="group")]
        tight = Limits(max_items=3, max_body_bytes=1 << 20, max_image_pixels=1 << 20)
        items = [PromptItem('an image with the text "id-7"', "ocr")] * 2 + \
                [PromptItem("a photo of a dog", "geneval", GENEVAL_LINE)] * 2
        images = np.stack([flat((7, 0, 40 * row)) for row in range(4)])  # the stub OCR reads "id-7"
        scored = score_images(endpoint(service, mix, scorer_limits={"bright": tight}), images, items, tuple(mix))
    rows = scored.rewards
    assert [r.scores["bright"] for r in rows] == pytest.approx([(7 + 40 * row) / 3 / 255 for row in range(4)])
    assert [r.scores["redness"] for r in rows] == pytest.approx([7 / (7 + 40 * row) for row in range(4)])
    assert [r.scores.get("ocr") for r in rows] == [1.0, 1.0, None, None]  # OCR scores the OCR prompts only
    assert rows[0].reward == 1.0 and rows[0].recognized == "id-7"
    # GenEval scores the GenEval prompts only: the stub detects nothing in these dark images
    nothing = evaluate(GenevalMetadata.model_validate_json(GENEVAL_LINE), [], lambda objects, cls: [])
    assert [r.scores.get("gen") for r in rows] == [None, None, nothing.reward, nothing.reward]
    assert rows[2].reward == nothing.reward and rows[2].geneval_correct is False
    assert rows[2].geneval_tag == "single_object" and rows[2].components()["geneval_correct"] == 0.0
    assert scorer.requests == 2  # 4 rows, at most 3 a request
    assert scored.versions["bright"] == "mean-brightness-1" and scored.versions["ocr"] == "unversioned"
    assert scored.versions["redness"].startswith("python:") and scored.failures == []


def test_a_failing_scorer_fails_alone_within_its_own_budget(service):
    items = [PromptItem('an image with the text "id-7"', "ocr")] * 2
    images = np.stack([flat((7, 0, 0))] * 2)
    down = ControlledScorer(fail_from=1)  # every POST /score answers 503
    with serve_in_thread(down.app) as http_url:
        mix = (RewardComponentConfig(name="ocr", scorer="ocr"),
               RewardComponentConfig(name="bright", scorer="http", url=f"{http_url}/score", outage_budget_s=0.5))
        started = time.monotonic()
        with pytest.raises(RewardServerError) as raised:
            score_images(endpoint(service, outage_budget_s=60), images, items, mix)
        assert time.monotonic() - started < 10  # its own 0.5 s budget, not the service's 60 s
    message = str(raised.value)
    assert message.startswith("reward bright (http): ") and "HTTP 503" in message and "reward ocr" not in message
    assert down.requests >= 2  # a 5xx is retried
    refusing = ControlledScorer(fail_from=1, fail_status=400)
    with serve_in_thread(refusing.app) as http_url:
        mix = (mix[0], RewardComponentConfig(name="bright", scorer="http", url=f"{http_url}/score"))
        with pytest.raises(RewardRequestError, match="400 refused: reward bright: on cue"):
            score_images(endpoint(service), images, items, mix)
    assert refusing.requests == 1  # a 4xx is never retried


def test_the_start_check_refuses_a_mix_the_service_cannot_score_and_learns_http_limits(tmp_path, glyph_model_dir):
    app = create_app(Settings(scorers=["ocr"]), scorers={"ocr": StubOcr(), "redness": build_python("redness",
                                                                                               PYTHON["redness"])})
    example, bare = ControlledScorer(), FastAPI()  # bare: no /readyz, so the config's max_items holds
    with serve_in_thread(app) as url, serve_in_thread(example.app) as http_url, serve_in_thread(bare) as bare_url:
        mix = [{"name": "ocr", "scorer": "ocr"}, {"name": "redness", "scorer": "python", "function": PYTHON["redness"]},
               {"name": "bright", "scorer": "http", "url": f"{http_url}/score"},
               {"name": "bare", "scorer": "http", "url": f"{bare_url}/score", "max_items": 5}]
        config = load_config(small_config(tmp_path, glyph_model_dir, rewards={"service": "url", "url": url, "mix": mix}))
        checked = check_reward_service(endpoint(url), config)
        assert [c.name for c in checked.mix] == ["ocr", "redness", "bright", "bare"]
        assert checked.scorer_limits["bright"].max_items == example.example.MAX_ITEMS
        assert checked.scorer_limits["bare"].max_items == 5
        more = [*mix, {"name": "pick", "scorer": "pickscore"}]
        unserved = load_config(small_config(tmp_path, glyph_model_dir, rewards={"service": "url", "url": url,
                                                                                "mix": more}))
        with pytest.raises(ConfigError, match=r"rewards.mix names the pickscore scorer, but the reward service "
                                              r"\(http://127.0.0.1:\d+\) runs only: ocr, redness"):
            check_reward_service(endpoint(url), unserved)


@pytest.mark.parametrize("mix, words", [
    ([{"name": "g", "scorer": "geneval"}], "rewards.mix gives the ocr prompts no reward"),
    ([{"name": "ocr", "scorer": "ocr"}, {"name": "pick", "scorer": "pickscore"}],
     r"rewards.mix names the pickscore scorer, but the reward service \(rewards.server.scorers\) runs only: ocr"),
    ([{"name": "x", "scorer": "python", "function": "no_such_module:f"}], "rewards.mix x: cannot import"),
    ([{"name": "ocr", "scorer": "ocr"}], r"learner.grpo.spatial.rewards names orc, no reward of the run's mix \(ocr\)"),
])
def test_a_mix_the_configured_server_cannot_score_is_refused_at_load(tmp_path, glyph_model_dir, mix, words):
    spatial = {"learner.grpo.spatial": {"weight": 1.0, "rewards": ["orc"]}} if "spatial" in words else {}
    config = load_config(small_config(tmp_path, glyph_model_dir, **{"rewards.mix": mix}, **spatial))
    with pytest.raises(ConfigError, match=words):
        check_rows_fit_config(config)
