"""The VLM judge example (examples/vlm_judge): Edit-R1's expected digit from hand-built logprobs,
and the scorer in front of a real vLLM OpenAI server serving a tiny random Idefics3 built here,
checked against the logprobs that server answers for the same requests, directly and through the
trainer's reward path."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from rewards.local_server import free_port, serve_in_thread

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vlm_judge"


def load(name: str):
    """A module of the example, imported from its file (the example is not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"vlm_judge_example_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


judge = load("vlm_judge")


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), rgb, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- the recipe, by hand ---------------------------------------------------------------------------

def test_the_expected_digit_renormalises_over_the_digits_found():
    # probabilities 0.5 ("5"), 0.25 ("4"), 0.2 (not a digit), 0.05 ("0"); "1".."3" are not in the top k.
    # Over the digits found (mass 0.8): p5 = 0.625, p4 = 0.3125, p0 = 0.0625
    # expected = 5 * 0.625 + 4 * 0.3125 + 0 = 4.375; reward = 4.375 / 5 = 0.875
    top = [("5", math.log(0.5)), ("4", math.log(0.25)), ("x", math.log(0.2)), ("0", math.log(0.05))]
    scored = judge.digit_score(top)
    assert scored.reward == pytest.approx(0.875, abs=1e-12)
    assert scored.expected_digit == pytest.approx(4.375, abs=1e-12)
    assert scored.digit_probs == pytest.approx({"0": 0.0625, "4": 0.3125, "5": 0.625}, abs=1e-12)
    assert scored.digit_mass == pytest.approx(0.8, abs=1e-12)
    # six equally likely digits: expected 2.5, reward 0.5; " 3" (another token) does not count
    even = [(d, math.log(0.1)) for d in "012345"] + [(" 3", math.log(0.3))]
    assert judge.digit_score(even).reward == pytest.approx(0.5, abs=1e-12)
    # one digit alone carries the whole score, whatever its logprob
    assert judge.digit_score([("a", -0.1), ("2", -9.0)]).reward == pytest.approx(0.4, abs=1e-12)
    # two tokens reading "3" (a tokenizer's duplicates) add up: p3 = 0.4 / 0.5 = 0.8, p5 = 0.2; 3.4 / 5
    twice = [("3", math.log(0.2)), ("3", math.log(0.2)), ("5", math.log(0.1))]
    assert judge.digit_score(twice).reward == pytest.approx(0.68, abs=1e-12)


def test_no_digit_in_the_top_logprobs_gives_the_fallback_reward():
    off_format = [("The", -0.2), (" image", -1.9), ("-inf", -3.0)]
    assert judge.digit_score(off_format) == judge.DigitScore(reward=0.0, expected_digit=None, digit_probs={},
                                                             digit_mass=0.0)
    assert judge.digit_score(off_format, no_digit_reward=0.5).reward == 0.5
    assert judge.digit_score([("3", -math.inf)]).expected_digit is None  # a digit with probability 0 is none


def test_the_first_tokens_logprobs_are_read_from_an_openai_completion():
    completion = {"choices": [{"logprobs": {"content": [
        {"token": "4", "logprob": -0.1, "top_logprobs": [{"token": "4", "logprob": -0.1}, {"token": "3", "logprob": -2.5}]},
        {"token": "\n", "logprob": -0.01, "top_logprobs": [{"token": "5", "logprob": -0.01}]},  # second token: ignored
    ]}}]}
    assert judge.first_token_top_logprobs(completion) == [("4", -0.1), ("3", -2.5)]
    with pytest.raises(judge.JudgeError, match="no logprobs"):
        judge.first_token_top_logprobs({"choices": [{"logprobs": None}]})
    assert judge.fill_template('Prompt: "{prompt}" {not a field}', "a {red} cube") == 'Prompt: "a {red} cube" {not a field}'


def test_latency_percentiles_are_nearest_rank():
    # n = 10: p50 is the ceil(5)-th = 5th smallest, p90 the 9th, p99 the ceil(9.9) = 10th
    assert judge.percentiles([0.1 * k for k in range(10, 0, -1)]) == pytest.approx({"p50": 0.5, "p90": 0.9, "p99": 1.0})
    assert judge.percentiles([]) == {}


def test_the_template_needs_its_placeholder(tmp_path):
    assert "{prompt}" in judge.load_template(judge.PROMPT_FILE)
    (tmp_path / "bad.txt").write_text("Rate the image from 0 to 5.")
    with pytest.raises(ValueError, match="no {prompt} placeholder"):
        judge.load_template(tmp_path / "bad.txt")


