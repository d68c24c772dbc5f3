"""Helpers of the end-to-end run tests: the demo config made small, running the driver as a user
does (`python -m rl.run.train` in a subprocess with its own local Ray cluster), reading the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from rl.run_store import RunStore

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "deploy" / "configs" / "tiny-cpu-glyph-ocr.yaml"


def small_config(tmp_path: Path, model: Path, **changes) -> Path:
    """The demo config, smaller: 2 prompts x 16 samples per step, without the demo's in-run eval
    (`eval=...` in `changes` turns one on)."""
    raw = yaml.safe_load(DEMO.read_text())
    raw.pop("eval", None)
    raw["model"] = {"path": str(model)}
    raw["data"]["prompts_per_step"] = 2
    raw["logging"]["runs_dir"] = str(tmp_path / "runs")
    raw["logging"]["samples_per_step"] = 2
    return write_config(tmp_path, raw, changes)


def write_config(tmp_path: Path, raw: dict, changes: dict) -> Path:
    """`raw` with `changes` (dotted keys) applied, written to `tmp_path/config.yaml`."""
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train(config: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rl.run.train", "--config", str(config), *extra], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def only_run(runs_dir: Path):
    store = RunStore(runs_dir)
    runs = store.list_runs()
    assert len(runs) == 1
    return store, runs[0]


def metric_table(store: RunStore, run_id: str) -> dict[int, dict[str, float]]:
    table: dict[int, dict[str, float]] = {}
    for step, key, value, _ in store.scalars(run_id):
        table.setdefault(step, {})[key] = value
    return table


class RunningTrain:
    """`python -m rl.run.train` in the background; its output lines are collected as they come."""

    def __init__(self, config: Path, *extra: str):
        import threading

        self.process = subprocess.Popen([sys.executable, "-m", "rl.run.train", "--config", str(config), *extra], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, prefix: str, timeout: float = 600) -> str:
        """The first output line starting with `prefix` (waits for it)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"run ended without printing '{prefix}':\n{self.output[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no '{prefix}' within {timeout:.0f} s:\n{self.output[-3000:]}")

    def finish(self, timeout: float = 900) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code

    def kill(self) -> None:
        import os
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        self.process.wait()

    @property
    def output(self) -> str:
        return "".join(self.lines)
