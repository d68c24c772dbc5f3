"""The GRPO run: `python -m rl.run.train --config FILE [--resume [RUN_ID]]` (also `blip3o-rl train`).

One step, sync schedule:
    prompts -> rollouts (vLLM) -> images (decoder) -> rewards (reward API)   [rl/run/pipeline.py]
            -> group advantages -> learner update (DeepSpeed) -> publish weights v+1 to every worker
                                                                   [rl/run/policies.py, rl/run/fleet.py]
Async schedule: step t+1's rollouts are launched before step t's update, so sampling overlaps
training; they are one version stale, and the learner corrects for it with truncated importance
sampling. The step after a checkpoint is launched only after the update (as in sync), so a
checkpoint never has rollouts in flight and `--resume` replays exactly.

Everything a step produced is recorded in the run store (rl/run_store.py, rl/run/step_report.py);
the dashboard reads it.

Faults (see rl/run/pipeline.py): a rollout or decoder worker that dies is restarted by Ray, one that
hangs is killed and restarted; before the chunk it held is redone, every worker is given the
learner's current weights and must report serving that version. A reward service that stays down
past `rewards.outage_budget_s`, SIGTERM (`ray job stop`) and Ctrl-C stop the run cleanly: the
in-flight step is abandoned (its prompts go back to the sampler), the last finished step is
checkpointed, the run is marked stopped, and `--resume` continues it. Any other error during the
loop (a stage's own error such as an out-of-memory decoder or a 4xx from the reward API, a learner
error) stops it the same way, marked failed (exit 4). Every fault is an event in the run store.

Two policies (config `train`), each a `TrainedPolicy` (rl/run/policies.py): the AR policy (GRPO on the
image tokens, `learner`) and SANA's transformer (Flow-GRPO, `diffusion_learner`). With the diffusion
learner every step is decoded with the SDE sampler, whose per-step log-probs stay in the object store
for it; after the step's rewards, each trained policy updates from its own advantages (its own
optimizer, lr and version) and publishes to its workers: the AR weights to every worker, the
transformer to the decoders. `schedule.alternate` updates one of the two per step, in turn.

Reward hacking (config `guard`, rl/guard/): every step logs its images' statistics; the guard sees
each step's metrics once (`_guard_step`) and a firing warns, stops the run the same clean way
(exit 5), or rolls back to a checkpoint and goes on (rl/guard/rollback.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from pathlib import Path

from policy.model_dir import CheckpointNotFoundError, resolve_model_dir
from rl.prompts.edit_synthetic import ensure_synthetic_eval, ensure_synthetic_sources
from rl.prompts.generators import PromptSetError
from rl.prompts.sources import EvalPromptOverlapError
from rl.run.config import ConfigError, TrainConfig, check_eval_not_trained, load_config
from rl.run.lifecycle import RunStopped
from rl.run.placement import LOCAL_CLUSTER_SYSTEM_CONFIG
from rl.run.reward_checks import check_rows_fit_config
from rl.run.trainer import Trainer
from rl.run.wandb_logger import attach_wandb

LAUNCHER_ENV = "BLIP3O_RL_LAUNCHER"
"""How the user started the driver, when it is not the command line it sees: deploy/ray_job.sh sets
it to `deploy/ray_job.sh` in its job's entrypoint (the driver runs `python -m rl.run.train` there)."""
RAY_JOB_SCRIPT = "deploy/ray_job.sh"


def resume_command(launcher: str, config: str, run_id: str, steps: int | None = None,
                   runs_dir: str | None = None) -> str:
    """The command that continues run `run_id`, in the form the user launched it: `launcher` is the
    command (`blip3o-rl train`, `python -m rl.run.train`) or deploy/ray_job.sh, which takes the config
    first and passes only --resume and --steps on. `steps` / `runs_dir`: the overrides the run was
    started with (without them a resume would train to another length, or not find the run)."""
    if launcher == RAY_JOB_SCRIPT:
        words = [launcher, config, "--resume", run_id]
    else:
        words = [*launcher.split(), "--config", config, "--resume", run_id]
        words += ["--runs-dir", runs_dir] if runs_dir else []
    words += ["--steps", str(steps)] if steps else []
    return shlex.join(words)


def ensure_model(config: TrainConfig) -> None:
    """Build the tiny random models a CPU config asks for, where they do not exist yet."""
    path = Path(config.model.path)
    if config.model.make_tiny and not path.exists():
        from policy.tiny import PRESETS, make_tiny

        print(f"building tiny '{config.model.make_tiny}' model at {path}", flush=True)
        make_tiny(path, PRESETS[config.model.make_tiny])
    detector = Path(config.rewards.server.geneval.detector)
    if config.rewards.make_tiny_geneval and not detector.exists():
        from rewards.tiny import make_tiny_geneval_models

        print(f"building tiny GenEval models in {detector.parent}", flush=True)
        make_tiny_geneval_models(detector.parent)


