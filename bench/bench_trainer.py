"""Benchmark: the trainer's steps per hour with the local reward and behind a slow judge.

Sync vs async at staleness bounds 1, 2 and 4; each run's reward rise; the VLM judge example's own latency.

Each run is one `python -m rl.run.train` of the CPU glyph demo (deploy/configs/tiny-cpu-glyph-ocr.yaml:
glyph decoder + real PP-OCRv6 tiny, vLLM, 2 DeepSpeed ranks), seed 0, `--steps` steps, its own run
store, one run after the other (each wants both cores). In-run eval is off and the only checkpoint is
the last step's: the runs time the schedule, not eval drains. Runs (`--runs`, comma-separated):

    sync, async-k1, async-k2, async-k4     the local reward (the run's own Ray Serve app)
    sync@1.5s, async-k1@1.5s               the same reward app outside the run (OCR tiny, the demo's
    async-k1@10s, async-k2@10s, async-k4@10s   cache), a fresh one per run, behind bench/latency_proxy.py
                                           holding each scoring request 1.5 s or 10 s (a remote judge)
    vlm-judge                              the VLM judge example (examples/vlm_judge: the tiny Idefics3 on
                                           vLLM's OpenAI server): p50/p90/p99 of its GET /stats over
                                           `--judge-requests` single-image requests after a warm-up
Any `sync[@<s>s]` or `async-k<K>[@<s>s]` is accepted.

Figures (bench/results/trainer.json; read-modify-write: every key this call does not compute is kept,
and runs of earlier calls stay in `runs` under their names; figures combine runs of `--steps` steps):
    steps_per_hour[run]          3600 (N - 1) / (t_N - t_1), t_s = when the store logged step s (step 1,
                                 the warm-up, is left out; everything between steps counts)
    reward_rise[run]             mean reward of the last 5 steps minus that of the first 5
    reward_rise_over_sync[run]   reward_rise[run] / reward_rise[sync]           target >= 0.8 (async runs)
    judge_1_5s_over_zero_latency     steps_per_hour[async-k1@1.5s] / steps_per_hour[async-k1]   target >= 0.9
    judge_10s_over_zero_latency      max_k steps_per_hour[async-kK@10s] / steps_per_hour[async-k1] (K <= 4)
                                     target >= 0.7; judge_10s_best_staleness names K;
                                     judge_10s_over_best_zero_latency divides by the best local async run
    load_average_before[run]     1, 5, 15 min load average as the run started
    vlm_judge_latency            the example's /stats percentiles (nearest rank, per judge call) and this
                                 script's round trip per request, with the load average
and, as before, sync_step_s / async_step_s / async_speedup (wall seconds a step, 3600 / steps_per_hour:
with several steps in flight a step's own `time/step` no longer measures the pace; sync vs async-k1),
the stage splits (mean `time/<stage>` of steps 2..N), and remote_reward_* (sync@1.5s vs async-k1@1.5s).

    .venv/bin/python bench/bench_trainer.py [--runs sync,async-k1,...] [--steps 30] [--out FILE]

With fewer than 10 steps (a smoke test: `--steps 3 --out /tmp/trainer-smoke.json`, so short runs do not
replace the real ones in the file) there is no reward rise.

Wall time, all nine runs at 30 steps, alone on the machine: 20 minutes (measured 2026-12-05, 18:44-19:04
UTC; 76-200 s a run, the 10 s judge runs the longest).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.latency_proxy import serve_proxy  # noqa: E402
from rewards.local_server import free_port, serve_in_thread, start_reward_server  # noqa: E402
from rl.run_store import RunStore  # noqa: E402

CONFIG = REPO / "deploy" / "configs" / "tiny-cpu-glyph-ocr.yaml"
JUDGE_EXAMPLE = REPO / "examples" / "vlm_judge"
STAGES = ("collect", "rollout", "decode", "reward", "update", "sync", "step")
WINDOW = 5
"""Steps averaged at each end of a run for its reward rise."""
TARGETS = {"judge_1_5s_over_zero_latency": 0.9, "judge_10s_over_zero_latency": 0.7, "reward_rise_over_sync": 0.8}
VLM_JUDGE = "vlm-judge"
DEFAULT_RUNS = ("sync", "async-k1", "async-k2", "async-k4", "sync@1.5s", "async-k1@1.5s", "async-k1@10s",
                "async-k2@10s", "async-k4@10s", VLM_JUDGE)
JUDGE_IMAGE_SIDE = 256
"""Random-noise images of this side for the VLM judge (examples/vlm_judge/measure_latency.py's default)."""
PROGRESS_S = 20.0
"""Seconds between progress lines of a run."""


@dataclass(frozen=True)
class BenchRun:
    """One training run of the benchmark."""

    mode: str
    """sync or async."""
    max_staleness: int = 1
    """schedule.max_staleness (async)."""
    delay_s: float | None = None
    """None: the run's own reward app; else the app outside the run behind the proxy holding each POST this long."""

    @property
    def name(self) -> str:
        base = "sync" if self.mode == "sync" else f"async-k{self.max_staleness}"
        return base if self.delay_s is None else f"{base}@{self.delay_s:g}s"


def parse_run(text: str) -> BenchRun:
    """`sync`, `async-k2`, `async-k1@1.5s`, ... as a BenchRun."""
    match = re.fullmatch(r"(sync|async-k([1-9][0-9]*))(?:@([0-9]+(?:\.[0-9]+)?)s)?", text.strip())
    if match is None:
        raise ValueError(f"unknown run {text!r}: sync[@<seconds>s], async-k<K>[@<seconds>s] or {VLM_JUDGE}")
    mode = "sync" if match.group(1) == "sync" else "async"
    delay = float(match.group(3)) if match.group(3) else None
    return BenchRun(mode, int(match.group(2) or 1), delay)


# ---- one run ------------------------------------------------------------------------------------

def run_config(run: BenchRun, steps: int, workdir: Path, model: Path, reward_url: str | None) -> Path:
    """The demo config for this run: its schedule, its own run store, eval off, one checkpoint at the end."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(steps=steps, name=f"bench-{run.name}")
    raw["model"] = {"path": str(model), "make_tiny": "glyph"}
    raw["schedule"] = {"mode": run.mode, **({"max_staleness": run.max_staleness} if run.mode == "async" else {})}
    raw["checkpoint"] = {"every": steps}
    raw.pop("eval", None)
    raw["logging"]["runs_dir"] = str(workdir / run.name)
    if reward_url:
        raw["rewards"] = {"service": "url", "url": reward_url}
    path = workdir / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def read_store(runs_dir: Path) -> dict[int, dict[str, float]] | None:
    """step -> {key: value, "_logged_at": wall time} of the run in `runs_dir` (None: no run yet)."""
    store = RunStore.existing(runs_dir)
    runs = store.list_runs() if store else []
    if not runs:
        return None
    table: dict[int, dict[str, float]] = {}
    for step, key, value, logged_at in store.scalars(runs[0].id):
        row = table.setdefault(step, {})
        row[key] = value
        row["_logged_at"] = max(row.get("_logged_at", 0.0), logged_at)
    return table


def train(run: BenchRun, steps: int, workdir: Path, model: Path, reward_url: str | None) -> dict:
    """Train one run, printing its progress; what its store says about it."""
    config = run_config(run, steps, workdir, model, reward_url)
    log = workdir / f"{run.name}.log"
    load_before, started = list(os.getloadavg()), time.time()
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "rl.run.train", "--config", str(config)], cwd=REPO,
                                   stdout=output, stderr=subprocess.STDOUT)
        report_at = started + PROGRESS_S
        while process.poll() is None:
            time.sleep(1.0)
            if time.time() >= report_at:
                report_at += PROGRESS_S
                table = read_store(workdir / run.name) or {}
                last = max(table, default=None)
                reward = f", reward {table[last]['reward/mean']:.3f}" if last and "reward/mean" in table[last] else ""
                print(f"  {run.name}: step {last or 0}/{steps}{reward}, {time.time() - started:.0f} s", flush=True)
    if process.returncode != 0:
        raise RuntimeError(f"{run.name}: training exited {process.returncode}; its log: {log}\n"
                           f"{log.read_text(errors='replace')[-3000:]}")
    table = read_store(workdir / run.name)
    summary = summarize(table, steps)
    summary.update(load_average_before=load_before, wall_s=round(time.time() - started, 1),
                   date=time.strftime("%Y-%m-%d %H:%M", time.localtime(started)), delay_s=run.delay_s)
    return summary


@contextmanager
def slow_judge(delay_s: float, workdir: Path, name: str):
    """The demo's reward app as a process outside the run (OCR tiny, the demo's cache, as its Serve app
    has), behind the latency proxy; yields the proxy's URL."""
    env = {**os.environ, "BLIP3O_RL_REWARDS_OCR__CACHE_SIZE": "100000"}
    with start_reward_server(["--scorers", "ocr", "--ocr-size", "tiny"], env=env,
                             log=workdir / f"{name}-rewards.log") as server, serve_proxy(server.url, delay_s) as proxy:
        yield proxy


