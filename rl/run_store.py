"""Run store: one SQLite database (`runs.db`, WAL mode) plus sample PNGs under a runs directory.

The trainer writes (one process), the dashboard reads (other processes) at the same time. WAL lets
readers see the last committed step while the writer appends the next one, without either
locking the other out. Every write method is one transaction, so a trainer killed mid-step
(SIGKILL) leaves the store at the end of its last completed write: a step's metrics are all
there or none are. Sample PNGs are written (temp file + rename) before the rows that name them
are committed (under fresh names); a kill in between leaves an unreferenced file, never a row
without its image or with another sample's image. Files no row names any more are deleted after
the commit that orphaned them.

Metric keys the dashboard knows how to chart (deploy/dashboard/static/dashboard.js, PANELS; any
other key gets a panel of its own). A value that was not measured at a step is not logged (or is
NaN, stored as NULL): the dashboard draws a gap there, never a placeholder 0.
    reward/mean                 mean total reward of the step's samples
    reward/<function>           mean raw reward of each reward component over the samples it scored
                                (reward/ocr, reward/geneval, or the names in `rewards.mix`)
    geneval/<tag>               GenEval accuracy per tag (single_object, counting, position, ...)
    ocr/<name>                  OCR reward details (ocr/exact, ...), fractions
    policy/kl, policy/entropy, policy/clip_fraction, ...   learner numbers (absent without an update)
    diffusion/<name>            the diffusion decoder's Flow-GRPO learner (train: diffusion), beside the AR
                                policy's policy/* in a joint run: kl (per SDE step), clip_fraction (share
                                of (image, SDE step) pairs), loss, policy_loss, grad_norm, ratio_max,
                                ratio_min, lr, version, logprob_diff (max |learner - sampler| per-step
                                log-prob), zero_signal_share. A diffusion-only run logs policy/version
                                (constant: the AR policy is frozen) and no other policy/* learner key.
    time/<stage>                seconds per step by stage: rollout, decode, reward, update, sync
                                (update_diffusion, sync_diffusion when the decoder learns)
    throughput/<name>           e.g. throughput/images_per_s
    reward_latency/<component>/<p50|p90|p99|max>   seconds of each reward component's requests over the
                                step (one a chunk; rl/scoring/latency.py): one panel per component
    schedule/<name>             the async schedule (rl/run/step_report.py): in_flight_steps, staleness_min /
                                _mean / _max (versions behind, over the step's rows), stale_rows_resampled
    eval/<bench>/<name>         in-run evaluation: one panel per `eval/<bench>` (connected points);
                                rl/evaluation/in_run.py logs eval/<bench>/score, eval/ocr/exact, eval/geneval/<tag>
    time/eval                   seconds of the in-run eval at its steps (a sparse panel of its own)
    images/<statistic>          the step's image statistics (rl/guard/image_stats.py: dark_share, brightness,
                                colour_entropy, edge_density, group_diversity): one panel each
    guard/<statistic>[/<name>]  any other guard number: one panel per statistic

Samples come in two kinds: "train" (the step's rollouts, table `samples`) and "eval" (images of
the in-run evaluation, table `eval_samples`, same columns); each has its own gallery. The eval
table was added later: opening an older database creates it (CREATE TABLE IF NOT EXISTS).

Resume: `last_step` says where the store stops; `resume_run(run_id, checkpoint_step)` drops
whatever was logged after the checkpoint (the steps the trainer is about to redo) and records a
"resume" event. Logging a step again also replaces it (`log_metrics` / `log_samples` are
idempotent per (run, step)), so a resumed run never shows a step twice.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

RunStatus = Literal["running", "finished", "failed", "stopped"]
SampleKind = Literal["train", "eval"]
_SAMPLE_TABLES: dict[str, str] = {"train": "samples", "eval": "eval_samples"}  # the only table names in SQL text
MetricsListener = Callable[[str, int, dict[str, float | None]], None]
RUN_STATUSES: tuple[str, ...] = ("running", "finished", "failed", "stopped")
DB_NAME = "runs.db"
BUSY_TIMEOUT_MS = 10_000  # a second writer (or a checkpointing reader) waits this long, then errors

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL,
    started_at REAL NOT NULL, ended_at REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id), step INTEGER NOT NULL, key TEXT NOT NULL,
    value REAL, time REAL NOT NULL, PRIMARY KEY (run_id, step, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metric_keys (
    run_id TEXT NOT NULL REFERENCES runs(id), key TEXT NOT NULL, PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS samples (
    run_id TEXT NOT NULL REFERENCES runs(id), step INTEGER NOT NULL, idx INTEGER NOT NULL,
    prompt TEXT NOT NULL, image TEXT NOT NULL, reward REAL NOT NULL, components TEXT NOT NULL,
    PRIMARY KEY (run_id, step, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS eval_samples (
    run_id TEXT NOT NULL REFERENCES runs(id), step INTEGER NOT NULL, idx INTEGER NOT NULL,
    prompt TEXT NOT NULL, image TEXT NOT NULL, reward REAL NOT NULL, components TEXT NOT NULL,
    PRIMARY KEY (run_id, step, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL REFERENCES runs(id),
    time REAL NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL
);
"""

