"""`blip3o-rl rehearse --config CONFIG [--steps N] [--nodes 2] [--out FILE] [--resume [RUN_ID]]`.

    load the GPU config -> rehearsal_config (substitution.py) -> tiny models (models.py)
      -> a local Ray cluster of 1 or 2 nodes (cluster.py) -> the real trainer (`rl.run.train.main`)
      -> the run store's numbers -> report (report.py): printed, and written as JSON with --out

Exit code: 0 when the run completed its steps and both policies' sampler/learner log-probs agree
within the tolerance of their precision; 1 when it ran but failed that; 2 for a config that cannot
be rehearsed; otherwise the trainer's own non-zero exit code (3 reward outage, 4 failure, 5 guard).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
import traceback
from pathlib import Path

import yaml

from rl.rehearsal.cluster import local_cluster, node_specs
from rl.rehearsal.models import build_tiny_model, read_model_choices
from rl.rehearsal.report import Report, agreements, format_outcome, format_substitutions, read_run
from rl.rehearsal.substitution import RehearsalSize, Substitution, rehearsal_config
from rl.run.config import ConfigError, TrainConfig, load_config
from rl.run_store import RunStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a GPU run config, e.g. deploy/configs/gpu-*.yaml")
    parser.add_argument("--steps", type=int, default=RehearsalSize.steps, help="steps to run (default 3)")
    parser.add_argument("--out", help="also write the report here (JSON)")
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                        help="Ray nodes on this machine: 2 puts the learners on a second raylet (default 1)")
    parser.add_argument("--workdir", help="folder of the tiny models, the rehearsal config and its run store "
                        "(default: <runs_dir>/rehearsal/<config name>)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue a rehearsal run from its last checkpoint (a run id, or the latest)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a key of the rehearsal config after the substitutions (VALUE is YAML), "
                             "e.g. checkpoint.every=1; recorded in the table")


def parse_overrides(items: list[str]) -> dict:
    """`KEY=VALUE` items -> {dotted key: YAML value}."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def apply_overrides(config: TrainConfig, overrides: dict) -> tuple[TrainConfig, list[Substitution]]:
    """`config` with the dotted `overrides` set, and a record of each."""
    raw, records = copy.deepcopy(config.model_dump(mode="json")), []
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):  # an absent (None) section: set it from scratch
                node[key] = {}
            node = node[key]
        records.append(Substitution(dotted, node.get(leaf), value, "--set on the command line"))
        node[leaf] = value
    try:
        return TrainConfig.model_validate(raw), records
    except ValueError as error:
        raise ConfigError(f"--set: {error}") from None


def rehearse(args: argparse.Namespace) -> Report:
    """Run the rehearsal `args` describe; returns its report (the run's outcome included)."""
    gpu_config = load_config(args.config)
    workdir = Path(args.workdir) if args.workdir else Path(gpu_config.logging.runs_dir) / "rehearsal" / Path(args.config).stem
    choices = read_model_choices(Path(gpu_config.model.path))
    config, substituted = rehearsal_config(gpu_config, workdir.resolve(), RehearsalSize(steps=args.steps), choices)
    config, overridden = apply_overrides(config, parse_overrides(args.overrides))
    substituted += overridden
    specs = node_specs(config, args.nodes)
    roles = "; ".join(f"node {i}: {', '.join(s.roles)}" for i, s in enumerate(specs))
    substituted.append(Substitution("ray.address", config.ray.address, f"local cluster, {args.nodes} node(s)",
                                    f"the rehearsal's own Ray cluster on this machine ({roles})"))
    path = workdir / "config.yaml"
    report = Report(str(args.config), str(path), args.nodes, config.steps, substituted)
    print(format_substitutions(report), flush=True)
    if build_tiny_model(workdir / "model", choices):
        print(f"built the tiny model in {workdir / 'model'}", flush=True)
    started = time.time()
    report.worker_logs = str(workdir / "ray-logs")
    with local_cluster(specs, workdir / "ray-logs") as address:
        raw = config.model_dump(mode="json")
        raw["ray"]["address"] = address
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        report.exit_code = _train(path, args.resume)
    store = RunStore(config.logging.runs_dir)
    run = _the_run(store, config.name, args.resume, started)
    if run is not None:
        report.run_id, report.status = run.id, run.status
        report.per_step, report.events = read_run(store, run)
    report.agreement = agreements(config, report.per_step)
    return report


TRAINER_RAISED = 4
"""Exit code when the trainer raised instead of returning one (its code for a failed run)."""


def _train(path: Path, resume: str | None) -> int:
    """The trainer's own entry point on the written config; its exit code (an error it raised is
    printed and counts as a failed run, so the report is still written)."""
    import ray

    from rl.run.train import main as train_main

    try:
        return train_main(["--config", str(path), *(["--resume", resume] if resume else [])])
    except Exception:
        traceback.print_exc()
        return TRAINER_RAISED
    finally:
        ray.shutdown()


def _the_run(store: RunStore, name: str, resume: str | None, started: float):
    """The run this rehearsal created or resumed (None if the trainer never got to create one)."""
    runs = [r for r in store.list_runs() if r.name == name]
    if resume not in (None, "latest"):
        runs = [r for r in runs if r.id == resume]
    elif resume is None:
        runs = [r for r in runs if r.started_at >= started - 1]
    return runs[0] if runs else None  # newest first


def resume_hint(args: argparse.Namespace, run_id: str) -> str:
    """The command that continues the rehearsal run `run_id` (same config, folder, nodes and --set)."""
    words = ["blip3o-rl", "rehearse", "--config", str(args.config), "--steps", str(args.steps), "--nodes",
             str(args.nodes), *(["--workdir", str(args.workdir)] if args.workdir else []), "--resume", run_id]
    for item in args.overrides:
        words += ["--set", item]
    return shlex.join(words)


def main(args: argparse.Namespace) -> int:
    try:
        report = rehearse(args)
    except (ConfigError, FileExistsError) as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        return 2
    print(format_outcome(report), flush=True)
    if report.run_id and report.status in ("stopped", "failed"):
        print(f"continue it with: {resume_hint(args, report.run_id)}", flush=True)
    if args.out:
        report.write(Path(args.out))
        print(f"wrote {args.out}", flush=True)
    if report.exit_code not in (0, None):
        return report.exit_code
    return 0 if not report.problems else 1
