"""Benchmark: every shipped GPU config rehearsed on this CPU (`blip3o-rl rehearse`), with and without LoRA.

For each deploy/configs/gpu-*.yaml, two rehearsals of `--steps` steps (default 4: the last step's
sampler/learner log-probs come from weights after 3 updates), each run as a user runs it (a
subprocess of `python -m deploy.cli rehearse`):

    configured    the config as written (the joint config trains SANA's transformer with LoRA; the
                  AR-only configs train the AR model fully)
    lora toggled  the joint config without its transformer LoRA (full fine-tuning); the AR-only configs
                  with an AR LoRA (rank 32, alpha 64, Qwen3's seven projections) on learner and workers

Writes `{"configs": {"<config file name>": {...}}}` (entries of configs not rehearsed by this call are
kept; each says when it ran, with how many steps and nodes): what was substituted, steps completed, the AR and
decoder max |learner - sampler| log-prob (bf16; per variant, with its LoRA flag: the max over steps and
the value at the step sampled after 3 updates; null for a policy the config does not train), weight-sync
GB/s per stream and transport (median over steps), seconds a step (median over steps 2.., step 1
apart: it pays first-call costs), the load average before and after each run.

    .venv/bin/python bench/bench_rehearsal.py [--steps 4] [--nodes 1] [--configs NAME,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "rehearsal.json"
CONFIGS = sorted((REPO / "deploy" / "configs").glob("gpu-*.yaml"))
AR_LORA = "{rank: 32, alpha: 64}"
"""The AR adapter of the toggled AR-only rehearsals (Qwen3's seven projections: LoRAConfig's default targets)."""
STREAMS = {"sync": "ar", "sync_diffusion": "transformer"}
"""Metric prefix -> weight stream (rl/run/trainer.py logs `<prefix>/gb_per_s` per published stream)."""


def toggled_lora(config: Path) -> tuple[list[str], dict[str, bool]]:
    """`--set` arguments that flip the config's LoRA choice, and which policies then train with LoRA."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    if (raw.get("diffusion_learner") or {}).get("lora") is not None:
        return ["--set", "diffusion_learner.lora=null", "--set", "decoder.decoder.transformer_lora=null"], \
            {"ar": False, "decoder": False}
    sets = [f"{key}={AR_LORA}" for key in ("learner.lora", "rollout.engine.lora", "decoder.decoder.lora")]
    return [arg for pair in zip(["--set"] * 3, sets) for arg in pair], {"ar": True, "decoder": False}


def configured_lora(config: Path) -> dict[str, bool]:
    import yaml

    raw = yaml.safe_load(config.read_text())
    return {"ar": (raw.get("learner") or {}).get("lora") is not None,
            "decoder": (raw.get("diffusion_learner") or {}).get("lora") is not None}


def rehearse(config: Path, workdir: Path, variant: str, steps: int, nodes: int, extra: list[str]) -> dict:
    """One rehearsal; its --out report plus the exit code, wall time and load averages around it. The
    variants of a config share `workdir` (its tiny model is built once; each run is its own in the store)."""
    out = workdir / f"report-{variant}.json"
    load_before, start = os.getloadavg(), time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "deploy.cli", "rehearse", "--config", str(config), "--steps",
                             str(steps), "--nodes", str(nodes), "--workdir", str(workdir), "--out", str(out), *extra],
                            cwd=REPO, capture_output=True, text=True)
    report = json.loads(out.read_text()) if out.is_file() else {"problems": [result.stderr[-2000:]], "per_step": {}}
    report.update(exit_code_cli=result.returncode, wall_s=time.perf_counter() - start,
                  load_average=[list(load_before), list(os.getloadavg())])
    return report


def agreement(report: dict, policy: str, after_updates: int) -> dict | None:
    """Max |learner - sampler| of `policy` over the run, and at the step sampled after `after_updates` updates."""
    found = report.get("agreement", {}).get(policy)
    if found is None:
        return None
    at = found["per_step"].get(str(after_updates + 1))
    return {"max_over_steps": found["max_abs_diff"], f"after_{after_updates}_updates": at,
            "tolerance": found["tolerance"], "ok": found["ok"]}


