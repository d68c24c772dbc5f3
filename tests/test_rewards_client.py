"""The async client's retry policy: back off and retry on 5xx and connection errors, never on 4xx;
and how it splits work into requests that fit the server's limits. Uses httpx's own MockTransport
for scripted answers, a closed port for a real connect error, and the real app (stub OCR) over a
socket for splitting."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import numpy as np
import pytest

from rewards.app.schemas import Limits
from rewards.client import RewardClient, RewardRequestError, RewardServerError, check_pixels, encode_png, pack_items
from tests.rewards_support import StubOcr, serve_in_thread

OK = {"results": [{"reward": 1.0, "recognized": "open", "target": "open"}]}
IMAGE = np.zeros((4, 4, 3), np.uint8)
LIMITS = Limits(max_items=64, max_body_bytes=64 * 2**20, max_image_pixels=4096 * 4096)
"""Given to the client, so the scripted answers below are all for the scoring requests."""


def scripted(*answers: tuple[int, dict]):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status, body = answers[min(len(calls), len(answers)) - 1]
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler), calls


def run_ocr(transport, **kwargs):
    async def go():
        async with RewardClient("http://rewards", transport=transport, backoff_s=0.01, limits=LIMITS,
                                **kwargs) as client:
            return await client.ocr([IMAGE], targets=["open"])

    return asyncio.run(go())


def test_retries_5xx_then_succeeds():
    transport, calls = scripted((503, {"error": "x", "message": "busy", "item": None}), (500, {}), (200, OK))
    assert run_ocr(transport, retries=3)[0].reward == 1.0
    assert len(calls) == 3
    assert calls[0].content == calls[2].content  # the same request body each time


def test_gives_up_after_retries():
    transport, calls = scripted((502, {}))
    with pytest.raises(RewardServerError, match="3 attempts; last: HTTP 502"):
        run_ocr(transport, retries=2)
    assert len(calls) == 3


def test_never_retries_4xx_and_keeps_the_servers_message():
    error_body = {"error": "bad_image", "message": "image is corrupt", "item": 0}
    transport, calls = scripted((422, error_body), (200, OK))
    with pytest.raises(RewardRequestError) as error:
        run_ocr(transport, retries=3)
    assert len(calls) == 1
    assert (error.value.status, error.value.code, error.value.message, error.value.item) == (422, "bad_image", "image is corrupt", 0)


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def go():
        async with RewardClient(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01, timeout_s=5) as client:
            await client.ocr([IMAGE], targets=["open"])

    with pytest.raises(RewardServerError, match="ConnectError"):
        asyncio.run(go())


def test_token_is_sent_as_bearer():
    transport, calls = scripted((200, OK))
    run_ocr(transport, token="abc")
    assert calls[0].headers["Authorization"] == "Bearer abc"


def test_retry_budget_rides_out_a_short_outage_and_records_each_failure():
    transport, calls = scripted(*([(503, {})] * 5), (200, OK))

    async def go():
        async with RewardClient("http://rewards", transport=transport, backoff_s=0.01, retries=0,
                                retry_budget_s=30, limits=LIMITS) as client:
            results = await client.ocr([IMAGE], targets=["open"])
            return results, client.failures

    results, failures = asyncio.run(go())
    assert results[0].reward == 1.0 and len(calls) == 6  # 5 failures despite retries=0: the budget rules
    assert failures == ["HTTP 503: {}"] * 5


def test_retry_budget_gives_up_once_spent():
    transport, calls = scripted((503, {}))
    started = time.monotonic()
    with pytest.raises(RewardServerError, match=r"kept failing for \d+ s \(\d+ attempts, retry budget 1 s\)"):
        run_ocr(transport, retry_budget_s=1.0)
    elapsed = time.monotonic() - started
    # after 6 failures it has waited 0.01 + 0.02 + ... + 0.32 = 0.63 s; the 7th failure's delay (0.64)
    # would overshoot the 1 s budget, so it gives up there instead of sleeping past it
    assert len(calls) == 7 and elapsed < 1.0


def noisy_id_image(number: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """Incompressible noise (so its PNG size is known in advance) whose first pixel encodes `number`."""
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    image[0, 0, 0], image[0, 0, 1] = number % 256, number // 256
    return image


class RecordingTransport(httpx.AsyncHTTPTransport):
    """A real HTTP transport that remembers the body size of every POST it sends."""

    def __init__(self):
        super().__init__()
        self.posted: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.posted.append(len(request.content))
        return await super().handle_async_request(request)


def test_work_over_the_servers_limits_is_split_into_requests_that_fit_with_results_in_order():
    from rewards.app.main import create_app
    from rewards.app.settings import Settings

    limits = {"max_items": 4, "max_body_bytes": 4096, "max_image_pixels": 40 * 40}
    rng = np.random.default_rng(0)
    # 8x8 noise is ~0.3 kB as an item and 24x24 noise ~2.3 kB: the item count and the body size each
    # close some of the requests
    images = [noisy_id_image(n, 24 if n % 3 == 0 else 8, rng) for n in range(11)]
    targets = [f"id-{n}" for n in range(11)]
    transport = RecordingTransport()
    with serve_in_thread(create_app(Settings(scorers=["ocr"], **limits), scorers={"ocr": StubOcr()})) as url:
        async def go():
            async with RewardClient(url, transport=transport, backoff_s=0.01) as client:
                results = await client.ocr(images, targets=targets)
                with pytest.raises(RewardRequestError) as unsplit:  # the limits are real: one request is refused
                    await client.post("/v1/rewards/ocr", {"items": [{"image": encode_png(i), "target": t}
                                                                    for i, t in zip(images, targets)]})
                return results, unsplit.value

        results, unsplit = asyncio.run(go())
    assert [r.recognized for r in results] == targets and all(r.reward == 1.0 for r in results)
    assert unsplit.status == 413
    posted = transport.posted[:-1]  # the last one is the refused single request
    assert len(posted) >= 4 and all(size <= limits["max_body_bytes"] for size in posted)
    assert any(size > limits["max_body_bytes"] // 2 for size in posted)  # bodies are filled, not one item each


def test_items_are_packed_by_count_and_bytes_and_one_that_cannot_fit_is_named():
    items = [{"image": "x" * size} for size in (100, 100, 100, 900, 100)]
    limits = Limits(max_items=2, max_body_bytes=1024, max_image_pixels=100)
    bodies = pack_items(items, limits)
    assert [first for first, _ in bodies] == [0, 2, 3, 4]  # 2 items, then 100 + 900 bytes do not fit together
    assert all(len(body) <= 1024 for _, body in bodies)
    assert [item for _, body in bodies for item in json.loads(body)["items"]] == items
    with pytest.raises(RewardRequestError, match="item_too_large.*at most 1024") as error:
        pack_items([*items, {"image": "x" * 1100}], limits)
    assert error.value.item == 5
    with pytest.raises(RewardRequestError, match=r"image_too_large: image is 11x10, more than .* \(100\)") as error:
        check_pixels([np.zeros((10, 10, 3), np.uint8), np.zeros((10, 11, 3), np.uint8)], limits)
    assert error.value.item == 1
