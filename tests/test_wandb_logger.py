"""Optional W&B logging (rl/run/wandb_logger.py), offline: what the trainer's path (a store metrics
listener, closed at exit) and the export write into W&B's run file, read back record by record;
steps redone after a guard rollback or a resume; the config key and the error when the package is
missing.

`wandb` comes with the `test` extra. W&B offers no reader for offline runs (`wandb.Api` needs the
server), so `read_history` decodes the run file itself: W&B's LevelDB-style log of `Record`
protobufs, the file `wandb sync` uploads.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from rl.run.config import ConfigError, WandbSection, load_config
from rl.run_store import RunStore

REPO = Path(__file__).resolve().parents[1]
STEPS = 5


def metrics_at(step: int) -> dict[str, float]:
    """A training step's metrics; the learner's only from step 2 on, an eval result every 2 steps."""
    metrics = {"reward/mean": 0.1 * step, "time/step": 1.5, "policy/version": float(step)}
    if step >= 2:
        metrics["policy/kl"] = 0.001 * step
    if step % 2 == 0:
        metrics["eval/ocr/exact"] = 0.2 * step
    metrics["policy/entropy"] = float("nan") if step == 3 else 2.0  # NaN: not measured, left out
    return metrics


def expected_history() -> list[tuple[int, dict[str, float]]]:
    """W&B's own step counts the records; the training step is `trainer/step` in each."""
    return [(step, {**{k: v for k, v in metrics_at(step).items() if v == v}, "trainer/step": step})
            for step in range(STEPS)]


def read_history(run_dir: Path) -> tuple[str, list[tuple[int, dict[str, float]]]]:
    """(W&B run id, [(W&B step, logged values without W&B's own `_` keys)]) from an offline run folder."""
    run_id, history, _ = read_run(run_dir)
    return run_id, history


