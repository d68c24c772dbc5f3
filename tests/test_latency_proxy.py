"""The benchmark's latency-injecting proxy (bench/latency_proxy.py): forwards every request
unchanged, holds POSTs for its delay (concurrently), lets GETs through at once."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
from fastapi import FastAPI, Request

from bench.latency_proxy import serve_proxy
from tests.rewards_support import serve_in_thread


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.get("/readyz")
    def ready():
        return {"ready": True}

    @app.post("/v1/echo/{name}")
    async def echo(name: str, request: Request):
        if request.headers.get("authorization") != "Bearer t":
            return {"error": "no token"}
        return {"name": name, "query": dict(request.query_params), "body": (await request.body()).decode()}

    return app


def test_the_proxy_forwards_unchanged_and_delays_only_posts():
    with serve_in_thread(echo_app()) as upstream, serve_proxy(upstream, delay_s=0.5) as proxy:
        started = time.monotonic()
        assert httpx.get(f"{proxy}/readyz").json() == {"ready": True}
        assert time.monotonic() - started < 0.4  # GETs are not held
        started = time.monotonic()
        answer = httpx.post(f"{proxy}/v1/echo/ocr?x=1", content=b'{"items": [1]}', headers={"authorization": "Bearer t"})
        held = time.monotonic() - started
        assert answer.status_code == 200
        assert answer.json() == {"name": "ocr", "query": {"x": "1"}, "body": '{"items": [1]}'}
        assert 0.5 <= held < 1.5
        assert httpx.post(f"{proxy}/v1/nothing").status_code == 404  # the upstream's status comes back
        # 4 concurrent requests wait side by side (a remote service), not one after another (2 s)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda n: httpx.post(f"{proxy}/v1/echo/{n}", headers={"authorization": "Bearer t"},
                                                       timeout=10).status_code, range(4)))
        assert codes == [200] * 4 and time.monotonic() - started < 1.5
