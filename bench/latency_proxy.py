"""A reverse proxy that holds every scoring request for a fixed time before forwarding it: the
reward service as a remote judge (an API across a network, a large model behind a queue), for the
trainer benchmark's sync vs async comparison (bench/bench_trainer.py).

POST requests (the scoring calls) wait `delay_s`, then go to the upstream unchanged; GET requests
(/readyz, limits) pass at once, so start-up checks are not slowed. Waiting is asyncio, so
concurrent requests overlap as they would at a remote service.

    with serve_proxy("http://127.0.0.1:8000", delay_s=1.5) as url: ...
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rewards.local_server import serve_in_thread

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}
"""Not forwarded: they describe one connection (httpx recomputes them; it also un-gzips bodies)."""
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def create_proxy_app(upstream: str, delay_s: float, delayed_methods: frozenset[str] = frozenset({"POST"})) -> Starlette:
    """A Starlette app forwarding every path to `upstream`, `delayed_methods` after `delay_s`."""
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app):
        async with httpx.AsyncClient(base_url=upstream, timeout=None) as client:
            state["client"] = client
            yield

    async def forward(request: Request) -> Response:
        if request.method in delayed_methods:
            await asyncio.sleep(delay_s)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        answer = await state["client"].request(request.method, request.url.path, params=request.query_params,
                                               content=await request.body(), headers=headers)
        return Response(answer.content, status_code=answer.status_code,
                        headers={k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS})

    return Starlette(routes=[Route("/{path:path}", forward, methods=METHODS)], lifespan=lifespan)


@contextmanager
def serve_proxy(upstream: str, delay_s: float) -> Iterator[str]:
    """The proxy on 127.0.0.1 (a free port) in a background thread; yields its base URL."""
    with serve_in_thread(create_proxy_app(upstream, delay_s), ready_timeout_s=60) as url:
        yield url