def read_run(run_dir: Path) -> tuple[str, list[tuple[int, dict[str, float]]], dict[str, str]]:
    """`read_history` and the metric definitions: {metric name or glob: its step metric ("" if none)}."""
    from wandb.proto import wandb_internal_pb2

    [run_file] = run_dir.glob("run-*.wandb")
    data = run_file.read_bytes()
    assert data[:4] == b":W&B"  # magic, then 2 bytes of format magic and a version byte
    block, position, pending = 32768, 7, b""
    run_id, history, definitions = None, [], {}
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a record header is zero padding
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
            elif record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.append((record.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")}))
            elif record.WhichOneof("record_type") == "metric":
                definitions[record.metric.name or record.metric.glob_name] = record.metric.step_metric
    return run_id, history, definitions


def offline_runs(runs_dir: Path, run_id: str) -> list[Path]:
    return sorted((runs_dir / run_id / "wandb").glob(f"offline-run-*-{run_id}"))


def test_trainer_path_mirrors_every_committed_step_offline(tmp_path):
    """As `rl/run/train.py` does it: attach to the store, log steps, exit without finishing (the exit hook
    attach_wandb registers does); in a child process, so W&B's global state and exit are a real process's."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from rl.run_store import RunStore
        from rl.run.config import WandbSection
        from rl.run.wandb_logger import attach_wandb
        from tests.test_wandb_logger import STEPS, metrics_at

        store = RunStore({str(tmp_path)!r})
        run_id = store.create_run("glyph", {{"lr": 0.002}})
        logger = attach_wandb(store, WandbSection(project="blip3o-rl-test", mode="offline"), run_id, "glyph",
                              {{"lr": 0.002}})
        print(run_id)
        print(logger.describe("offline"))
        for step in range(STEPS):
            store.log_metrics(run_id, step, metrics_at(step))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id, line = done.stdout.splitlines()[:2]
    [run_dir] = offline_runs(tmp_path, run_id)
    assert line == f"W&B (offline): {run_dir}; upload it with `wandb sync {run_dir}`"
    logged_id, history, definitions = read_run(run_dir)
    assert logged_id == run_id
    assert history == expected_history()  # every step, absent and NaN values left out, nothing else
    assert definitions == {"trainer/step": "", "*": "trainer/step"}  # charts are drawn against the training step


def test_export_of_a_stored_run_matches_the_store(tmp_path):
    from rl.run.wandb_logger import export_wandb

    store = RunStore(tmp_path)
    run_id = store.create_run("baseline", {"lr": 0.001})
    for step in range(STEPS):
        store.log_metrics(run_id, step, metrics_at(step))
    logger = export_wandb(store, run_id, WandbSection(project="blip3o-rl-test", mode="offline"))
    assert offline_runs(tmp_path, run_id) == [logger.dir]
    assert read_history(logger.dir) == (run_id, expected_history())


def test_steps_redone_after_a_rollback_or_a_resume_are_kept(tmp_path):
    """A guard rollback to step 2 redoes steps 3 and 4 (other numbers): W&B drops records logged at a
    step below its current one, so its step is a log counter and the training step is `trainer/step`;
    the redone steps are then kept beside the abandoned ones. A resumed run (a new process, a new
    offline file of the same W&B run) continues the counter."""
    from rl.run.wandb_logger import WandbLogger

    settings = WandbSection(project="blip3o-rl-test", mode="offline")
    run_id = RunStore(tmp_path).create_run("glyph", {})

    def attempt(records: list[tuple[int, float]], rollback_at: int | None = None) -> None:
        """One driver process: its store, its W&B logger, `records` (step, reward) logged, then its exit."""
        store = RunStore(tmp_path)
        logger = WandbLogger(settings, run_id, "glyph", {}, tmp_path / run_id)
        store.add_metrics_listener(logger)
        for index, (step, reward) in enumerate(records):
            if index == rollback_at:
                store.resume_run(run_id, 2)  # what a rollback to step 2's checkpoint does to the store
            store.log_metrics(run_id, step, {"reward/mean": reward})
        logger.close()

    attempt([(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4), (5, 0.5), (3, -3.0), (4, -4.0)], rollback_at=5)
    time.sleep(1.1)  # W&B names an offline run's folder by the second it started: a resume comes later
    attempt([(5, 0.5)])  # --resume from step 4's checkpoint: step 5 again
    first, resumed = offline_runs(tmp_path, run_id)
    assert read_history(first) == (run_id, [
        (0, {"reward/mean": 0.1, "trainer/step": 1}), (1, {"reward/mean": 0.2, "trainer/step": 2}),
        (2, {"reward/mean": 0.3, "trainer/step": 3}), (3, {"reward/mean": 0.4, "trainer/step": 4}),
        (4, {"reward/mean": 0.5, "trainer/step": 5}),
        (5, {"reward/mean": -3.0, "trainer/step": 3}), (6, {"reward/mean": -4.0, "trainer/step": 4}),  # redone
    ])
    assert read_history(resumed) == (run_id, [(7, {"reward/mean": 0.5, "trainer/step": 5})])


def test_config_key_and_a_clear_error_without_the_package(tmp_path, monkeypatch):
    import importlib.util

    raw = yaml.safe_load((REPO / "deploy" / "configs" / "tiny-cpu-glyph-ocr.yaml").read_text())
    raw["logging"]["wandb"] = {"project": "glyph", "mode": "offline"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).logging.wandb == WandbSection(project="glyph", mode="offline")

    raw["logging"]["wandb"]["mode"] = "cloud"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode: Input should be 'online' or 'offline'"):
        load_config(path)

    raw["logging"]["wandb"]["mode"] = "offline"
    path.write_text(yaml.safe_dump(raw))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"logging\.wandb: Value error, W&B logging is configured but the wandb "
                                          r"package is not installed: pip install 'blip3o-rl\[wandb\]'"):
        load_config(path)

    from rl.run.wandb_logger import WandbNotInstalledError, import_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees without the package
    with pytest.raises(WandbNotInstalledError, match=r"pip install 'blip3o-rl\[wandb\]'"):
        import_wandb()
