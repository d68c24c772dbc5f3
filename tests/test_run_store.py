"""Run store: exact round trips, idempotent steps, resume, and the multi-process guarantees
(a writer and a reader process at once; a writer SIGKILLed inside a transaction)."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rl.run_store import RunStore, SampleRecord, UnknownRunError

KEYS_PER_STEP = 300  # enough rows that one step's transaction takes a while


def _value(step: int, key_index: int) -> float:
    """Each (step, key) gets a distinct value, so a reader can check every number it sees."""
    return step * 1000.0 + key_index


def _full_step(step: int) -> dict[str, float]:
    return {f"k/{i:03d}": _value(step, i) for i in range(KEYS_PER_STEP)}


def _pixels(step: int, index: int) -> np.ndarray:
    image = np.zeros((16, 24, 3), np.uint8)  # [H, W, 3]
    image[..., 0] = step
    image[..., 1] = index
    image[4:8, 5:9, 2] = 200
    return image


def test_metrics_round_trip_aligned_on_steps(tmp_path):
    store = RunStore(tmp_path)
    run = store.create_run("demo run/1", {"lr": 1e-6, "group_size": 16})
    assert run.startswith("demo-run-1-")
    assert store.last_step(run) is None
    store.log_metrics(run, 0, {"reward/mean": 0.25, "policy/kl": 0.0})
    store.log_metrics(run, 1, {"reward/mean": 0.5})  # kl missing at step 1
    store.log_metrics(run, 2, {"reward/mean": 0.75, "policy/kl": float("nan")})

    series = store.metrics(run)
    assert series.steps == [0, 1, 2]
    assert series.values == {"policy/kl": [0.0, None, None], "reward/mean": [0.25, 0.5, 0.75]}
    assert store.metrics(run, keys=["reward/mean"], since=0).values == {"reward/mean": [0.5, 0.75]}
    assert store.metrics(run, since=2).steps == []
    assert store.last_step(run) == 2
    assert store.metric_keys(run) == ["policy/kl", "reward/mean"]
    info = store.get_run(run)
    assert (info.name, info.status, info.config, info.last_step) == ("demo run/1", "running", {"lr": 1e-6, "group_size": 16}, 2)


def test_existing_opens_a_store_a_run_created_and_creates_nothing_itself(tmp_path):
    runs = tmp_path / "runs"
    assert RunStore.existing(runs) is None and not runs.exists()
    run = RunStore(runs).create_run("first", {})
    assert [info.id for info in RunStore.existing(runs).list_runs()] == [run]


def test_log_metrics_replaces_a_step_and_resume_drops_later_steps(tmp_path):
    store = RunStore(tmp_path)
    run = store.create_run("r", {})
    for step in range(6):
        store.log_metrics(run, step, {"reward/mean": step / 10, "old": 1.0})
    store.log_samples(run, 4, [SampleRecord("p", _pixels(4, 0), 0.4, {"ocr": 0.4})])

    first_images = {s.image for s in store.samples(run, 4)}
    store.log_samples(run, 4, [SampleRecord("q", _pixels(4, 1), 0.1)])  # logged again: replaced
    [again] = store.samples(run, 4)
    assert (again.prompt, again.reward) == ("q", 0.1) and again.image not in first_images
    assert sorted(p.name for p in (tmp_path / run / "samples" / "step_0000004").iterdir()) == [Path(again.image).name]

    store.log_metrics(run, 5, {"reward/mean": 0.5, "late/key": 1.0})
    store.log_metrics(run, 3, {"reward/mean": 9.0})  # logged again: replaces, keeps nothing of before
    series = store.metrics(run)
    assert series.steps == [0, 1, 2, 3, 4, 5]
    assert series.values["reward/mean"][3] == 9.0 and series.values["old"][3] is None

    store.finish_run(run, "failed")
    store.resume_run(run, checkpoint_step=2)
    assert store.last_step(run) == 2
    assert store.metrics(run).steps == [0, 1, 2]
    assert store.metric_keys(run) == ["old", "reward/mean"]  # "late/key" existed only after step 2
    assert store.sample_steps(run) == []
    assert not (tmp_path / run / "samples" / "step_0000004").exists()  # its files went with its rows
    info = store.get_run(run)
    assert (info.status, info.ended_at) == ("running", None)
    [event] = store.events(run)
    assert (event.kind, event.message) == ("resume", "resumed from step 2; dropped 3 later steps")
    store.log_metrics(run, 3, {"reward/mean": 0.3})  # the redone step appears once
    assert store.metrics(run).steps == [0, 1, 2, 3]


def test_samples_are_png_files_with_their_breakdown(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.create_run("r", {})
    existing = tmp_path / "given.png"
    Image.fromarray(_pixels(7, 7)).save(existing)
    store.log_samples(run, 5, [
        SampleRecord('a sign that says "cat"', _pixels(5, 0), 0.5, {"ocr": 0.5, "format": 1.0}),
        SampleRecord("from a file", existing, 1.0),
    ])
    first, second = store.samples(run, 5)
    assert (first.index, first.prompt, first.reward, first.components) == (0, 'a sign that says "cat"', 0.5, {"ocr": 0.5, "format": 1.0})
    assert re.fullmatch(rf"{run}/samples/step_0000005/0000-[0-9a-f]{{6}}\.png", first.image)
    np.testing.assert_array_equal(np.asarray(Image.open(store.runs_dir / first.image)), _pixels(5, 0))
    np.testing.assert_array_equal(np.asarray(Image.open(store.runs_dir / second.image)), _pixels(7, 7))
    assert second.components == {}
    assert store.sample_steps(run) == [5]

    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\], got float32 \[4, 4\]"):
        store.log_samples(run, 6, [SampleRecord("p", np.zeros((4, 4), np.float32), 0.0)])
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        store.log_samples(run, 6, [SampleRecord("p", tmp_path / "missing.png", 0.0)])
    assert store.sample_steps(run) == [5]  # failed calls recorded nothing


# The schema before eval samples existed (a database written by an older blip3o-rl).
_OLD_SCHEMA = """
CREATE TABLE runs (id TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL, status TEXT NOT NULL,
                   started_at REAL NOT NULL, ended_at REAL);