def summary(config: Path, variants: dict[str, tuple[dict, dict[str, bool]]], steps: int) -> dict:
    """The result entry of one config from its variants' reports."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    configured, _ = variants["configured"]
    rows = [row for _, row in sorted(configured["per_step"].items(), key=lambda item: int(item[0]))]
    sync = {}
    for prefix, stream in STREAMS.items():
        section = raw.get("learner" if stream == "ar" else "diffusion_learner") or {}
        values = [row[f"{prefix}/gb_per_s"] for row in rows if f"{prefix}/gb_per_s" in row]
        if values:
            sync[f"{stream}/{section.get('sync', {}).get('transport', 'shared_memory')}"] = statistics.median(values)
    step_s = [row["time/step"] for row in rows if "time/step" in row]

    def by_variant(policy: str) -> dict | None:
        """Each variant's agreement of `policy` with its LoRA flag; None when no variant trains it."""
        found = {name: agreement(report, policy, steps - 1) for name, (report, _) in variants.items()}
        if all(value is None for value in found.values()):
            return None
        return {name: {"lora": variants[name][1][policy], **(value or {})} for name, value in found.items()}

    return {
        "substituted": configured.get("substituted", []),
        "steps_completed": {name: report.get("steps_completed", 0) for name, (report, _) in variants.items()},
        "ok": {name: report.get("ok", False) for name, (report, _) in variants.items()},
        "problems": {name: report.get("problems", []) for name, (report, _) in variants.items() if report.get("problems")},
        "ar_logprob_max_abs_diff": by_variant("ar"),
        "decoder_logprob_max_abs_diff": by_variant("decoder"),
        "sync_gb_per_s": sync,
        "step_s": {"first": step_s[0] if step_s else None,
                   "median_after_first": statistics.median(step_s[1:]) if len(step_s) > 1 else None},
        "wall_s": {name: round(report["wall_s"], 1) for name, (report, _) in variants.items()},
        "load_average": {name: report["load_average"] for name, (report, _) in variants.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per rehearsal (4: the last after 3 updates)")
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1, help="Ray nodes of each rehearsal")
    parser.add_argument("--configs", help="comma-separated config file names (default: every gpu-*.yaml)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (default bench/results/rehearsal.json)")
    parser.add_argument("--workdir", type=Path, help="where the rehearsals write (default: a temp dir, removed)")
    args = parser.parse_args()
    names = args.configs.split(",") if args.configs else [c.name for c in CONFIGS]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-rehearsal-"))
    # read-modify-write: the configs this call does not rehearse keep their entries (each says when it ran)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"configs": {}}
    for earlier in results["configs"].values():
        earlier.setdefault("measured_at", results.get("measured_at"))
        earlier.setdefault("steps", results.get("steps"))
        earlier.setdefault("nodes", results.get("nodes"))
    results = {"configs": results["configs"]}
    for name in names:
        config = REPO / "deploy" / "configs" / name
        toggle, toggled = toggled_lora(config)
        variants = {}
        for variant, extra, lora in (("configured", [], configured_lora(config)), ("lora_toggled", toggle, toggled)):
            print(f"{name} ({variant}) ...", flush=True)
            report = rehearse(config, work / name.removesuffix(".yaml"), variant, args.steps, args.nodes, extra)
            variants[variant] = (report, lora)
            print(f"  exit {report['exit_code_cli']}, {report.get('steps_completed', 0)} steps, "
                  f"{report['wall_s']:.0f} s; problems: {report.get('problems') or 'none'}", flush=True)
        results["configs"][name] = {**summary(config, variants, args.steps), "steps": args.steps, "nodes": args.nodes,
                                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after every config: a partial run keeps its part
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
