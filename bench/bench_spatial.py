"""Benchmark: spatial credit against the scalar GRPO advantage, on the two CPU demos.

    glyph_steps_to_0_9   the glyph OCR demo (deploy/configs/tiny-cpu-glyph-ocr.yaml; AR policy, GRPO):
                         the first step whose mean reward reaches 0.9, per seed, scalar vs spatial
                         (the same config with `learner.grpo.spatial` of tiny-cpu-glyph-ocr-spatial.yaml).
                         A run stops (SIGTERM: a clean stop after a checkpoint) once it gets there; a run
                         that never does counts as its step limit, and `reached` says which did.
    sana_jpeg_drop_30    the tiny SANA compressibility demo (tiny-cpu-sana-diffusion.yaml; diffusion
                         learner, Flow-GRPO): JPEG size (kB, from the reward -kB / 500) at step 1 minus
                         at the last step, per seed, scalar vs spatial (`diffusion_learner.flow.spatial`
                         with per-block regions).

Both arms run the same config, seed and step count; only the spatial section differs. Writes the two
keys into bench/results/spatial.json, keeping every other key there (read-modify-write).

    .venv/bin/python bench/bench_spatial.py [--seeds 0 1 2] [--glyph-steps 100] [--sana-steps 30]
    .venv/bin/python bench/bench_spatial.py --seeds 0 --glyph-steps 2 --sana-steps 2 --arms spatial \
        --out /tmp/spatial-smoke.json        # a smoke test of the script, not figures
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rl.run_store import RunStore  # noqa: E402

CONFIGS = REPO / "deploy" / "configs"
TARGET = 0.9
JPEG_SCALE_KB = 500.0
"""compressibility = -size_kB / 500 (rewards/compressibility.py)."""
SANA_SPATIAL = {"weight": 1.0}
"""The diffusion arm's spatial credit (lambda 1: a first choice, not tuned)."""


def glyph_spatial() -> dict:
    """The spatial section of the glyph spatial config: the arms differ by exactly this."""
    raw = yaml.safe_load((CONFIGS / "tiny-cpu-glyph-ocr-spatial.yaml").read_text())
    return raw["learner"]["grpo"]["spatial"]


def prepare(name: str, arm: str, seed: int, steps: int, workdir: Path) -> tuple[Path, Path]:
    """The run config of one (demo, arm, seed): the demo's config with this seed and step count, no
    in-run eval, a checkpoint at the end only, its own runs folder; -> (config file, runs dir)."""
    demo = "tiny-cpu-glyph-ocr.yaml" if name == "glyph" else "tiny-cpu-sana-diffusion.yaml"
    raw = yaml.safe_load((CONFIGS / demo).read_text())
    label = f"{name}-{arm}-{seed}"
    raw.update(name=f"bench-{label}", seed=seed, steps=steps)
    raw["model"]["path"] = str(workdir / f"tiny-{name}")  # built once by the first run, shared
    raw.pop("eval", None)
    raw["checkpoint"] = {"every": steps}
    runs = workdir / label
    raw["logging"]["runs_dir"] = str(runs)
    if arm == "spatial" and name == "glyph":
        raw["learner"]["grpo"]["spatial"] = glyph_spatial()
    if arm == "spatial" and name == "sana":
        raw["diffusion_learner"]["flow"]["spatial"] = dict(SANA_SPATIAL)
    config = workdir / f"{label}.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config, runs


def metric_so_far(runs: Path, key: str = "reward/mean") -> list[float]:
    """`key` of every finished step of the one run in `runs` that logged it, in step order."""
    store = RunStore.existing(runs)
    infos = store.list_runs() if store else []
    if not infos:
        return []
    return [value for value in store.metrics(infos[0].id, [key]).values[key] if value is not None]


