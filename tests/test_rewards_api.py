"""The reward REST API over a real socket (uvicorn on an ephemeral port): endpoints, every kind of
bad input (4xx JSON naming the item, server keeps serving), concurrency with batching, auth.
Scorers are stubs swapped in through FastAPI dependency overrides; test_rewards_api_real.py runs
the real ones."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from rewards.app.deps import get_geneval_scorer, get_ocr_scorer
from rewards.app.main import create_app
from rewards.app.settings import Settings
from rewards.client import encode_png
from tests.rewards_support import StubGeneval, StubOcr, serve_in_thread

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def id_image(number: int, size: int = 8) -> np.ndarray:
    """An image whose pixels encode `number` (so a stub can tell requests apart)."""
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0], image[..., 1] = number % 256, number // 256
    return image


@pytest.fixture(scope="module")
def stubs():
    return StubOcr(), StubGeneval()


@pytest.fixture(scope="module")
def url(stubs):
    settings = Settings(
        scorers=[], token=TOKEN, max_items=8, max_body_bytes=2_000_000, max_image_pixels=1_000_000, batch_wait_ms=5
    )
    app = create_app(settings)
    app.dependency_overrides[get_ocr_scorer] = lambda: stubs[0]
    app.dependency_overrides[get_geneval_scorer] = lambda: stubs[1]
    with serve_in_thread(app) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        yield client


def test_health_ready_metrics(http):
    assert http.get("/healthz").json() == {"status": "ok", "scorers": []}
    assert http.get("/readyz").json()["status"] == "ready"
    http.post("/v1/rewards/ocr", json={"items": [{"image": encode_png(id_image(7)), "target": "id-7"}]})
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'reward_requests_total{endpoint="/v1/rewards/ocr",status="200"}' in metrics.text
    assert "reward_batch_size_bucket" in metrics.text
    assert http.get("/docs").status_code == 200 and "/v1/rewards/geneval" in http.get("/openapi.json").json()["paths"]


def test_ocr_endpoint(http):
    items = [
        {"image": encode_png(id_image(3)), "prompt": 'a sign that says "id-3"'},
        {"image": encode_png(id_image(4)), "target": "id-9"},  # reads id-4: one substitution of 4 chars
        {"image": "data:image/png;base64," + encode_png(id_image(5)), "target": "ID- 5"},
    ]
    response = http.post("/v1/rewards/ocr", json={"items": items})
    assert response.status_code == 200, response.text
    no_regions = {"regions": []}  # the stub reads no character boxes
    assert response.json()["results"] == [
        {"reward": 1.0, "recognized": "id-3", "target": "id-3", "details": no_regions},
        {"reward": 0.75, "recognized": "id-4", "target": "id-9", "details": no_regions},
        {"reward": 1.0, "recognized": "id-5", "target": "ID- 5", "details": no_regions},
    ]


def test_geneval_endpoint(http):
    bright, dark = np.full((16, 16, 3), 200, np.uint8), np.zeros((16, 16, 3), np.uint8)
    metadata = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "brown"}], "prompt": "a brown dog"}
    body = {"items": [{"image": encode_png(bright), "metadata": metadata}, {"image": encode_png(dark), "metadata": metadata}]}
    response = http.post("/v1/rewards/geneval", json=body)
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["correct"] is True and first["reward"] == 1.0 and first["tag"] == "colors"
    assert first["details"]["objects"] == [{"label": "dog", "box": [0.0, 0.0, 16.0, 16.0], "score": 0.95}]
    assert first["details"]["include"] == [
        {"class": "dog", "count": 1, "found": 1, "ok": True, "colors": ["brown"], "relations": None}
    ]
    assert second["correct"] is False and second["reward"] == 0.0 and second["details"]["terms"] == [0.0, 0.0]


# ---- bad input: one case each; 4xx JSON naming the problem (and item), then /healthz still answers ----

GOOD = encode_png(id_image(1))
GOOD_META = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}


def png_header_only(width: int, height: int) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def ocr_body(bad_item: dict) -> bytes:
    return json.dumps({"items": [{"image": GOOD, "target": "id-1"}, bad_item]}).encode()


def geneval_body(metadata: dict) -> bytes:
    return json.dumps({"items": [{"image": GOOD, "metadata": GOOD_META}, {"image": GOOD, "metadata": metadata}]}).encode()


_truncated = base64.b64decode(encode_png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
_bomb = io.BytesIO()
Image.new("RGB", (1200, 1000)).save(_bomb, format="PNG")  # 1.2 MP > the 1 MP limit, a few KB on the wire

BAD_INPUTS = {
    # name: (path, raw body, headers, status, error code, item index, words in the message)
    "invalid JSON": ("/v1/rewards/ocr", b'{"items": [', {}, 400, "invalid_json", None, "JSON"),
    "wrong types": ("/v1/rewards/ocr", ocr_body({"image": 5, "target": "x"}), {}, 422, "invalid_request", 1, "image"),
    "bad base64": ("/v1/rewards/ocr", ocr_body({"image": "not base64!!", "target": "x"}), {}, 422, "bad_base64", 1, "base64"),
    "corrupt image": ("/v1/rewards/ocr", ocr_body({"image": base64.b64encode(b"hello world").decode(), "target": "x"}), {}, 422, "bad_image", 1, "PNG"),
    "truncated image": ("/v1/rewards/ocr", ocr_body({"image": base64.b64encode(_truncated[: len(_truncated) // 2]).decode(), "target": "x"}), {}, 422, "bad_image", 1, "truncated"),
    "0x0 image": ("/v1/rewards/ocr", ocr_body({"image": png_header_only(0, 0), "target": "x"}), {}, 422, "bad_image", 1, "0x0"),
    "huge image header": ("/v1/rewards/ocr", ocr_body({"image": png_header_only(100_000, 100_000), "target": "x"}), {}, 413, "image_too_large", 1, "pixels"),
    "decompression bomb": ("/v1/rewards/ocr", ocr_body({"image": base64.b64encode(_bomb.getvalue()).decode(), "target": "x"}), {}, 413, "image_too_large", 1, "1200x1000"),
    "unknown tag": ("/v1/rewards/geneval", geneval_body({**GOOD_META, "tag": "shapes"}), {}, 422, "invalid_request", 1, "tag"),
    "class not in COCO": ("/v1/rewards/geneval", geneval_body({"tag": "single_object", "include": [{"class": "unicorn", "count": 1}]}), {}, 422, "invalid_request", 1, "class"),
    "missing prompt quotes": ("/v1/rewards/ocr", ocr_body({"image": GOOD, "prompt": "a sign with no quotes"}), {}, 422, "missing_quotes", 1, "double-quoted"),
    "empty target": ("/v1/rewards/ocr", ocr_body({"image": GOOD, "prompt": 'a sign saying ""'}), {}, 422, "empty_target", 1, "empty"),
    "too many items": ("/v1/rewards/ocr", json.dumps({"items": [{"image": GOOD, "target": "x"}] * 9}).encode(), {}, 413, "too_many_items", 8, "limit is 8"),
    "oversized body": ("/v1/rewards/ocr", b'{"items": "' + b"x" * 2_100_000 + b'"}', {}, 413, "body_too_large", None, "2000000 bytes"),
    "wrong token": ("/v1/rewards/ocr", ocr_body({"image": GOOD, "target": "x"}), {"Authorization": "Bearer nope"}, 401, "unauthorized", None, "token"),
    "no token": ("/v1/rewards/geneval", geneval_body(GOOD_META), {"Authorization": ""}, 401, "unauthorized", None, "token"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_json_error_and_server_lives(http, name):
    path, body, headers, status, code, item, words = BAD_INPUTS[name]
    response = http.post(path, content=body, headers={"Content-Type": "application/json", **headers})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error"] == code and error["item"] == item and words in error["message"], error
    # RFC 7235: a 401 names the scheme that would succeed
    assert response.headers.get("WWW-Authenticate") == ("Bearer" if status == 401 else None)
    assert http.get("/healthz").status_code == 200


def test_chunked_oversized_body_is_refused(http):
    def chunks():
        for _ in range(30):
            yield b"x" * 100_000  # 3 MB, no Content-Length

    response = http.post("/v1/rewards/ocr", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"
    assert http.get("/healthz").status_code == 200


def test_concurrent_requests_each_get_their_own_answer_and_are_batched(url, stubs):
    stubs[0].batches.clear()

    async def client(worker: int) -> list[bool]:
        ok = []
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http:
            for request in range(25):
                number = worker * 25 + request
                body = {"items": [{"image": encode_png(id_image(number)), "target": f"id-{number}"}]}
                result = (await http.post("/v1/rewards/ocr", json=body)).json()["results"][0]
                ok.append(result == {"reward": 1.0, "recognized": f"id-{number}", "target": f"id-{number}",
                                     "details": {"regions": []}})
        return ok

    async def main():
        return await asyncio.gather(*(client(worker) for worker in range(16)))

    answers = [ok for worker in asyncio.run(main()) for ok in worker]
    assert len(answers) == 400 and all(answers)
    assert sum(stubs[0].batches) == 400 and max(stubs[0].batches) > 1  # items shared model calls


def test_readyz_tells_clients_the_scorers_and_the_request_limits(http):
    assert http.get("/readyz").json() == {
        "status": "ready", "scorers": [],
        "limits": {"max_items": 8, "max_body_bytes": 2_000_000, "max_image_pixels": 1_000_000}, "versions": {},
    }


def test_a_scorer_the_server_does_not_run_is_a_404_naming_those_it_runs_and_is_not_retried():
    """Not a 503: the client would retry that for the whole outage budget."""
    from rewards.client import RewardClient, RewardRequestError
    from rewards.geneval_rules import GenevalMetadata

    app = create_app(Settings(scorers=["ocr"]), scorers={"ocr": StubOcr()})
    with serve_in_thread(app) as base:
        response = httpx.post(f"{base}/v1/rewards/geneval", content=geneval_body(GOOD_META),
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "scorer_not_loaded"
        assert "does not run the geneval scorer; it runs: ocr" in response.json()["message"]

        async def score():
            async with RewardClient(base, backoff_s=0.01, retry_budget_s=60) as client:
                try:
                    await client.geneval([id_image(1)], [GenevalMetadata.model_validate(GOOD_META)])
                finally:
                    assert client.failures == []  # refused at once, never retried

        with pytest.raises(RewardRequestError, match="404 scorer_not_loaded"):
            asyncio.run(score())
