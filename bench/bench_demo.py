"""Benchmark: the CPU demo's reward curve on several seeds (`make demo`'s config by default).

For each seed, one `python -m rl.run.train` run of the config with `seed` set (a copy of the YAML in a
temporary directory; relative paths still start at the repository root, where the run is launched),
its own run store, and the per-step mean reward read back from that store. The runs go one after
the other, never side by side: each wants the machine's two cores.

Results (read-modify-write: every other key of the file is kept; the seeds of an earlier call with
the same config and steps are kept too, so a broken seed can be run again alone):

    demo_reward_curves   {seed: [reward/mean of step 1, 2, ...]}   (None: a step that logged none)
    demo_reward_last5    [mean reward over the last 5 steps, one per seed, in seed order]
    demo_runs            config, steps, seeds, and per seed: wall seconds, exit code, run id, the
                         1-minute load average before and after, the date

    .venv/bin/python bench/bench_demo.py [--config deploy/configs/tiny-cpu-glyph-ocr.yaml]
        [--seeds 0 1 2] [--steps 60] [--out bench/results/spatial.json] [--runs-dir DIR]

The LoRA demo: `--config deploy/configs/tiny-cpu-glyph-ocr-lora.yaml --out bench/results/demo_lora.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.run_store import RunStore  # noqa: E402

DEFAULT_CONFIG = "deploy/configs/tiny-cpu-glyph-ocr.yaml"
LAST = 5
"""The demo's figure of merit: the mean reward over its last LAST steps."""


def seeded_config(config: Path, seed: int, directory: Path) -> Path:
    """A copy of `config` with `seed` set (everything else as written)."""
    raw = yaml.safe_load(config.read_text())
    raw["seed"] = seed
    path = directory / f"{config.stem}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def reward_curve(runs_dir: Path, run_id: str, steps: int) -> list[float | None]:
    """reward/mean of steps 1..steps (None where the store has none)."""
    series = RunStore(runs_dir).metrics(run_id, ["reward/mean"])
    by_step = dict(zip(series.steps, series.values["reward/mean"]))
    return [by_step.get(step) for step in range(1, steps + 1)]


def last_mean(curve: list[float | None], last: int = LAST) -> float | None:
    """Mean of the last `last` steps' rewards; None unless all of them were logged."""
    tail = curve[-last:]
    return None if len(tail) < last or any(v is None for v in tail) else sum(tail) / last


def run_seed(config: Path, seed: int, steps: int, runs_dir: Path, work: Path) -> dict:
    """Train one seed to `steps`; its curve and how the run went."""
    seeded = seeded_config(config, seed, work)
    earlier = RunStore.existing(runs_dir)
    before = earlier.list_runs() if earlier else []
    command = [sys.executable, "-m", "rl.run.train", "--config", str(seeded), "--runs-dir", str(runs_dir),
               "--steps", str(steps)]
    load_before, t0 = os.getloadavg()[0], time.time()
    print(f"seed {seed}: {' '.join(command)}", flush=True)
    exit_code = subprocess.run(command, cwd=ROOT).returncode
    wall = time.time() - t0
    new = [run for run in RunStore(runs_dir).list_runs() if run.id not in {r.id for r in before}]
    if not new:
        raise RuntimeError(f"seed {seed}: the run left no record in {runs_dir} (exit {exit_code})")
    run_id = new[0].id
    curve = reward_curve(runs_dir, run_id, steps)
    return {"curve": curve, "wall_s": round(wall, 1), "exit_code": exit_code, "run_id": run_id,
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(t0))}


def merge_results(results: dict, config: str, steps: int, seed: int, outcome: dict) -> dict:
    """`results` with this seed's outcome in the demo_* keys. Seeds of another config or length are
    dropped (their curves would not compare); every other key is left as it was."""
    runs = results.get("demo_runs", {})
    if runs.get("config") != config or runs.get("steps") != steps:
        runs, curves = {"config": config, "steps": steps, "per_seed": {}}, {}
    else:
        curves = dict(results.get("demo_reward_curves", {}))
    curves[str(seed)] = outcome.pop("curve")
    runs["per_seed"] = {**runs.get("per_seed", {}), str(seed): outcome}
    seeds = sorted(curves, key=int)
    runs["seeds"] = [int(s) for s in seeds]
    return {**results, "demo_reward_curves": {s: curves[s] for s in seeds},
            "demo_reward_last5": [last_mean(curves[s]) for s in seeds], "demo_runs": runs}


def write_merged(out: Path, config: str, steps: int, seed: int, outcome: dict) -> dict:
    """Read the file as it is now (another benchmark may have written it), merge, replace atomically."""
    results = json.loads(out.read_text()) if out.exists() else {}
    merged = merge_results(results, config, steps, seed, outcome)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(out)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="train config (relative to the repository root)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "spatial.json")
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    config = Path(args.config)
    source = config if config.is_absolute() else ROOT / config
    with tempfile.TemporaryDirectory(prefix="bench_demo-") as work:
        runs_dir = (args.runs_dir or Path(work) / "runs").resolve()
        runs_dir.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            outcome = run_seed(source, seed, args.steps, runs_dir, Path(work))
            merged = write_merged(args.out, args.config, args.steps, seed, outcome)
            curve = merged["demo_reward_curves"][str(seed)]
            marks = ", ".join(f"{step}: {curve[step - 1]:.3f}" for step in (1, 10, 20, 30, 40, 50, 60)
                              if step <= len(curve) and curve[step - 1] is not None)
            last = last_mean(curve)
            print(f"seed {seed}: reward at steps {marks}; last {LAST} "
                  f"{'-' if last is None else f'{last:.3f}'}; {outcome['wall_s']:.0f} s (exit {outcome['exit_code']})",
                  flush=True)
    print(f"{args.out}: demo_reward_last5 {merged['demo_reward_last5']}", flush=True)


if __name__ == "__main__":
    main()
