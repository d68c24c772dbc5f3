"""The async client's retry policy: back off and retry on 5xx and connection errors, never on 4xx.
Uses httpx's own MockTransport for scripted answers, and a closed port for a real connect error."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import numpy as np
import pytest

from rewards.client import RewardClient, RewardRequestError, RewardServerError

OK = {"results": [{"reward": 1.0, "recognized": "open", "target": "open"}]}
IMAGE = np.zeros((4, 4, 3), np.uint8)


def scripted(*answers: tuple[int, dict]):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status, body = answers[min(len(calls), len(answers)) - 1]
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler), calls


def run_ocr(transport, **kwargs):
    async def go():
        async with RewardClient("http://rewards", transport=transport, backoff_s=0.01, **kwargs) as client:
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
                                retry_budget_s=30) as client:
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
