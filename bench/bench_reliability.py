"""Benchmark: reliability. Faults injected into a real CPU run, and the reward API under load.

1. Fault drill: the CPU demo config (vLLM, glyph decoder, real OCR through Ray Serve, 2 DeepSpeed
   ranks) for `--steps` steps; after every `--every` steps a busy worker is SIGKILLed (rollout,
   decoder, reward replica) or SIGSTOPped (decoder hang), in turn. Counted from the run store: steps
   completed, rows trained per step (items lost = rows expected - rows trained), recoveries and
   their duration.
2. Load: `blip3o-rl rewards serve` (OCR tiny + GenEval with tiny random models) under 32 concurrent
   clients for 60 s with a mix of good and bad requests (rewards/loadtest.py).
Writes bench/results/reliability.json.

    .venv/bin/python bench/bench_reliability.py [--steps 16] [--every 2] [--load-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rl.run_store import RunStore  # noqa: E402
from tests.support.chaos import inject_fault  # noqa: E402

FAULTS = (("rollout", "kill"), ("decoder", "kill"), ("reward", "kill"), ("decoder", "hang"))


def fault_drill(steps: int, every: int, workdir: Path) -> dict:
    raw = yaml.safe_load((REPO / "deploy" / "configs" / "tiny-cpu-glyph-ocr.yaml").read_text())
    raw.update(steps=steps, name="bench-faults")
    raw["model"] = {"path": str(workdir / "tiny-glyph"), "make_tiny": "glyph"}
    raw["checkpoint"] = {"every": 100}
    raw["schedule"] = {"mode": "sync", "stage_timeout_s": 30}  # a hung worker is found after 30 s
    raw["logging"]["runs_dir"] = str(workdir / "runs")
    config = workdir / "faults.yaml"
    config.write_text(yaml.safe_dump(raw))
    rows = raw["data"]["prompts_per_step"] * raw["data"]["group_size"]

    process = subprocess.Popen([sys.executable, "-m", "rl.run.train", "--config", str(config)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    injected = []
    started = time.monotonic()
    for n, after_step in enumerate(range(every, steps, every)):
        while not any(line.startswith(f"step {after_step}/") for line in list(lines)):
            if process.poll() is not None:
                break
            time.sleep(0.05)
        if process.poll() is not None:
            break
        role, kind = FAULTS[n % len(FAULTS)]
        try:
            fault = inject_fault(process.pid, role, kind, timeout_s=120)
            injected.append({"after_step": after_step, "role": role, "kind": kind, "title": fault.title})
            print(f"injected: {kind} {role} ({fault.title}) after step {after_step}", flush=True)
        except TimeoutError as error:
            print(f"not injected: {error}", flush=True)
    code = process.wait()
    reader.join(timeout=30)
    wall_s = time.monotonic() - started

    store = RunStore(workdir / "runs")
    (run,) = store.list_runs()
    table: dict[int, dict[str, float]] = {}
    for step, key, value, _ in store.scalars(run.id):
        table.setdefault(step, {})[key] = value
    events = store.events(run.id)
    recoveries = [float(m[1]) for e in events if e.kind == "recovered" and (m := re.search(r"\(([\d.]+) s\)$", e.message))]
    return {
        "exit_code": code,
        "status": run.status,
        "faults_injected": len(injected),
        "injected": injected,
        "steps_expected": steps,
        "steps_completed": len(table),
        "rows_expected": steps * rows,
        "rows_trained": int(sum(t.get("rollout/rows", 0) for t in table.values())),
        "worker_faults_detected": sum(e.kind == "worker_fault" for e in events),
        "recoveries": len(recoveries),
        "recovery_s": recoveries,
        "reward_requests_retried_events": sum(e.kind == "reward_retry" for e in events),
        "wall_s": wall_s,
        "output_tail": "".join(lines[-5:]),
    }


def load_drill(clients: int, seconds: float, workdir: Path) -> dict:
    from rewards.loadtest import run_load_test
    from rewards.local_server import start_reward_server
    from rewards.tiny import make_tiny_geneval_models

    detector, clip = make_tiny_geneval_models(workdir / "geneval")
    env = dict(os.environ, BLIP3O_RL_REWARDS_OCR__CACHE_SIZE="0")
    args = ["--scorers", "ocr,geneval", "--ocr-size", "tiny", "--detector", str(detector), "--clip", str(clip)]
    with start_reward_server(args, env=env, log=workdir / "reward-server.log") as server:
        report = run_load_test(server.url, clients, seconds, server_pid=server.process.pid)
    return report.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=2, help="inject a fault after every this many steps")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reliability.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        faults = fault_drill(args.steps, args.every, Path(tmp))
        load = load_drill(args.clients, args.load_seconds, Path(tmp))
    out = {
        "faults_injected": faults["faults_injected"],
        "steps_completed": faults["steps_completed"],
        "steps_expected": faults["steps_expected"],
        "items_lost": faults["rows_expected"] - faults["rows_trained"],
        "requests_served": load["requests_served"],
        "http_5xx": load["http_5xx"],
        "fault_drill": faults,
        "load": load,
        "note": "2 shared CPU cores. Faults: SIGKILL of a busy worker process (rollout, decoder, reward "
                "replica in turn); items = rollout rows trained on. Load: rewards/loadtest.py.",
        "load_average_at_end": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
