"""The reward server app: `create_app(settings)`; models load once, in the lifespan.

Run it with `blip3o-rl rewards serve` (uvicorn) or as a Ray Serve application (rewards/serve.py).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request

from rewards.app.batching import Batcher
from rewards.app.deps import require_token
from rewards.app.errors import install_error_handlers
from rewards.app.metrics import Metrics
from rewards.app.middleware import BodyLimit
from rewards.app.routers import geneval, health, ocr, scores
from rewards.app.schemas import ErrorBody
from rewards.app.settings import Settings
from rewards.scorer import BUILTIN_SCORERS, ServedScorer, build_builtin, build_python

log = logging.getLogger(__name__)
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 422, 503)}
_PATHS = {"/v1/rewards/ocr", "/v1/rewards/geneval", "/healthz", "/readyz", "/metrics"}  # metric labels; others = "other"


def load_scorers(settings: Settings) -> dict[str, object]:
    """Build the scorers named in the settings (slow: loads models)."""
    scorers: dict[str, object] = {}
    if "ocr" in settings.scorers:
        from rewards.ocr import OcrScorer

        scorers["ocr"] = OcrScorer(settings.ocr)
    if "geneval" in settings.scorers:
        from rewards.geneval import GenevalScorer

        scorers["geneval"] = GenevalScorer.from_config(settings.geneval)
    for name in settings.scorers:
        if name in BUILTIN_SCORERS:
            scorers[name] = build_builtin(name, settings)
    for name, spec in settings.python_scorers.items():  # a user's module:function (import errors: ValueError)
        scorers[name] = build_python(name, spec)
    return scorers


def create_app(settings: Settings | None = None, scorers: dict[str, object] | None = None) -> FastAPI:
    """The app; `scorers` given = use them (Ray Serve, tests), else load `settings.scorers` at startup."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.scorers = scorers if scorers is not None else load_scorers(settings)
        app.state.batchers = {}
        generic = [name for name, scorer in app.state.scorers.items() if isinstance(scorer, ServedScorer)]
        for name in ["ocr", "geneval", *generic]:
            path = f"/v1/rewards/{name}"
            batcher = Batcher(settings.batch_size, settings.batch_wait_ms / 1000, app.state.metrics.batch_observer(name))
            batcher.start()
            app.state.batchers[path] = batcher
        app.state.ready = True
        log.info("reward server ready: scorers %s", sorted(app.state.scorers))
        yield
        app.state.ready = False
        for batcher in app.state.batchers.values():
            await batcher.stop()

    app = FastAPI(
        title="blip3o-rl rewards",
        description="Rewards for images: GenEval, OCR, and generic scorers at /v1/rewards/{name} "
                    "(see /readyz for the ones running). Errors are JSON: {error, message, item}.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.scorers = {}
    app.state.ready = False
    install_error_handlers(app)
    auth = [Depends(require_token)]
    app.include_router(health.router)
    app.include_router(ocr.router, dependencies=auth, responses=ERRORS)
    app.include_router(geneval.router, dependencies=auth, responses=ERRORS)
    app.include_router(scores.router, dependencies=auth, responses=ERRORS)  # after the named routes: they win

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.monotonic()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in _PATHS or request.url.path in app.state.batchers else "other"
        app.state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        app.state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        return response

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