# A run's columns plus its last step (an index seek on metrics' primary key, not a scan).
_SELECT_RUN = (
    "SELECT r.id, r.name, r.config, r.status, r.started_at, r.ended_at, "
    "(SELECT MAX(step) FROM metrics WHERE run_id = r.id) FROM runs r"
)


class UnknownRunError(KeyError):
    """Raised for a run id the store does not hold (the dashboard answers 404)."""

    def __str__(self) -> str:
        return f"unknown run id {self.args[0]!r}"


@dataclass
class SampleRecord:
    """One generated sample as the trainer logs it."""

    prompt: str
    image: np.ndarray | str | Path  # uint8 [H, W, 3] pixels, or the path of an existing image file
    reward: float
    components: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredSample:
    """A sample as read back: the image is a path relative to the runs directory."""

    step: int
    index: int
    prompt: str
    image: str
    reward: float
    components: dict[str, float]


@dataclass(frozen=True)
class RunInfo:
    id: str
    name: str
    config: dict
    status: str
    started_at: float
    ended_at: float | None
    last_step: int | None


@dataclass(frozen=True)
class EventRecord:
    time: float
    kind: str
    message: str


@dataclass(frozen=True)
class MetricSeries:
    """Metrics aligned on steps (the shape a chart wants): values[key][i] belongs to steps[i]."""

    steps: list[int]
    values: dict[str, list[float | None]]