def train(config: Path, runs: Path, stop_at: float | None = None, log: Path | None = None) -> list[float]:
    """Run `python -m rl.run.train` on `config`; with `stop_at`, SIGTERM it (a clean stop after a
    checkpoint) once a step's mean reward reaches it. -> the mean reward of every step it ran."""
    with open(log or os.devnull, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "rl.run.train", "--config", str(config)], cwd=REPO,
                                   stdout=out, stderr=subprocess.STDOUT)
        stopping = False
        while process.poll() is None:
            time.sleep(5)
            if stop_at is not None and not stopping and any(r >= stop_at for r in metric_so_far(runs)):
                process.send_signal(signal.SIGTERM)  # our own child, by its pid
                stopping = True
        if process.returncode != 0 and not stopping:
            raise RuntimeError(f"training run {config.name} failed (exit {process.returncode}); log: {log}")
    return metric_so_far(runs)


def spatial_share(runs: Path, prefix: str) -> float | None:
    """Mean share of tokens with a local signal over the run (None: spatial credit off)."""
    shares = metric_so_far(runs, f"{prefix}/spatial_share")
    return sum(shares) / len(shares) if shares else None


def steps_to(rewards: list[float], target: float, limit: int) -> tuple[int, bool]:
    """(first step, 1-based, whose mean reward >= target, True), or (limit, False) if none did."""
    for step, reward in enumerate(rewards, start=1):
        if reward >= target:
            return step, True
    return limit, False


def glyph_benchmark(arms: list[str], seeds: list[int], steps: int, workdir: Path, target: float) -> dict:
    result: dict = {arm: [] for arm in arms}
    result["reached"] = {arm: [] for arm in arms}
    result["step_limit"] = steps
    result["spatial_share"] = []  # per spatial run: the mean share of tokens with a local signal
    for arm in arms:
        for seed in seeds:
            config, runs = prepare("glyph", arm, seed, steps, workdir)
            rewards = train(config, runs, stop_at=target, log=workdir / f"{config.stem}.log")
            step, reached = steps_to(rewards, target, steps)
            result[arm].append(step)
            result["reached"][arm].append(reached)
            if arm == "spatial":
                result["spatial_share"].append(spatial_share(runs, "policy"))
            print(f"glyph {arm} seed {seed}: {f'reached {target} at step' if reached else 'not reached in'} {step}; "
                  f"rewards {[round(r, 3) for r in rewards]}", flush=True)
    return result


def sana_benchmark(arms: list[str], seeds: list[int], steps: int, workdir: Path) -> dict:
    result: dict = {arm: [] for arm in arms}
    result["steps"] = steps
    result["spatial_share"] = []
    for arm in arms:
        for seed in seeds:
            config, runs = prepare("sana", arm, seed, steps, workdir)
            rewards = train(config, runs, log=workdir / f"{config.stem}.log")
            sizes_kb = [-JPEG_SCALE_KB * r for r in rewards]
            result[arm].append(sizes_kb[0] - sizes_kb[-1])
            if arm == "spatial":
                result["spatial_share"].append(spatial_share(runs, "diffusion"))
            print(f"sana {arm} seed {seed}: {sizes_kb[0]:.3f} kB -> {sizes_kb[-1]:.3f} kB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--glyph-steps", type=int, default=100, help="step limit of a glyph run")
    parser.add_argument("--sana-steps", type=int, default=30)
    parser.add_argument("--arms", nargs="+", choices=["scalar", "spatial"], default=["scalar", "spatial"])
    parser.add_argument("--only", choices=["glyph", "sana"], default=None, help="run one of the two benchmarks")
    parser.add_argument("--target", type=float, default=TARGET,
                        help="glyph: the mean reward that ends a run (lower it only to smoke-test the early stop)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "spatial.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        found: dict = {}
        if args.only in (None, "glyph"):
            found["glyph_steps_to_0_9"] = glyph_benchmark(args.arms, args.seeds, args.glyph_steps, workdir,
                                                             args.target)
        if args.only in (None, "sana"):
            found["sana_jpeg_drop_30"] = sana_benchmark(args.arms, args.seeds, args.sana_steps, workdir)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}  # keep the other keys
    results.update(found)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
