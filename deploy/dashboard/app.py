"""The dashboard app: JSON API over a `RunStore` plus the static page that polls it.

Read-only: it never writes the store, so any number of dashboards can watch a training run.
Endpoints are plain `def`s: SQLite reads are blocking and FastAPI runs them in its threadpool.
With a token (`DashboardSettings.token`), every /api route and the page need it: the header, or the
session cookie a browser gets by entering it once on the page (deploy/dashboard/auth.py). The page's
scripts and styles under /static are public (they are this repository's files), and so is the
OpenAPI schema (/api/docs, /api/openapi.json); the runs, metrics, configs and images are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import SecretStr

from deploy.dashboard.auth import (
    Credentials,
    Unauthorized,
    authorized,
    login_page,
    require_bearer,
    require_token,
    session_response,
    unauthorized_response,
)
from deploy.dashboard.schemas import Event, Metrics, RunDetail, RunSummary, Sample, Samples
from deploy.dashboard.settings import DashboardSettings
from rl.run_store import RunInfo, RunStore, SampleKind, UnknownRunError

STATIC_DIR = Path(__file__).parent / "static"
MAX_KEY_LENGTH = 200


def create_app(runs_dir: str | Path, token: SecretStr | str | None = None) -> FastAPI:
    """Build the app over `<runs_dir>/runs.db` (created empty if absent, so the page can wait for a
    run); `token`: require it (None = open)."""
    store = RunStore(runs_dir)
    app = FastAPI(title="blip3o-rl dashboard", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.token = SecretStr(token) if isinstance(token, str) else token
    app.add_exception_handler(Unauthorized, unauthorized_response)
    api = APIRouter(prefix="/api", dependencies=[Depends(require_token)])

    @app.exception_handler(UnknownRunError)
    def unknown_run(request: Request, error: UnknownRunError) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(error)})

    @app.post("/api/session", status_code=204, dependencies=[Depends(require_bearer)])
    def open_session(request: Request) -> Response:
        """A browser's session cookie for the token in the Authorization header (what the login page posts)."""
        return session_response(request)

    @api.get("/runs")
    def list_runs() -> list[RunSummary]:
        return [_summary(run) for run in store.list_runs()]

    @api.get("/runs/{run_id}")
    def get_run(run_id: str) -> RunDetail:
        run = store.get_run(run_id)
        return RunDetail(
            **_summary(run).model_dump(),
            config=run.config,
            metric_keys=store.metric_keys(run_id),
            sample_steps=store.sample_steps(run_id),
            eval_sample_steps=store.sample_steps(run_id, "eval"),
            events=[Event(time=e.time, kind=e.kind, message=e.message) for e in store.events(run_id)],
        )

    @api.get("/runs/{run_id}/metrics")
    def get_metrics(
        run_id: str,
        keys: Annotated[str | None, Query(description="comma-separated metric keys; all if absent")] = None,
        since: Annotated[int | None, Query(ge=-1, description="only steps greater than this")] = None,
    ) -> Metrics:
        wanted = _parse_keys(keys, known=store.metric_keys(run_id)) if keys is not None else None
        series = store.metrics(run_id, wanted, since)
        return Metrics(run_id=run_id, steps=series.steps, values=series.values)

    @api.get("/runs/{run_id}/samples")
    def get_samples(
        run_id: str,
        step: Annotated[int | None, Query(ge=0, description="step to show; the latest if absent")] = None,
        kind: Annotated[SampleKind, Query(description="train: the step's rollouts; eval: in-run evaluation")] = "train",
    ) -> Samples:
        steps = store.sample_steps(run_id, kind)
        if step is None:
            step = steps[-1] if steps else None
        elif step not in steps:
            raise HTTPException(404, f"run {run_id!r} has no {kind} samples at step {step}")
        stored = store.samples(run_id, step, kind) if step is not None else []
        samples = [
            Sample(
                index=s.index, prompt=s.prompt, reward=s.reward, components=s.components,
                image_url=f"/api/runs/{run_id}/samples/{s.step}/{s.index}.png?kind={kind}",
            )
            for s in stored
        ]
        return Samples(run_id=run_id, step=step, samples=samples)

    @api.get("/runs/{run_id}/samples/{step}/{index}.png", response_class=FileResponse)
    def get_sample_image(run_id: str, step: int, index: int, kind: SampleKind = "train") -> FileResponse:
        match = [s for s in store.samples(run_id, step, kind) if s.index == index]
        if not match:
            raise HTTPException(404, f"run {run_id!r} has no {kind} sample {index} at step {step}")
        return FileResponse(store.runs_dir / match[0].image, media_type="image/png")

    @app.get("/", include_in_schema=False)
    def index(request: Request, credentials: Credentials) -> Response:
        if not authorized(request, credentials):
            return login_page()
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _summary(run: RunInfo) -> RunSummary:
    return RunSummary(
        id=run.id, name=run.name, status=run.status,
        started_at=run.started_at, ended_at=run.ended_at, last_step=run.last_step,
    )


def _parse_keys(keys: str, known: list[str]) -> list[str]:
    """Split `a,b,c`; an empty or unknown key is a 422 naming the culprit."""
    wanted = [key.strip() for key in keys.split(",")]
    for key in wanted:
        if not key or len(key) > MAX_KEY_LENGTH:
            raise HTTPException(422, f"bad metric key {key[:MAX_KEY_LENGTH]!r} in keys={keys[:500]!r}")
        if key not in known:
            raise HTTPException(422, f"unknown metric key {key!r}; this run has {known}")
    return wanted


def serve(settings: DashboardSettings) -> None:
    """Run the dashboard with uvicorn until interrupted (what `blip3o-rl dashboard` calls)."""
    import uvicorn

    from rewards.app.run import warn_if_open

    warn_if_open(settings.host, settings.token, "serving the dashboard")
    uvicorn.run(create_app(settings.runs_dir, settings.token), host=settings.host, port=settings.port, log_level="info")
