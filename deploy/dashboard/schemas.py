"""Response models of the dashboard's JSON API (what `/api/...` returns, field by field)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RunSummary(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    id: str
    """Run id, as in `/api/runs/{id}`."""
    name: str
    """Name the trainer gave the run."""
    status: str
    """running, finished, failed or stopped."""
    started_at: float
    """Unix time the run was created."""
    ended_at: float | None
    """Unix time the run ended, null while running."""
    last_step: int | None
    """Highest step with metrics, null before the first one."""


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    time: float
    """Unix time of the event."""
    kind: str
    """resume, restart, error, ..."""
    message: str
    """Human-readable detail."""


class RunDetail(RunSummary):
    config: dict
    """The run's config as the trainer logged it."""
    metric_keys: list[str]
    """Every metric key logged so far."""
    sample_steps: list[int]
    """Steps that have training samples in the gallery."""
    eval_sample_steps: list[int]
    """Steps that have in-run evaluation samples (the eval gallery)."""
    events: list[Event]
    """Events in the order they happened."""


class Metrics(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    run_id: str
    """The run these metrics belong to."""
    steps: list[int]
    """Steps in ascending order (only steps after `since`)."""
    values: dict[str, list[float | None]]
    """Per key, one value per entry of `steps` (null where the key was not logged or not finite)."""


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    index: int
    """Position of the sample within its step."""
    prompt: str
    """The prompt the image was generated from."""
    reward: float
    """Total reward."""
    components: dict[str, float]
    """Reward breakdown by function / clause."""
    image_url: str
    """URL of the PNG on this server."""


class Samples(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    run_id: str
    """The run these samples belong to."""
    step: int | None
    """The step shown (null if the run has no samples yet)."""
    samples: list[Sample]
    """The step's samples in logging order."""
