"""Benchmark: the GRPO run's step time by stage, sync vs async schedule, side by side.

Runs the CPU demo config (glyph decoder + real OCR through Ray Serve, vLLM, 2 DeepSpeed ranks)
twice in one go, once per schedule, with the same seed and steps, and reads both back from the run
store. Then the same pair again with the reward service behind a proxy that holds every scoring
request `--remote-delay-s` (bench/latency_proxy.py: a remote judge), where the async schedule has
waiting to overlap: `remote_reward_sync_step_s`, `remote_reward_async_step_s`,
`remote_reward_async_speedup`. Writes bench/results/trainer.json.

    .venv/bin/python bench/bench_trainer.py [--steps 30] [--remote-delay-s 1.5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.latency_proxy import serve_proxy  # noqa: E402
from rewards.local_server import start_reward_server  # noqa: E402
from rl.run_store import RunStore  # noqa: E402

STAGES = ("collect", "rollout", "decode", "reward", "update", "sync", "step")


def run(mode: str, steps: int, workdir: Path, model: Path, reward_url: str | None = None) -> dict:
    """One run of the demo config; `reward_url`: score through that running service instead of
    the run's own Ray Serve app."""
    raw = yaml.safe_load((REPO / "deploy" / "configs" / "tiny-cpu-glyph-ocr.yaml").read_text())
    label = f"{mode}-remote" if reward_url else mode
    raw.update(steps=steps, name=f"bench-{label}")
    raw["model"] = {"path": str(model), "make_tiny": "glyph"}
    raw["schedule"] = {"mode": mode}
    raw["checkpoint"] = {"every": steps}
    raw["logging"]["runs_dir"] = str(workdir / label)
    if reward_url:
        raw["rewards"] = {"service": "url", "url": reward_url}
    config = workdir / f"{label}.yaml"
    config.write_text(yaml.safe_dump(raw))
    subprocess.run([sys.executable, "-m", "rl.run.train", "--config", str(config)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    store = RunStore(workdir / label)
    (info,) = store.list_runs()
    table: dict[int, dict[str, float]] = {}
    for step, key, value, _ in store.scalars(info.id):
        table.setdefault(step, {})[key] = value
    measured = [table[s] for s in sorted(table)][1:]  # step 1 includes warm-up: left out of the times
    rewards = [table[s]["reward/mean"] for s in sorted(table)]
    return {
        "step_s": float(np.mean([m["time/step"] for m in measured])),
        "stages_s": {stage: float(np.mean([m[f"time/{stage}"] for m in measured])) for stage in STAGES},
        "rewards": rewards,
        "max_staleness": max(m["policy/staleness"] for m in table.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "trainer.json")
    parser.add_argument("--remote-delay-s", type=float, default=1.5,
                        help="seconds the proxy holds each scoring request in the remote-reward runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = workdir / "tiny-glyph"
        results = {mode: run(mode, args.steps, workdir, model) for mode in ("sync", "async")}
        # the demo's reward app (tiny OCR, its defaults otherwise) outside the run, behind the proxy
        with start_reward_server(["--scorers", "ocr", "--ocr-size", "tiny"], log=workdir / "rewards.log") as server, \
                serve_proxy(server.url, args.remote_delay_s) as proxy:
            remote = {mode: run(mode, args.steps, workdir, model, reward_url=proxy) for mode in ("sync", "async")}
    sync, asynchronous = results["sync"], results["async"]
    k = max(1, args.steps // 5)
    out = {
        "steps": args.steps,
        "reward_first_steps": float(np.mean(sync["rewards"][:k])),
        "reward_last_steps": float(np.mean(sync["rewards"][-k:])),
        "first_last_window": k,
        "sync_step_s": sync["step_s"],
        "async_step_s": asynchronous["step_s"],
        "async_speedup": sync["step_s"] / asynchronous["step_s"],
        "stage_split_sync_s": sync["stages_s"],
        "stage_split_async_s": asynchronous["stages_s"],
        "async_reward_first_steps": float(np.mean(asynchronous["rewards"][:k])),
        "async_reward_last_steps": float(np.mean(asynchronous["rewards"][-k:])),
        "async_max_staleness": asynchronous["max_staleness"],
        "remote_reward_delay_s": args.remote_delay_s,
        "remote_reward_sync_step_s": remote["sync"]["step_s"],
        "remote_reward_async_step_s": remote["async"]["step_s"],
        "remote_reward_async_speedup": remote["sync"]["step_s"] / remote["async"]["step_s"],
        "stage_split_remote_reward_sync_s": remote["sync"]["stages_s"],
        "stage_split_remote_reward_async_s": remote["async"]["stages_s"],
        "note": "2 shared CPU cores; busy seconds (rollout/decode/reward) overlap inside collect; "
                "step 1 (warm-up) is left out of the times. Config: deploy/configs/tiny-cpu-glyph-ocr.yaml",
        "load_average_at_end": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
