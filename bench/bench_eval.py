"""Benchmark: images/s of `blip3o-rl eval` on the tiny glyph model (OCR) and tiny SANA (GenEval).

Each case runs the real command as a subprocess against a reward server started once beforehand
(its start is not counted), and reports two rates: `images_per_s` over the eval loop itself
(sample -> decode -> score -> write; what the command's report says) and `end_to_end_images_per_s`
over the whole command (workers loading included). The machine's load average is recorded: the
machine is shared, so compare ratios, not absolute rates.

In-run eval (`inrun_glyph_ocr`): the CPU demo config run twice with the same seed and steps, once
without and once with its `eval:` section (rl/evaluation/in_run.py), side by side. The loop time is the
wall time from step 1's metrics to the last step's (so worker start, step 1's warm-up and the final
checkpoint are left out; evals and the best-eval checkpoints they save are in);
`inrun_eval_overhead_fraction` = loop time with eval / without - 1. Both runs must train
identically (the eval draws no training prompt or seed): `training_reward_max_abs_diff`.
Writes bench/results/eval.json (or --out).

    .venv/bin/python bench/bench_eval.py [--glyph-limit 16] [--sana-limit 6] [--inrun-steps 40]
        [--cases glyph_ocr,sana_geneval,inrun_glyph_ocr] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from policy.tiny import PRESETS, make_tiny  # noqa: E402
from rewards.local_server import start_reward_server  # noqa: E402
from rewards.tiny import make_tiny_geneval_models  # noqa: E402
from rl.run_store import RunStore  # noqa: E402

RESULTS = REPO / "bench" / "results" / "eval.json"
DEMO = REPO / "deploy" / "configs" / "tiny-cpu-glyph-ocr.yaml"
CASES = ("glyph_ocr", "sana_geneval", "inrun_glyph_ocr")


def run_eval(model: Path, bench: str, limit: int, images_per_prompt: int, url: str, out: Path) -> dict:
    command = [sys.executable, "-m", "deploy.cli", "eval", "--model", str(model), "--bench", bench,
               "--limit", str(limit), "--images-per-prompt", str(images_per_prompt), "--reward-url", url,
               "--out", str(out)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")
    report = json.loads(out.read_text())
    return {
        "model": model.name, "bench": bench, "prompts": report["prompts"], "images": report["images"],
        "images_per_s": report["images_per_s"], "eval_loop_seconds": report["seconds"],
        "command_seconds": wall, "stage_seconds": report.get("stage_seconds"), "end_to_end_images_per_s": report["images"] / wall,
        "scores": report["ocr"] or {"overall": report["geneval"]["overall"]},
    }


def run_demo(workdir: Path, model: Path, steps: int, label: str, evaluation: dict | None) -> dict:
    """One run of the demo config (`evaluation`: its eval section, None = off), read back from its store."""
    raw = yaml.safe_load(DEMO.read_text())
    raw.pop("eval", None)
    raw.update(steps=steps, name=f"bench-{label}")
    raw["model"] = {"path": str(model), "make_tiny": "glyph"}
    raw["checkpoint"] = {"every": steps}
    raw["logging"]["runs_dir"] = str(workdir / label)
    if evaluation:
        raw["eval"] = evaluation
    config = workdir / f"{label}.yaml"
    config.write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rl.run.train", "--config", str(config)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    store = RunStore(workdir / label)
    (info,) = store.list_runs()
    table: dict[int, dict[str, float]] = {}
    logged: dict[int, float] = {}  # when each step's metrics were (last) written: after its eval, if any
    for step, key, value, when in store.scalars(info.id):
        table.setdefault(step, {})[key] = value
        logged[step] = max(logged.get(step, 0.0), when)
    evals = {s: m for s, m in table.items() if "time/eval" in m}
    return {
        "command_seconds": wall,
        "loop_seconds": logged[steps] - logged[1],
        "step_s": sum(table[s]["time/step"] for s in range(2, steps + 1)) / (steps - 1),
        "rewards": [table[s]["reward/mean"] for s in range(1, steps + 1)],
        "eval_steps": sorted(evals),
        "eval_seconds": [evals[s]["time/eval"] for s in sorted(evals)],
        "eval_scores": [evals[s]["eval/ocr/score"] for s in sorted(evals)],
    }


def inrun_case(workdir: Path, model: Path, steps: int) -> dict:
    """The demo without and with its in-run eval, same seed and steps."""
    evaluation = yaml.safe_load(DEMO.read_text())["eval"]
    plain = run_demo(workdir, model, steps, "no-eval", None)
    evaluated = run_demo(workdir, model, steps, "eval", evaluation)
    images = (evaluation.get("prompts") or 0) * (evaluation.get("images_per_prompt") or 1)
    return {
        "steps": steps, "eval": evaluation, "without_eval": plain, "with_eval": evaluated,
        "inrun_eval_overhead_fraction": evaluated["loop_seconds"] / plain["loop_seconds"] - 1,
        "inrun_eval_seconds_mean": sum(evaluated["eval_seconds"]) / len(evaluated["eval_seconds"]),
        "inrun_eval_images_per_s": images * len(evaluated["eval_seconds"]) / sum(evaluated["eval_seconds"]),
        "training_reward_max_abs_diff": max(abs(a - b) for a, b in zip(plain["rewards"], evaluated["rewards"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glyph-limit", type=int, default=16, help="OCR prompts for the glyph case (x4 images)")
    parser.add_argument("--sana-limit", type=int, default=6, help="GenEval prompts for tiny SANA (x4 images)")
    parser.add_argument("--inrun-steps", type=int, default=40, help="steps of each demo run of the in-run case")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)} (the others' figures in --out are kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    wanted = set(args.cases.split(","))
    if wanted - set(CASES):
        parser.error(f"unknown cases: {', '.join(sorted(wanted - set(CASES)))}")
    load_before = os.getloadavg()
    cases = {}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        make_tiny(tmp / "glyph", PRESETS["glyph"])
        if "glyph_ocr" in wanted:
            with start_reward_server(["--scorers", "ocr", "--ocr-size", "tiny"], log=tmp / "ocr.log") as server:
                cases["glyph_ocr"] = run_eval(tmp / "glyph", "ocr", args.glyph_limit, 4, server.url, tmp / "glyph.json")
        if "sana_geneval" in wanted:
            make_tiny(tmp / "sana", PRESETS["sana"])
            detector, clip = make_tiny_geneval_models(tmp / "geneval-models")
            with start_reward_server(["--scorers", "geneval", "--detector", str(detector), "--clip", str(clip)],
                                     log=tmp / "geneval.log") as server:
                cases["sana_geneval"] = run_eval(tmp / "sana", "geneval", args.sana_limit, 4, server.url,
                                                 tmp / "sana.json")
        if "inrun_glyph_ocr" in wanted:
            cases["inrun_glyph_ocr"] = inrun_case(tmp, tmp / "glyph", args.inrun_steps)
    if wanted != set(CASES) and args.out.is_file():  # a subset: the other cases keep their last figures
        cases = {**json.loads(args.out.read_text())["cases"], **cases}
    result = {
        "cases": cases,
        **({"inrun_eval_overhead_fraction": cases["inrun_glyph_ocr"]["inrun_eval_overhead_fraction"]}
           if "inrun_glyph_ocr" in cases else {}),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "notes": "tiny glyph: OCR PP-OCRv6 tiny on 256x64 tiles; tiny SANA: 30 Euler steps + CFG at 64 px, "
                 "tiny random Mask2Former + CLIP. images_per_s excludes worker start; end_to_end includes it. "
                 "inrun_glyph_ocr: the demo config (sync) without and with its eval section, loop time from "
                 "step 1 to the last step (evals and best-eval checkpoints in).",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