def init_ray(config: TrainConfig) -> Path | None:
    """Start (or join) Ray with a quiet console: the workers' output (vLLM, Serve replicas, DeepSpeed,
    tracebacks) stays in the files of Ray's session log folder instead of being forwarded to this
    console, where it buried the progress lines; driver-side Ray and Serve logs show warnings and
    errors only. Returns that folder (None when Ray does not say, e.g. through Ray Client)."""
    import logging

    import ray

    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, **quiet)
    else:
        context = ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False,
                           _system_config=LOCAL_CLUSTER_SYSTEM_CONFIG, **quiet)
    if config.rewards.service == "serve":
        import ray.serve  # its import sets the "ray.serve" logger to INFO on the console: override after it

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    session_dir = getattr(context, "address_info", {}).get("session_dir")
    return Path(session_dir) / "logs" if session_dir else None


def link_worker_logs(ray_logs: Path | None, run_dir: Path) -> str:
    """Link Ray's session log folder into `<run_dir>/logs/` (one link per session: a resumed run
    keeps the earlier ones) and say where it is, for the console."""
    if ray_logs is None:
        return "worker logs: on the Ray cluster (`ray logs`, or the Ray dashboard)"
    link = run_dir / "logs" / ray_logs.parent.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(ray_logs, target_is_directory=True)
    return f"worker logs: {link} (-> {ray_logs}; an exited worker's files move to old/)"


def install_stop_handlers(trainer: Trainer) -> None:
    """SIGTERM (`ray job stop`, Kubernetes) and the first Ctrl-C stop the run cleanly at the next
    safe point; a second Ctrl-C interrupts at once."""

    def stop(signum, frame):
        if trainer.stop_reason and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"{signal.Signals(signum).name}: stopping after a checkpoint (Ctrl-C again to abort)", flush=True)
        trainer.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def parse_args(argv: list[str] | None = None, prog: str = "python -m rl.run.train") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Run GRPO post-training.")
    parser.add_argument("--config", required=True, help="YAML config (see deploy/configs/)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue a run from its last checkpoint: a run id, or the latest run of this name")
    parser.add_argument("--runs-dir", default=None, help="override logging.runs_dir")
    parser.add_argument("--steps", type=int, default=None, help="override steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "python -m rl.run.train") -> int:
    """The driver. `prog`: the command the user typed (`blip3o-rl train` from deploy/cli.py), for the
    usage line and the resume hint; deploy/ray_job.sh names itself through $BLIP3O_RL_LAUNCHER."""
    args = parse_args(argv, prog)
    overrides = {}
    if args.runs_dir:
        overrides["logging.runs_dir"] = args.runs_dir
    if args.steps:
        overrides["steps"] = args.steps
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        ensure_model(config)
        ensure_synthetic_sources(config.data.sources)  # the CPU edit demos' data, where it does not exist yet
        ensure_synthetic_eval(config.eval)
        check_eval_not_trained(config)  # again, with the synthetic sets written
        resolve_model_dir(config.model.path)  # a missing checkpoint is one clear line, before Ray starts
        check_rows_fit_config(config)  # images and prompts the reward service must take (service "serve")
    except (CheckpointNotFoundError, ConfigError, EvalPromptOverlapError, PromptSetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ray_logs = init_ray(config)
    trainer = None
    try:
        trainer = Trainer(config, resume=args.resume)
        install_stop_handlers(trainer)
        print(f"run {trainer.run_id}: steps {trainer.state.step + 1}..{config.steps} of '{config.name}'", flush=True)
        print(link_worker_logs(ray_logs, Path(config.logging.runs_dir) / trainer.run_id), flush=True)
        if config.logging.wandb:  # finished at exit (rl/run/wandb_logger.py)
            wandb_run = attach_wandb(trainer.store, config.logging.wandb, trainer.run_id, config.name,
                                     config.model_dump(mode="json"))
            print(wandb_run.describe(config.logging.wandb.mode), flush=True)
        trainer.start()
        trainer.run()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        if trainer is not None:
            trainer.store.log_event(trainer.run_id, "failed", f"configuration error: {error}")
            trainer.store.finish_run(trainer.run_id, "failed")
        return 2
    except RunStopped as stopped:
        hint = resume_command(os.environ.get(LAUNCHER_ENV) or prog, args.config, trainer.run_id, args.steps,
                              args.runs_dir)
        print(f"{stopped}\ncontinue it with: {hint}", file=sys.stderr, flush=True)
        return stopped.exit_code
    except BaseException as error:
        if trainer is not None:
            status = "stopped" if isinstance(error, KeyboardInterrupt) else "failed"
            trainer.store.log_event(trainer.run_id, "error", f"{type(error).__name__}: {error}")
            trainer.store.finish_run(trainer.run_id, status)
        raise
    finally:
        if trainer is not None:
            trainer.shutdown()
    trainer.store.finish_run(trainer.run_id, "finished")
    print(f"run {trainer.run_id} finished: {config.steps} steps; store {config.logging.runs_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