CREATE TABLE metrics (run_id TEXT NOT NULL REFERENCES runs(id), step INTEGER NOT NULL, key TEXT NOT NULL,
                      value REAL, time REAL NOT NULL, PRIMARY KEY (run_id, step, key)) WITHOUT ROWID;
CREATE TABLE metric_keys (run_id TEXT NOT NULL REFERENCES runs(id), key TEXT NOT NULL,
                          PRIMARY KEY (run_id, key)) WITHOUT ROWID;
CREATE TABLE samples (run_id TEXT NOT NULL REFERENCES runs(id), step INTEGER NOT NULL, idx INTEGER NOT NULL,
                      prompt TEXT NOT NULL, image TEXT NOT NULL, reward REAL NOT NULL, components TEXT NOT NULL,
                      PRIMARY KEY (run_id, step, idx)) WITHOUT ROWID;
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL REFERENCES runs(id),
                     time REAL NOT NULL, kind TEXT NOT NULL, message TEXT NOT NULL);
INSERT INTO runs VALUES ('old-run', 'old', '{}', 'finished', 1.0, 2.0);
INSERT INTO metrics VALUES ('old-run', 1, 'reward/mean', 0.5, 1.5);
INSERT INTO metric_keys VALUES ('old-run', 'reward/mean');
"""


def test_eval_samples_are_a_kind_of_their_own_and_old_databases_open(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    with sqlite3.connect(runs / "runs.db") as db:
        db.executescript(_OLD_SCHEMA)
    store = RunStore(runs)  # an older database: opened as it is, the eval table added
    assert store.metrics("old-run").values == {"reward/mean": [0.5]}
    assert store.sample_steps("old-run", "eval") == []

    run = store.create_run("r", {})
    store.log_samples(run, 4, [SampleRecord("train prompt", _pixels(4, 0), 0.1)])
    store.log_samples(run, 4, [SampleRecord(f"eval {i}", _pixels(4, i + 1), 0.5 * i, {"ocr": 0.5 * i})
                               for i in range(2)], kind="eval")
    store.log_samples(run, 8, [SampleRecord("eval 0", _pixels(8, 1), 0.9)], kind="eval")
    assert store.sample_steps(run) == [4] and store.sample_steps(run, "eval") == [4, 8]
    assert [s.prompt for s in store.samples(run, 4)] == ["train prompt"]
    evaluated = store.samples(run, 4, "eval")
    assert [(s.prompt, s.reward, s.components) for s in evaluated] == [
        ("eval 0", 0.0, {"ocr": 0.0}), ("eval 1", 0.5, {"ocr": 0.5})]
    assert evaluated[1].image.startswith(f"{run}/eval_samples/step_0000004/")
    np.testing.assert_array_equal(np.asarray(Image.open(store.runs_dir / evaluated[1].image)), _pixels(4, 2))

    store.log_metrics(run, 8, {"reward/mean": 0.5})
    store.resume_run(run, checkpoint_step=4)  # eval samples after the checkpoint go too, files included
    assert store.sample_steps(run, "eval") == [4] and store.sample_steps(run) == [4]
    assert not (store.runs_dir / run / "eval_samples" / "step_0000008").exists()


def test_metrics_listener_gets_each_committed_step(tmp_path):
    store = RunStore(tmp_path)
    run = store.create_run("r", {})
    heard = []
    store.add_metrics_listener(lambda run_id, step, metrics: heard.append((run_id, step, metrics)))
    store.log_metrics(run, 1, {"reward/mean": 0.5, "policy/kl": float("nan")})
    with pytest.raises(UnknownRunError):
        store.log_metrics("nope", 2, {"reward/mean": 0.5})  # not committed: not heard
    assert heard == [(run, 1, {"reward/mean": 0.5, "policy/kl": None})]


def test_events_status_and_unknown_runs(tmp_path):
    store = RunStore(tmp_path)
    older = store.create_run("older", {})
    run = store.create_run("newer", {})
    store.log_event(run, "restart", "reward worker 1 restarted")
    store.log_event(run, "error", "decoder timed out")
    assert [(e.kind, e.message) for e in store.events(run)] == [
        ("restart", "reward worker 1 restarted"), ("error", "decoder timed out")]
    assert store.events(older) == []
    store.finish_run(run, "finished")
    info = store.get_run(run)
    assert info.status == "finished" and info.ended_at >= info.started_at
    assert [r.id for r in store.list_runs()] == [run, older]  # newest first

    with pytest.raises(ValueError, match="run status must be one of"):
        store.finish_run(run, "done")
    with pytest.raises(UnknownRunError, match="unknown run id 'nope'"):
        store.log_metrics("nope", 0, {"a": 1.0})
    with pytest.raises(UnknownRunError):
        store.get_run("nope")
    assert RunStore(tmp_path).get_run(run).status == "finished"  # reopening keeps everything


# ---- multi-process: these functions run in spawned child processes
def _write_steps(runs_dir: str, run_id: str, steps: int) -> None:
    store = RunStore(runs_dir)
    for step in range(steps):
        store.log_metrics(run_id, step, _full_step(step))
        time.sleep(0.01)


def _write_until_stalled(runs_dir: str, run_id: str, stall_step: int, stall_in: str, marker: str) -> None:
    """Log full steps; at `stall_step`, stop forever halfway through the `stall_in` table's inserts."""
    store = RunStore(runs_dir)
    connect = store._connect
    inserts = 0

    def traced_connect() -> sqlite3.Connection:
        db = connect()

        def trace(sql: str) -> None:
            nonlocal inserts
            if sql.startswith(f"INSERT INTO {stall_in} VALUES ('{run_id}', {stall_step},"):
                inserts += 1
                if inserts == 2:  # inside the transaction, some rows of the step already written
                    Path(marker).touch()
                    time.sleep(600)

        db.set_trace_callback(trace)
        return db

    store._connect = traced_connect
    for step in range(stall_step + 1):
        store.log_metrics(run_id, step, _full_step(step))
        store.log_samples(run_id, step, [SampleRecord(f"p{i}", _pixels(step, i), 0.5) for i in range(3)])