class RunStore:
    """Typed writer and reader over `<runs_dir>/runs.db`; safe to open from many processes."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.runs_dir / DB_NAME
        self._listeners: list[MetricsListener] = []
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file
            db.executescript(_SCHEMA)  # one implicit transaction; IF NOT EXISTS makes reopening safe
        finally:
            db.close()

    @classmethod
    def existing(cls, runs_dir: str | Path) -> RunStore | None:
        """The store of `runs_dir` if a run has created it, else None: a reader watching for a run
        that has not started must not create the database (or the directory) itself."""
        return cls(runs_dir) if (Path(runs_dir) / DB_NAME).is_file() else None

    # ---- connections: one short-lived connection per call, so threads and processes never share
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process crash loses nothing committed
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlocks
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN")  # one snapshot for the whole read
            yield db
            db.execute("COMMIT")
        finally:
            db.close()

    # ---- writer API (the trainer)
    def create_run(self, name: str, config: dict) -> str:
        """Register a new run (status "running") and return its id: `<name>-<UTC time>-<4 hex>`."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
        run_id = f"{slug}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
        with self._transaction() as db:
            db.execute(
                "INSERT INTO runs (id, name, config, status, started_at) VALUES (?, ?, ?, 'running', ?)",
                (run_id, name, json.dumps(config), time.time()),
            )
        return run_id

    def add_metrics_listener(self, listener: MetricsListener) -> None:
        """Call `listener(run_id, step, metrics)` after every committed `log_metrics` of this store
        object (how a run mirrors its metrics to Weights & Biases: rl/run/wandb_logger.py). Non-finite
        values arrive as None, as stored."""
        self._listeners.append(listener)

    def log_metrics(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics, replacing whatever that step held before."""
        now = time.time()
        values = {key: _finite_or_none(value) for key, value in metrics.items()}
        rows = [(run_id, step, key, value, now) for key, value in values.items()]
        with self._transaction() as db:
            self._require_run(db, run_id)
            db.execute("DELETE FROM metrics WHERE run_id = ? AND step = ?", (run_id, step))
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?)", rows)
            db.executemany("INSERT OR IGNORE INTO metric_keys VALUES (?, ?)", [(run_id, key) for key in metrics])
        for listener in self._listeners:
            listener(run_id, step, values)

    def log_samples(self, run_id: str, step: int, samples: list[SampleRecord], kind: SampleKind = "train") -> None:
        """Save the step's images as PNGs, then record the samples (replacing the step's old ones of
        this kind): "train" for the step's rollouts, "eval" for the in-run evaluation's images."""
        table = _SAMPLE_TABLES[kind]
        with self._read() as db:
            self._require_run(db, run_id)
        step_dir = self._samples_dir(run_id, kind) / f"step_{step:07d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        stamp = secrets.token_hex(3)  # fresh names: relogging a step never rewrites files rows point at
        rows = []
        for index, sample in enumerate(samples):
            image_path = step_dir / f"{index:04d}-{stamp}.png"
            _write_png(sample.image, image_path)
            rows.append((
                run_id, step, index, sample.prompt, image_path.relative_to(self.runs_dir).as_posix(),
                float(sample.reward), json.dumps({k: float(v) for k, v in sample.components.items()}),
            ))
        with self._transaction() as db:
            db.execute(f"DELETE FROM {table} WHERE run_id = ? AND step = ?", (run_id, step))
            db.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        for old in step_dir.glob("*.png"):  # the step's previous images, now unreferenced
            if not old.name.endswith(f"-{stamp}.png"):
                old.unlink(missing_ok=True)

    def log_event(self, run_id: str, kind: str, message: str) -> None:
        """Record something that happened (worker restart, resume, error) with the wall time."""
        with self._transaction() as db:
            self._require_run(db, run_id)
            db.execute(
                "INSERT INTO events (run_id, time, kind, message) VALUES (?, ?, ?, ?)",
                (run_id, time.time(), kind, message),
            )

    def finish_run(self, run_id: str, status: RunStatus) -> None:
        """Set the final status (finished / failed / stopped) and the end time."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {status!r}")
        ended_at = None if status == "running" else time.time()
        with self._transaction() as db:
            self._require_run(db, run_id)
            db.execute("UPDATE runs SET status = ?, ended_at = ? WHERE id = ?", (status, ended_at, run_id))

    def resume_run(self, run_id: str, checkpoint_step: int) -> None:
        """Reopen a run from a checkpoint: drop steps after it, mark it running, log a resume event."""
        with self._transaction() as db:
            self._require_run(db, run_id)
            dropped = db.execute(
                "SELECT COUNT(DISTINCT step) FROM metrics WHERE run_id = ? AND step > ?",
                (run_id, checkpoint_step),
            ).fetchone()[0]
            db.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (run_id, checkpoint_step))
            for table in _SAMPLE_TABLES.values():
                db.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", (run_id, checkpoint_step))
            db.execute(
                "DELETE FROM metric_keys WHERE run_id = ? AND key NOT IN (SELECT key FROM metrics WHERE run_id = ?)",
                (run_id, run_id),
            )
            db.execute("UPDATE runs SET status = 'running', ended_at = NULL WHERE id = ?", (run_id,))
            db.execute(
                "INSERT INTO events (run_id, time, kind, message) VALUES (?, ?, 'resume', ?)",
                (run_id, time.time(), f"resumed from step {checkpoint_step}; dropped {dropped} later steps"),
            )
        for kind in _SAMPLE_TABLES:
            for step_dir in self._samples_dir(run_id, kind).glob("step_*"):  # files go after their rows
                if int(step_dir.name.removeprefix("step_")) > checkpoint_step:
                    shutil.rmtree(step_dir, ignore_errors=True)

    def last_step(self, run_id: str) -> int | None:
        """The highest step with metrics, or None for a run that has logged none."""
        with self._read() as db:
            self._require_run(db, run_id)
            return db.execute("SELECT MAX(step) FROM metrics WHERE run_id = ?", (run_id,)).fetchone()[0]

    # ---- reader API (the dashboard)
    def list_runs(self) -> list[RunInfo]:
        """All runs, newest first."""
        with self._read() as db:
            rows = db.execute(f"{_SELECT_RUN} ORDER BY r.started_at DESC, r.id DESC").fetchall()
        return [_run_info(row) for row in rows]

    def get_run(self, run_id: str) -> RunInfo:
        with self._read() as db:
            row = db.execute(f"{_SELECT_RUN} WHERE r.id = ?", (run_id,)).fetchone()
        if row is None:
            raise UnknownRunError(run_id)
        return _run_info(row)

    def metric_keys(self, run_id: str) -> list[str]:
        with self._read() as db:
            self._require_run(db, run_id)
            rows = db.execute("SELECT key FROM metric_keys WHERE run_id = ? ORDER BY key", (run_id,))
            return [key for (key,) in rows]

    def metrics(self, run_id: str, keys: list[str] | None = None, since: int | None = None) -> MetricSeries:
        """Values of `keys` (all keys if None) at steps > `since` (all steps if None)."""
        query = "SELECT step, key, value FROM metrics WHERE run_id = ? AND step > ?"
        params: list = [run_id, -(2**63) if since is None else since]
        if keys is not None:
            query += f" AND key IN ({', '.join('?' * len(keys))})"
            params += keys
        with self._read() as db:
            self._require_run(db, run_id)
            rows = db.execute(query + " ORDER BY step", params).fetchall()
        steps = sorted({step for step, _, _ in rows})
        position = {step: i for i, step in enumerate(steps)}
        values: dict[str, list[float | None]] = {key: [None] * len(steps) for key in keys or []}
        for step, key, value in rows:
            if key not in values:
                values[key] = [None] * len(steps)
            values[key][position[step]] = value
        return MetricSeries(steps=steps, values=dict(sorted(values.items())))

    def scalars(self, run_id: str) -> Iterator[tuple[int, str, float, float]]:
        """Every finite metric as (step, key, value, wall time), in step order (for exporters)."""
        with self._read() as db:
            self._require_run(db, run_id)
            rows = db.execute(
                "SELECT step, key, value, time FROM metrics WHERE run_id = ? AND value IS NOT NULL "
                "ORDER BY step, key",
                (run_id,),
            ).fetchall()
        yield from rows

    def sample_steps(self, run_id: str, kind: SampleKind = "train") -> list[int]:
        table = _SAMPLE_TABLES[kind]
        with self._read() as db:
            self._require_run(db, run_id)
            rows = db.execute(f"SELECT DISTINCT step FROM {table} WHERE run_id = ? ORDER BY step", (run_id,))
            return [step for (step,) in rows]

    def samples(self, run_id: str, step: int, kind: SampleKind = "train") -> list[StoredSample]:
        table = _SAMPLE_TABLES[kind]
        with self._read() as db:
            self._require_run(db, run_id)
            rows = db.execute(
                f"SELECT step, idx, prompt, image, reward, components FROM {table} "
                "WHERE run_id = ? AND step = ? ORDER BY idx",
                (run_id, step),
            ).fetchall()
        return [StoredSample(s, i, p, img, r, json.loads(c)) for s, i, p, img, r, c in rows]

    def events(self, run_id: str) -> list[EventRecord]:
        with self._read() as db:
            self._require_run(db, run_id)
            rows = db.execute("SELECT time, kind, message FROM events WHERE run_id = ? ORDER BY id", (run_id,))
            return [EventRecord(*row) for row in rows]

    def _samples_dir(self, run_id: str, kind: SampleKind = "train") -> Path:
        return self.runs_dir / run_id / ("samples" if kind == "train" else "eval_samples")

    @staticmethod
    def _require_run(db: sqlite3.Connection, run_id: str) -> None:
        if db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
            raise UnknownRunError(run_id)


def _run_info(row: tuple) -> RunInfo:
    run_id, name, config, status, started_at, ended_at, last_step = row
    return RunInfo(run_id, name, json.loads(config), status, started_at, ended_at, last_step)


def _finite_or_none(value: float) -> float | None:
    """NaN/inf become NULL: SQLite stores NaN as NULL anyway, and JSON cannot carry either."""
    value = float(value)
    return value if np.isfinite(value) else None


def _write_png(image: np.ndarray | str | Path, path: Path) -> None:
    """Write pixels (uint8 [H, W, 3]) or copy an existing image file, atomically (temp + rename)."""
    temp = path.with_name(path.name + ".tmp")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"sample image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        Image.fromarray(image).save(temp, format="PNG", compress_level=1)  # fast: it runs inside a step
    else:
        source = Path(image)
        if not source.is_file():
            raise FileNotFoundError(f"sample image file {source} does not exist")
        with Image.open(source) as opened:
            opened.convert("RGB").save(temp, format="PNG", compress_level=1)  # one format on disk
    os.replace(temp, path)
