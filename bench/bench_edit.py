"""Benchmark: the glyph edit demo learns its edit and keeps the background, with the copy guard on and off.

Each arm runs deploy/configs/tiny-cpu-glyph-edit.yaml for 60 steps (one seed), every row of every step
kept as a sample; then, over the samples of the first and the last 5 steps:

    edit_success       share of outputs where PaddleOCR (PP-OCRv6 tiny, as the demo) reads exactly the
                       target word inside the changed word's tiles (edit_ocr's box): normalise(read) ==
                       normalise(target); stricter than edit_ocr's reward 1, which takes the target
                       anywhere in what it reads
    background_psnr    PIE-Bench's background PSNR (dB) of the output against the source outside the
                       mask (rewards/consistency.py `background_metrics`: both images zeroed inside the
                       mask, MSE over the whole image; 100 dB for an identical background)
    copy_share         share of outputs within the guard's 40 dB of the source over the edit region (a
                       copy of the source word): what the guard takes the edit reward from

The arms differ only in `rewards.server.edit.copy_psnr_db` (40 dB / null). Learning outcomes, not
timings: the load average is recorded. Writes {"guard_on": {...}, "guard_off": {...}, ...} to
bench/results/edit.json.

    nice -n 10 .venv/bin/python bench/bench_edit.py [--seed 0] [--steps 60]
    .venv/bin/python bench/bench_edit.py --steps 6 --arms guard_on --out /tmp/edit-smoke.json   # a smoke test
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

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rewards.consistency import background_metrics, edit_region, region_psnr  # noqa: E402
from rewards.edit_checks import ocr_region  # noqa: E402
from rewards.ocr import normalise  # noqa: E402
from rl.prompts.edit import load_pixels  # noqa: E402
from rl.prompts.sources import load_source  # noqa: E402
from rl.run.config import load_config  # noqa: E402
from rl.run_store import RunStore  # noqa: E402

DEMO = REPO / "deploy" / "configs" / "tiny-cpu-glyph-edit.yaml"
ARMS = {"guard_on": 40.0, "guard_off": None}
"""Arm -> rewards.server.edit.copy_psnr_db."""
WINDOW = 5


def prepare(arm: str, seed: int, steps: int, workdir: Path) -> tuple[Path, Path]:
    """The demo's config for one arm: this seed and step count, every row a sample, a checkpoint at the
    end only, its own runs folder; the model and the edit data shared by the arms -> (config, runs dir)."""
    raw = yaml.safe_load(DEMO.read_text())
    raw.update(name=f"bench-edit-{arm}-{seed}", seed=seed, steps=steps)
    raw["model"]["path"] = str(workdir / "tiny-glyph")
    raw["data"]["sources"][0]["path"] = str(workdir / "data" / "train.jsonl")
    raw["rewards"]["server"]["edit"]["copy_psnr_db"] = ARMS[arm]
    raw["checkpoint"] = {"every": steps}
    raw["logging"]["samples_per_step"] = raw["data"]["prompts_per_step"] * raw["data"]["group_size"]
    runs = workdir / f"{arm}-{seed}"
    raw["logging"]["runs_dir"] = str(runs)
    config = workdir / f"{arm}-{seed}.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config, runs


def train(config: Path, log: Path) -> float:
    """Run `python -m rl.run.train` on `config` (this interpreter, this PYTHONPATH); -> wall seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "rl.run.train", "--config", str(config)], cwd=REPO,
                              stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"training run {config.name} failed (exit {done.returncode}); log: {log}")
    return time.perf_counter() - start


def edit_numbers(outputs: list[np.ndarray], sources: list[tuple[np.ndarray, np.ndarray]], targets: list[str],
                 ocr) -> dict[str, float]:
    """Mean exact-match edit success, background PSNR and copy share of these outputs (module docstring)."""
    read = ocr.read([ocr_region(output, mask) for output, (_, mask) in zip(outputs, sources)])
    success = [normalise(text) == normalise(target) for text, target in zip(read, targets)]
    psnr = [background_metrics(output, source, mask).psnr for output, (source, mask) in zip(outputs, sources)]
    copied = [region_psnr(output, source, edit_region(mask, output.shape)) >= ARMS["guard_on"]
              for output, (source, mask) in zip(outputs, sources)]
    return {"edit_success": float(np.mean(success)), "background_psnr": float(np.mean(psnr)),
            "copy_share": float(np.mean(copied))}


def arm_result(config: Path, runs: Path, ocr) -> dict:
    """The first and last WINDOW steps' numbers of the run in `runs`, and its per-step curves."""
    items = {item.label: item for item in load_source(load_config(config).data.sources[0])}
    store = RunStore(runs)
    run_id = store.list_runs()[0].id
    steps = store.sample_steps(run_id)
    result: dict = {}
    for name, window in (("first5", steps[:WINDOW]), ("last5", steps[-WINDOW:])):
        samples = [sample for step in window for sample in store.samples(run_id, step)]
        edits = [items[sample.prompt].edit for sample in samples]
        outputs = [np.asarray(Image.open(runs / sample.image).convert("RGB")) for sample in samples]
        numbers = edit_numbers(outputs, [load_pixels(edit) for edit in edits], [edit.target["text"] for edit in edits],
                               ocr)
        result.update({f"{key}_{name}": value for key, value in numbers.items()})
    metrics = store.metrics(run_id, ["reward/mean", "reward/edit", "reward/keep"]).values
    result["curves"] = {key: [round(v, 4) for v in values if v is not None] for key, values in metrics.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "edit.json")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    from rewards.ocr import OcrConfig, OcrScorer

    ocr = OcrScorer(OcrConfig(size="tiny"))  # the demo's reader
    found: dict = {"load_before": {}, "seed": args.seed, "steps": args.steps, "config": DEMO.name}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for arm in args.arms:
            found["load_before"][arm] = os.getloadavg()[0]
            config, runs = prepare(arm, args.seed, args.steps, workdir)
            wall = train(config, workdir / f"{arm}.log")
            found[arm] = {**arm_result(config, runs, ocr), "wall_s": round(wall, 1)}
            print(f"{arm}: " + ", ".join(f"{k} {v:.3f}" for k, v in found[arm].items() if isinstance(v, float)),
                  flush=True)
    found["note"] = ("Learning outcomes on a shared 2-core box (load in load_before), one seed per arm; the arms "
                     "differ only in rewards.server.edit.copy_psnr_db (40 dB / null). edit_success: PP-OCRv6 tiny "
                     "reads exactly the target inside the changed word's tiles; background_psnr: PIE-Bench's, outside "
                     "the mask; copy_share: outputs within 40 dB of the source over the edit region.")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}  # an arm run alone keeps the other
    results.update({k: v for k, v in found.items() if k != "load_before"})
    results.setdefault("load_before", {}).update(found["load_before"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({arm: {k: v for k, v in found[arm].items() if k != "curves"} for arm in args.arms}, indent=2))


if __name__ == "__main__":
    main()