# ---- figures ----------------------------------------------------------------------------------

def rise(rewards: list[float], window: int = WINDOW) -> float | None:
    """Mean of the last `window` rewards minus the mean of the first `window` (None: fewer than
    2 `window` steps, where the two ends would overlap)."""
    if len(rewards) < 2 * window:
        return None
    return float(np.mean(rewards[-window:]) - np.mean(rewards[:window]))


def summarize(table: dict[int, dict[str, float]], steps: int) -> dict:
    """A run's figures from its store: steps/hour, mean step and stage seconds (steps 2..N), rewards,
    rise, the largest staleness and steps in flight seen, and its reward latency per component."""
    order = sorted(table)
    if len(order) != steps or order != list(range(1, steps + 1)):
        raise RuntimeError(f"the run logged steps {order}, not 1..{steps}")
    measured = [table[s] for s in order[1:]]  # step 1 includes warm-up (engine compile, first publish)
    span = table[order[-1]]["_logged_at"] - table[order[0]]["_logged_at"]
    rewards = [table[s]["reward/mean"] for s in order]
    latency: dict[str, dict[str, float]] = {}
    for key in sorted({k for row in measured for k in row if k.startswith("reward_latency/")}):
        _, component, stat = key.split("/")
        values = [row[key] for row in measured if key in row]
        latency.setdefault(component, {})[f"{stat}_median_over_steps"] = float(np.median(values))
    return {
        "steps": steps,
        "steps_per_hour": 3600.0 * (steps - 1) / span if span > 0 else None,
        "step_s": span / (steps - 1) if span > 0 else None,  # wall seconds a step: the pace, in any schedule
        "stages_s": {stage: float(np.mean([m[f"time/{stage}"] for m in measured if f"time/{stage}" in m]))
                     for stage in STAGES if any(f"time/{stage}" in m for m in measured)},
        "rewards": rewards,
        "reward_rise": rise(rewards),
        "max_staleness_seen": max(max(row.get("policy/staleness", 0.0), row.get("schedule/staleness_max", 0.0))
                                  for row in table.values()),
        "max_in_flight_seen": max((row["schedule/in_flight_steps"] for row in table.values()
                                   if "schedule/in_flight_steps" in row), default=None),
        "reward_latency_s": latency,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def figures(runs: dict[str, dict], steps: int) -> dict:
    """The file's figures from the runs of `steps` steps (a figure whose runs are missing is left out)."""
    runs = {name: run for name, run in runs.items() if run.get("steps") == steps}
    out: dict = {"steps_per_hour": {name: run["steps_per_hour"] for name, run in runs.items()},
                 "reward_rise": {name: run["reward_rise"] for name, run in runs.items()},
                 "load_average_before": {name: run["load_average_before"] for name, run in runs.items()},
                 "first_last_window": WINDOW}
    sph = out["steps_per_hour"]
    if "sync" in runs:
        sync = runs["sync"]
        out["reward_rise_over_sync"] = {name: ratio(run["reward_rise"], sync["reward_rise"])
                                        for name, run in runs.items() if name != "sync"}
        out.update(steps=steps, reward_first_steps=float(np.mean(sync["rewards"][:WINDOW])),
                   reward_last_steps=float(np.mean(sync["rewards"][-WINDOW:])), sync_step_s=sync["step_s"],
                   stage_split_sync_s=sync["stages_s"])
    if "async-k1" in runs:
        k1 = runs["async-k1"]
        out.update(async_step_s=k1["step_s"], stage_split_async_s=k1["stages_s"],
                   async_reward_first_steps=float(np.mean(k1["rewards"][:WINDOW])),
                   async_reward_last_steps=float(np.mean(k1["rewards"][-WINDOW:])),
                   async_max_staleness=k1["max_staleness_seen"])
        if "sync" in runs:
            out["async_speedup"] = ratio(runs["sync"]["step_s"], k1["step_s"])
        if "async-k1@1.5s" in runs:
            out["judge_1_5s_over_zero_latency"] = ratio(sph["async-k1@1.5s"], sph["async-k1"])
        slow = {k: sph[f"async-k{k}@10s"] for k in (1, 2, 4) if f"async-k{k}@10s" in runs}
        if slow:
            best = max(slow, key=lambda k: slow[k])
            local = [sph[f"async-k{k}"] for k in (1, 2, 4) if f"async-k{k}" in runs]
            out.update(judge_10s_over_zero_latency=ratio(slow[best], sph["async-k1"]), judge_10s_best_staleness=best,
                       judge_10s_over_best_zero_latency=ratio(slow[best], max(local)))
    if "sync@1.5s" in runs and "async-k1@1.5s" in runs:
        remote_sync, remote_async = runs["sync@1.5s"], runs["async-k1@1.5s"]
        out.update(remote_reward_delay_s=1.5, remote_reward_sync_step_s=remote_sync["step_s"],
                   remote_reward_async_step_s=remote_async["step_s"],
                   remote_reward_async_speedup=ratio(remote_sync["step_s"], remote_async["step_s"]),
                   stage_split_remote_reward_sync_s=remote_sync["stages_s"],
                   stage_split_remote_reward_async_s=remote_async["stages_s"])
    return out


def merge(results: dict, new_runs: dict[str, dict], steps: int, vlm: dict | None) -> dict:
    """`results` (the file as it is) with these runs added under their names and the figures recomputed
    from every run of `steps` steps; keys no figure of this call touches are kept as they were."""
    runs = {**results.get("runs", {}), **new_runs}
    merged = {**results, "runs": runs, **figures(runs, steps)}
    if vlm is not None:
        merged["vlm_judge_latency"] = vlm
    merged["note"] = ("2 shared CPU cores; steps_per_hour and step_s from the store's log times of steps 2..N; "
                      "stage splits: mean time/<stage> of steps 2..N (busy seconds overlap inside collect); "
                      f"reward rise: mean of the last {WINDOW} steps minus the first {WINDOW}. Config: "
                      "deploy/configs/tiny-cpu-glyph-ocr.yaml, eval off, seed 0")
    merged["load_average_at_end"] = list(os.getloadavg())
    return merged


def target_lines(merged: dict) -> list[str]:
    """The figures against the issue's targets, one line each."""
    def verdict(value: float | None, target: float) -> str:
        if value is None:
            return "not measured"
        return f"{value:.3f} ({'met' if value >= target else 'MISSED'}, target >= {target})"

    lines = [f"{key}: {verdict(merged.get(key), TARGETS[key])}"
             for key in ("judge_1_5s_over_zero_latency", "judge_10s_over_zero_latency")]
    if "judge_10s_best_staleness" in merged:
        lines[-1] += f" at k = {merged['judge_10s_best_staleness']}"
    for name, value in sorted(merged.get("reward_rise_over_sync", {}).items()):
        if name.startswith("async"):
            lines.append(f"reward rise of {name} over sync's: {verdict(value, TARGETS['reward_rise_over_sync'])}")
    lines += [f"steps/hour {name}: {value:.0f}" for name, value in merged.get("steps_per_hour", {}).items() if value]
    return lines


# ---- the VLM judge example ----------------------------------------------------------------------

def vlm_judge_latency(workdir: Path, requests: int) -> dict:
    """The tiny VLM judge served by vLLM (1 GiB KV cache) behind the example scorer: `requests`
    single-image requests, one after another, after a warm-up sent to vLLM directly (so /stats holds
    only the measured calls); the scorer's /stats percentiles and this client's round trips."""
    import httpx

    sys.path.insert(0, str(JUDGE_EXAMPLE))
    import measure_latency
    import vlm_judge

    model, port = workdir / "tiny-vlm", free_port()
    command = [sys.executable, str(JUDGE_EXAMPLE / "tiny_vlm.py"), str(model), "--serve", "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
               "--max-num-seqs", "8", "--limit-mm-per-prompt", '{"image": 1}']
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_PLUGINS": "",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1"}  # no compile on the first logprobs call
    log = workdir / "vlm-judge.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url, load_before = f"http://127.0.0.1:{port}", list(os.getloadavg())
    try:
        deadline = time.monotonic() + 900
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the VLM judge did not start (exit {process.poll()}): {log}")
            time.sleep(1.0)
        template = vlm_judge.load_template(vlm_judge.PROMPT_FILE).replace("{prompt}", "warm-up")
        image = "data:image/png;base64," + measure_latency.png(0, JUDGE_IMAGE_SIDE)
        warm = vlm_judge.chat_request(str(model), template, [image], 20)
        httpx.post(f"{url}/v1/chat/completions", json=warm, timeout=600).raise_for_status()
        with serve_in_thread(vlm_judge.create_app(vlm_judge.JudgeSettings(url=url))) as scorer:
            wall = []
            for n in range(requests):
                item = {"image": measure_latency.png(n + 1, JUDGE_IMAGE_SIDE), "prompt": "a photo of a red apple"}
                t0 = time.perf_counter()
                httpx.post(f"{scorer}/score", json={"items": [item]}, timeout=600).raise_for_status()
                wall.append(time.perf_counter() - t0)
            stats = httpx.get(f"{scorer}/stats", timeout=60).json()
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the API server and its engine process
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return {"judge_requests": stats["judge_requests"], "judge_latency_s": stats["judge_latency_s"],
            "scorer_request_s": vlm_judge.percentiles(wall), "image_side": JUDGE_IMAGE_SIDE, "images_per_request": 1,
            "model": "tiny random Idefics3 (examples/vlm_judge/tiny_vlm.py), float32, vllm-cpu",
            "percentiles": "nearest rank", "load_average_before": load_before,
            "load_average_after": list(os.getloadavg())}


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# ---- main ---------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated runs (default: all)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--judge-requests", type=int, default=20, help="single-image requests to the VLM judge")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "trainer.json")
    args = parser.parse_args()
    names = [name.strip() for name in args.runs.split(",") if name.strip()]
    planned = [parse_run(name) for name in names if name != VLM_JUDGE]  # every name checked before anything runs
    if args.steps < 2 * WINDOW and planned:
        print(f"fewer than {2 * WINDOW} steps: no reward rise (it averages {WINDOW} steps at each end)", flush=True)
    done: dict[str, dict] = {}
    vlm = None
    with tempfile.TemporaryDirectory(prefix="bench_trainer-") as tmp:
        workdir = Path(tmp)
        model = workdir / "tiny-glyph"  # built by the first run (make_tiny), the same weights for every run
        for index, run in enumerate(planned, start=1):
            print(f"[{index}/{len(planned)}] {run.name}: {args.steps} steps, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
            if run.delay_s is None:
                done[run.name] = train(run, args.steps, workdir, model, None)
            else:
                with slow_judge(run.delay_s, workdir, run.name) as proxy:
                    done[run.name] = train(run, args.steps, workdir, model, proxy)
            result = done[run.name]
            gained = "-" if result["reward_rise"] is None else f"{result['reward_rise']:+.3f}"
            print(f"  {run.name}: {result['steps_per_hour']:.0f} steps/hour, reward rise {gained}, "
                  f"{result['wall_s']:.0f} s", flush=True)
            write(args.out, merge(read(args.out), done, args.steps, None))  # after each run: a crash keeps the rest
        if VLM_JUDGE in names:
            print(f"{VLM_JUDGE}: {args.judge_requests} requests", flush=True)
            vlm = vlm_judge_latency(workdir, args.judge_requests)
            print(f"  {VLM_JUDGE}: /stats {vlm['judge_latency_s']}", flush=True)
    merged = merge(read(args.out), done, args.steps, vlm)
    write(args.out, merged)
    print("\n".join(target_lines(merged)), flush=True)


def read(out: Path) -> dict:
    return json.loads(out.read_text()) if out.exists() else {}


def write(out: Path, results: dict) -> None:
    """Replace the file atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