def test_bad_images_are_4xx_and_a_judge_that_is_down_is_503():
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: a 503, which the trainer retries
    app = judge.create_app(judge.JudgeSettings(url=closed, model="m", max_items=2))
    with serve_in_thread(app) as url:
        bad = httpx.post(f"{url}/score", json={"items": [{"image": png((1, 2, 3))}, {"image": "not base64!"}]})
        assert bad.status_code == 422 and bad.json()["error"] == "bad_image" and bad.json()["item"] == 1
        many = httpx.post(f"{url}/score", json={"items": [{"image": png((1, 2, 3))}] * 3})
        assert many.status_code == 413 and many.json()["error"] == "too_many_items"
        down = httpx.post(f"{url}/score", json={"items": [{"image": png((1, 2, 3)), "prompt": "a cat"}]})
        assert down.status_code == 503 and down.json()["error"] == "judge_unavailable", down.text
        assert httpx.get(f"{url}/readyz").status_code == 503


def test_the_judge_is_asked_for_one_greedy_token_with_its_top_logprobs_an_edits_source_first():
    """A stand-in for the vLLM server records what the scorer sends and answers fixed logprobs."""
    from fastapi.testclient import TestClient

    sent = []

    def vllm(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "judge-7b"}]})
        body = json.loads(request.content)
        sent.append(body)
        if "refuse" in body["messages"][0]["content"][-1]["text"]:
            return httpx.Response(400, json={"error": {"message": "prompt too long"}})
        top = [{"token": "4", "logprob": math.log(0.6)}, {"token": "2", "logprob": math.log(0.2)}]
        return httpx.Response(200, json={"choices": [{"logprobs": {"content": [{"token": "4", "top_logprobs": top}]}}]})

    app = judge.create_app(judge.JudgeSettings(url="http://judge"), transport=httpx.MockTransport(vllm))
    client = TestClient(app)
    items = [{"image": png((9, 9, 9)), "prompt": "a cat"},
             {"image": png((9, 9, 9)), "prompt": "make it red", "source_image": png((1, 1, 1)), "mask": png((255,) * 3)}]
    answer = client.post("/score", json={"items": items})
    assert answer.status_code == 200, answer.text
    # p4 = 0.6 / 0.8 = 0.75, p2 = 0.25: expected 4 * 0.75 + 2 * 0.25 = 3.5, reward 0.7
    assert [r["reward"] for r in answer.json()["results"]] == pytest.approx([0.7, 0.7], abs=1e-12)
    assert answer.json()["results"][0]["details"]["digit_probs"] == pytest.approx({"2": 0.25, "4": 0.75})
    assert answer.json()["version"].startswith("vlm-judge:judge-7b:prompt-")  # the model learned from /v1/models
    plain, edit = sent
    assert {k: plain[k] for k in ("model", "max_tokens", "temperature", "logprobs", "top_logprobs")} == \
        {"model": "judge-7b", "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": 20}
    parts = [part["type"] for part in edit["messages"][0]["content"]]
    assert parts == ["image_url", "image_url", "text"] and 'Prompt: "make it red"' in edit["messages"][0]["content"][2]["text"]
    source_first = edit["messages"][0]["content"][0]["image_url"]["url"]
    assert source_first == "data:image/png;base64," + png((1, 1, 1))
    refused = client.post("/score", json={"items": [items[0], {"image": png((9, 9, 9)), "prompt": "refuse"}]})
    assert refused.status_code == 422 and refused.json()["error"] == "judge_refused" and refused.json()["item"] == 1
    other = judge.create_app(judge.JudgeSettings(url="http://judge", model="judge-32b"), transport=httpx.MockTransport(vllm))
    assert TestClient(other).get("/readyz").status_code == 503  # it serves judge-7b, not the configured model


# --- against a real vLLM OpenAI server ------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_judge(tmp_path_factory):
    """vLLM's OpenAI server (vllm.entrypoints.openai.api_server) serving the tiny Idefics3, on a free
    port, with a 1 GiB KV cache; yields (base URL, model name). Its log is quoted when it fails to start."""
    model = tmp_path_factory.mktemp("tiny-vlm") / "model"
    port, log_path = free_port(), model.parent / "vllm.log"
    # tiny_vlm.py builds the model, then runs the server in the same process (torch imported once)
    command = [sys.executable, str(EXAMPLE / "tiny_vlm.py"), str(model), "--serve",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
               "--enforce-eager", "--max-num-seqs", "8", "--limit-mm-per-prompt", '{"image": 1}']
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_PLUGINS": "",  # no plugin: the installed paddlex one fails to load in every vLLM process
           # the model runs inside the engine process instead of a third one (each process spends
           # 20-35 s importing vLLM here); the same logprobs as the default layout
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # two processes import vLLM: tens of seconds, minutes on a busy box
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start (exit {process.poll()}):\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url, str(model)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the API server and its engine / worker processes
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def scorer(vllm_judge):
    """The judge scorer in front of that server (the model name learned from /v1/models)."""
    app = judge.create_app(judge.JudgeSettings(url=vllm_judge[0]))
    with serve_in_thread(app) as url:
        yield url, app.state.judge


