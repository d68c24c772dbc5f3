"""Benchmark: images/s of `blip3o-rl eval` on the tiny glyph model (OCR) and tiny SANA (GenEval).

Each case runs the real command as a subprocess against a reward server started once beforehand
(its start is not counted), and reports two rates: `images_per_s` over the eval loop itself
(sample -> decode -> score -> write; what the command's report says) and `end_to_end_images_per_s`
over the whole command (workers loading included). The machine's load average is recorded: the
machine is shared, so compare ratios, not absolute rates. Writes bench/results/eval.json.

    .venv/bin/python bench/bench_eval.py [--glyph-limit 16] [--sana-limit 6]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from policy.tiny import PRESETS, make_tiny  # noqa: E402
from rewards.local_server import start_reward_server  # noqa: E402
from rewards.tiny import make_tiny_geneval_models  # noqa: E402

RESULTS = REPO / "bench" / "results" / "eval.json"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glyph-limit", type=int, default=16, help="OCR prompts for the glyph case (x4 images)")
    parser.add_argument("--sana-limit", type=int, default=6, help="GenEval prompts for tiny SANA (x4 images)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    cases = {}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        make_tiny(tmp / "glyph", PRESETS["glyph"])
        make_tiny(tmp / "sana", PRESETS["sana"])
        detector, clip = make_tiny_geneval_models(tmp / "geneval-models")
        with start_reward_server(["--scorers", "ocr", "--ocr-size", "tiny"], log=tmp / "ocr.log") as server:
            cases["glyph_ocr"] = run_eval(tmp / "glyph", "ocr", args.glyph_limit, 4, server.url, tmp / "glyph.json")
        with start_reward_server(["--scorers", "geneval", "--detector", str(detector), "--clip", str(clip)],
                                 log=tmp / "geneval.log") as server:
            cases["sana_geneval"] = run_eval(tmp / "sana", "geneval", args.sana_limit, 4, server.url, tmp / "sana.json")
    result = {
        "cases": cases,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "notes": "tiny glyph: OCR PP-OCRv6 tiny on 256x64 tiles; tiny SANA: 30 Euler steps + CFG at 64 px, "
                 "tiny random Mask2Former + CLIP. images_per_s excludes worker start; end_to_end includes it.",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