def test_reader_process_sees_whole_steps_while_writer_process_writes(tmp_path):
    store = RunStore(tmp_path)
    run = store.create_run("concurrent", {})
    steps = 40
    writer = multiprocessing.get_context("spawn").Process(target=_write_steps, args=(str(tmp_path), run, steps))
    writer.start()
    seen_last_steps = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        series = store.metrics(run)  # this process reads while the other writes
        if series.steps:
            seen_last_steps.add(series.steps[-1])
            assert series.steps == list(range(len(series.steps)))  # no gap, no partial step
            for i in range(KEYS_PER_STEP):
                assert series.values[f"k/{i:03d}"] == [_value(s, i) for s in series.steps]
        if not writer.is_alive():
            break
    writer.join(timeout=30)
    assert writer.exitcode == 0
    assert store.last_step(run) == steps - 1
    partial = {s for s in seen_last_steps if s < steps - 1}
    assert len(partial) >= 3, f"reader never overlapped the writer: saw {sorted(seen_last_steps)}"


@pytest.mark.parametrize("stall_in", ["metrics", "samples"])
def test_writer_killed_inside_a_transaction_leaves_a_consistent_store(tmp_path, stall_in):
    store = RunStore(tmp_path)
    run = store.create_run("killed", {})
    marker = tmp_path / "stalled"
    writer = multiprocessing.get_context("spawn").Process(
        target=_write_until_stalled, args=(str(tmp_path), run, 3, stall_in, str(marker)))
    writer.start()
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert writer.is_alive() and time.monotonic() < deadline, "writer never reached the stall point"
        time.sleep(0.05)
    assert store.last_step(run) == (2 if stall_in == "metrics" else 3)  # the stalled write is invisible
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(timeout=30)
    assert writer.exitcode == -signal.SIGKILL

    reopened = RunStore(tmp_path)
    with sqlite3.connect(reopened.db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    series = reopened.metrics(run)
    complete_metrics = [0, 1, 2] if stall_in == "metrics" else [0, 1, 2, 3]
    assert series.steps == complete_metrics
    assert all(len([v for v in values if v is not None]) == len(complete_metrics) for values in series.values.values())
    assert reopened.sample_steps(run) == [0, 1, 2]
    for step in reopened.sample_steps(run):
        samples = reopened.samples(run, step)
        assert [s.prompt for s in samples] == ["p0", "p1", "p2"]
        for sample in samples:
            np.testing.assert_array_equal(np.asarray(Image.open(reopened.runs_dir / sample.image)), _pixels(step, sample.index))
    reopened.resume_run(run, checkpoint_step=2)  # the next writer takes over without a lock error
    reopened.log_metrics(run, 3, _full_step(3))
    assert reopened.last_step(run) == 3