ITEMS = [((230, 20, 20), "a red square"), ((10, 10, 10), "a black night sky"),
         ((250, 250, 250), 'a sign with the text "open"'), ((30, 200, 90), "a green field")]


def expected_reward(completion: dict) -> float:
    """The recipe recomputed here from the server's own answer: sum_d d e^lp_d / sum_d e^lp_d / 5."""
    top = completion["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    digits = [(int(entry["token"]), math.exp(entry["logprob"])) for entry in top if entry["token"] in "012345"
              and len(entry["token"]) == 1]
    return sum(d * p for d, p in digits) / sum(p for _, p in digits) / 5


@pytest.mark.slow
def test_scores_equal_the_expected_digit_of_the_judges_own_logprobs(vllm_judge, scorer):
    vllm_url, model = vllm_judge
    url, state = scorer
    answer = httpx.post(f"{url}/score", json={"items": [{"image": png(rgb), "prompt": p} for rgb, p in ITEMS]},
                        timeout=300)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert answer.json()["version"].startswith(f"vlm-judge:{model}:prompt-")
    template = judge.load_template(judge.PROMPT_FILE)
    for (rgb, prompt), result in zip(ITEMS, results):
        # the same chat request, sent to vLLM directly: its first token's top-20 logprobs
        data_url = "data:image/png;base64," + png(rgb)
        body = judge.chat_request(model, template.replace("{prompt}", prompt), [data_url], 20)
        completion = httpx.post(f"{vllm_url}/v1/chat/completions", json=body, timeout=300).json()
        # float32 on both paths; a request batched with others may round differently in the last
        # bits of a logit (~1e-6), far below 1e-4 on a ratio of exponentials of them
        assert result["reward"] == pytest.approx(expected_reward(completion), abs=1e-4)
        assert 0.0 <= result["reward"] <= 1.0
        assert result["details"]["digits_found"] >= 1  # the tiny judge's digit rows are scaled up
        assert sum(result["details"]["digit_probs"].values()) == pytest.approx(1.0, abs=1e-9)
        assert result["details"]["judge_latency_s"] > 0
    assert len({round(r["reward"], 6) for r in results}) > 1  # the image reaches the judge
    stats = httpx.get(f"{url}/stats").json()
    assert stats["judge_requests"] == len(state.latencies) >= len(ITEMS)
    assert 0 < stats["judge_latency_s"]["p50"] <= stats["judge_latency_s"]["p90"]
    assert httpx.get(f"{url}/readyz").json()["limits"]["max_items"] == judge.JudgeSettings.max_items


@pytest.mark.slow
def test_the_trainers_reward_path_scores_through_the_judge(scorer):
    """The run's reward mix calls an http scorer at its own URL (rl/scoring/service.py): limits from
    its /readyz, its version recorded, its rewards the judge's, row for row."""
    from rl.prompts.sources import PromptItem
    from rl.scoring.reward_mix import RewardComponentConfig
    from rl.scoring.service import RewardEndpoint, score_images

    url, _ = scorer
    images = np.stack([np.full((30, 40, 3), rgb, np.uint8) for rgb, _ in ITEMS])
    items = [PromptItem(prompt, "geneval") for _, prompt in ITEMS]
    mix = (RewardComponentConfig(name="judge", scorer="http", url=f"{url}/score"),)
    endpoint = RewardEndpoint(url="http://127.0.0.1:9", token=None, timeout_s=300, outage_budget_s=10,
                              backoff_s=0.05, mix=mix)  # the reward service itself is never called
    scored = score_images(endpoint, images, items, mix)
    direct = httpx.post(f"{url}/score", json={"items": [{"image": png(rgb), "prompt": p} for rgb, p in ITEMS]},
                        timeout=300).json()
    assert [row.scores["judge"] for row in scored.rewards] == pytest.approx(
        [r["reward"] for r in direct["results"]], abs=1e-4)  # the same pixels (PNG both ways), as above
    assert scored.versions["judge"] == direct["version"] and scored.failures == []
