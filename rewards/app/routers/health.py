"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers call these)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rewards.app.schemas import Health, Limits, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up and serving."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request):
    """The scorers are loaded (503 while they load); which ones run, and the request limits
    (clients split their work to fit them)."""
    settings = request.app.state.settings
    limits = Limits(max_items=settings.max_items, max_body_bytes=settings.max_body_bytes,
                    max_image_pixels=settings.max_image_pixels)
    scorers = request.app.state.scorers
    names = sorted(scorers)
    if not request.app.state.ready:
        return JSONResponse(Readiness(status="loading", scorers=names, limits=limits).model_dump(), status_code=503)
    versions = {name: scorers[name].version for name in names if isinstance(getattr(scorers[name], "version", None), str)}
    return Readiness(status="ready", scorers=names, limits=limits, versions=versions)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
