"""The GRPO run: `python -m rl.run.train --config FILE [--resume [RUN_ID]]` (also `blip3o-rl train`).

One step, sync schedule:
    prompts -> rollouts (vLLM) -> images (decoder) -> rewards (reward API)   [rl/run/pipeline.py]
            -> group advantages -> learner update (DeepSpeed) -> publish weights v+1 to every worker
Async schedule: step t+1's rollouts are launched before step t's update, so sampling overlaps
training; they are one version stale, and the learner corrects for it with truncated importance
sampling. The step after a checkpoint is launched only after the update (as in sync), so a
checkpoint never has rollouts in flight and `--resume` replays exactly.

Everything a step produced is recorded in the run store (rl/run_store.py); the dashboard reads it.

Faults (see rl/run/pipeline.py): a rollout or decoder worker that dies is restarted by Ray, one that
hangs is killed and restarted; before the chunk it held is redone, every worker is given the
learner's current weights and must report serving that version. A reward service that stays down
past `rewards.outage_budget_s`, SIGTERM (`ray job stop`) and Ctrl-C stop the run cleanly: the
in-flight step is abandoned (its prompts go back to the sampler), the last finished step is
checkpointed, the run is marked stopped, and `--resume` continues it. Any other error during the
loop (a stage's own error such as an out-of-memory decoder or a 4xx from the reward API, a learner
error) stops it the same way, marked failed (exit 4). Every fault is an event in the run store.

Two policies (config `train`): the AR policy (GRPO on the image tokens, `learner`) and SANA's
transformer (Flow-GRPO, `diffusion_learner`; rl/learners/diffusion_learner.py). With the diffusion learner
every step is decoded with the SDE sampler, whose per-step log-probs stay in the object store for
it; after the step's rewards, each trained policy updates from its own advantages (its own
optimizer, lr and version) and publishes to its workers: the AR weights to every worker, the
transformer to the decoders. `schedule.alternate` updates one of the two per step, in turn.

Reward hacking (config `guard`, rl/guard/rules.py): every step logs its images' statistics
(rl/guard/image_stats.py); the guard sees each step's metrics once (`_guard_step`) and a firing warns,
stops the run the same clean way (exit 5), or rolls back to the best-eval checkpoint and goes on.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from policy.model_dir import CheckpointNotFoundError, resolve_model_dir
from rl.checkpoint import CheckpointDir, CheckpointError, TrainerState, policy_digest
from rl.evaluation.harness import ActorWorkers
from rl.evaluation.in_run import InRunEval
from rl.guard.image_stats import step_image_metrics
from rl.guard.rules import Guard, GuardState, Hyperparameters, rollback_hyperparameters
from rl.objectives.grpo import group_advantages
from rl.prompts.sources import PromptSampler, SamplerState
from rl.run.config import ConfigError, TrainConfig, load_config
from rl.run.fleet import Fleet, Versions, WorkerFailedError
from rl.run.pipeline import ChunkFault, PendingStep, RewardOutageError, ScoredStep
from rl.run.placement import check_cluster_fits, role_demands, role_resources
from rl.run.reward_checks import check_reward_service, check_rows_fit_config
from rl.run.wandb_logger import attach_wandb
from rl.run_store import RunStore, SampleRecord
from rl.scoring.reward_mix import reward_notes
from rl.scoring.service import RewardEndpoint, start_reward_service, stop_reward_service

if TYPE_CHECKING:
    from rl.learners.ar_learner import LearnerMetrics
    from rl.learners.diffusion_learner import DiffusionLearnerMetrics


@dataclass
class Updated:
    """The learners' metrics of one step (None: that policy was not updated in this step)."""

    learner: LearnerMetrics | None = None
    diffusion: DiffusionLearnerMetrics | None = None


class StopRequested(Exception):
    """SIGTERM / Ctrl-C asked the run to stop."""


class GuardTripped(Exception):
    """The reward-hacking guard fired with action `stop`, or after its last allowed rollback."""


class RunStopped(Exception):
    """The run stopped before its last step, after checkpointing what it finished."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
        """0: a stop someone asked for (SIGTERM / Ctrl-C); 3: reward outage; 4: a failure (a worker
        that cannot come back, a stage's own error, any other error in the loop); 5: the
        reward-hacking guard stopped it (config `guard`)."""


def one_line(error: BaseException) -> str:
    """`Type: first line` of an error, its cause's if Ray wrapped it (what the run store records)."""
    from ray.exceptions import RayTaskError

    cause = (error.cause or error) if isinstance(error, RayTaskError) else error
    text = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{type(cause).__name__}: {text}" if not text.startswith(type(cause).__name__) else text


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of a step: distinct per step, reproducible per run (rows add their index)."""
    return (seed * 1_000_003 + step * 65_537) % (2**31 - 1)


def step_metrics(scored: ScoredStep, learner, diffusion, versions: Versions, staleness: int,
                 timings: dict[str, float]) -> dict[str, float]:
    """The step's numbers under the run store's key scheme (see rl/run_store.py). `learner` /
    `diffusion`: the AR / diffusion learner's metrics of this step (None: that policy was not updated)."""
    rewards = scored.reward_tensor()
    metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0}
    per_component: dict[str, list[float]] = {}  # reward/<name>: each component's raw mean over the rows it scored
    for r in scored.rewards:
        for name, value in r.component_rewards().items():
            per_component.setdefault(name, []).append(value)
    for name in sorted(per_component):
        metrics[f"reward/{name}"] = float(np.mean(per_component[name]))
    ocr = [r.reward for r in scored.rewards if r.task == "ocr" and not math.isnan(r.reward)]  # NaN: no OCR in the mix
    if ocr:
        metrics["ocr/exact"] = float(np.mean([value == 1.0 for value in ocr]))
    tags = sorted({r.geneval_tag for r in scored.rewards if r.task == "geneval" and r.geneval_correct is not None})
    for tag in tags:
        metrics[f"geneval/{tag}"] = float(np.mean([bool(r.geneval_correct) for r in scored.rewards if r.geneval_tag == tag]))
    if learner is not None and learner.optimizer_steps > 0:  # no update (every group zero-signal and
        metrics.update({  # filtered): these were never measured, so they stay absent (a gap on the dashboard), not 0
            **({"policy/kl": learner.kl} if not math.isnan(learner.kl) else {}),  # NaN: no reference (beta 0)
            "policy/entropy": learner.entropy,
            "policy/clip_fraction": learner.clip_low_frac + learner.clip_high_frac,
            "policy/clip_low": learner.clip_low_frac,
            "policy/clip_high": learner.clip_high_frac,
            "policy/loss": learner.loss,
            "policy/grad_norm": learner.grad_norm,
            "policy/ratio_max": learner.ratio_max,
            "policy/lr": learner.lr,
        })
    if diffusion is not None and diffusion.optimizer_steps > 0:
        metrics.update({
            **({"diffusion/kl": diffusion.kl} if not math.isnan(diffusion.kl) else {}),  # NaN: beta 0
            **({"diffusion/logprob_diff": diffusion.logprob_max_abs_diff}
               if not math.isnan(diffusion.logprob_max_abs_diff) else {}),
            "diffusion/clip_fraction": diffusion.clip_fraction,
            "diffusion/loss": diffusion.loss,
            "diffusion/policy_loss": diffusion.policy_loss,
            "diffusion/grad_norm": diffusion.grad_norm,
            "diffusion/ratio_max": diffusion.ratio_max,
            "diffusion/ratio_min": diffusion.ratio_min,
            "diffusion/lr": diffusion.lr,
        })
    if diffusion is not None:
        metrics["diffusion/zero_signal_share"] = diffusion.zero_signal_share
    if versions.decoder or diffusion is not None:
        metrics["diffusion/version"] = float(versions.decoder)
    metrics.update({
        "policy/version": float(versions.policy),
        "policy/staleness": float(staleness),
        "groups/zero_signal_share": (learner or diffusion).zero_signal_share,
        "rollout/rows": float(len(rewards)),
    })
    metrics.update({f"time/{stage}": seconds for stage, seconds in timings.items()})
    metrics["throughput/images_per_s"] = len(rewards) / max(timings["step"], 1e-9)
    return metrics


def sample_records(scored: ScoredStep, count: int, group_size: int) -> list[SampleRecord]:
    """`count` samples spread evenly over the step's rows, with their reward breakdown."""
    rows = np.unique(np.linspace(0, len(scored.rewards) - 1, num=min(count, len(scored.rewards))).round().astype(int))
    rows = rows.tolist()
    images = scored.sample_images(rows)  # only these rows' images travel to the driver
    return [
        SampleRecord(
            prompt=scored.items[row // group_size].caption,
            image=image,
            reward=float(scored.mixed.total[row]),  # what GRPO trained on; the components hold each reward
            components=scored.rewards[row].components(),
        )
        for row, image in zip(rows, images)
    ]


def progress_line(step: int, steps: int, metrics: dict[str, float]) -> str:
    stages = " ".join(f"{name} {metrics[f'time/{name}']:.2f}s" for name in ("collect", "update", "sync"))
    busy = " ".join(f"{name} {metrics[f'time/{name}']:.2f}" for name in ("rollout", "decode", "reward"))
    if "policy/kl" in metrics:
        kl = f"{metrics['policy/kl']:.4f}"
    else:
        kl = "- (no update)" if "policy/loss" not in metrics else "- (beta 0)"
    diffusion = ""
    if "diffusion/version" in metrics:
        if "diffusion/kl" in metrics:
            diffusion = f" | decoder kl {metrics['diffusion/kl']:.2e}"
        elif "diffusion/loss" in metrics:
            diffusion = " | decoder kl - (beta 0)"
        diffusion += f" | decoder v{int(metrics['diffusion/version'])}"
    return (
        f"step {step}/{steps} | reward {metrics['reward/mean']:.3f} | kl {kl} | "
        f"zero-signal {metrics['groups/zero_signal_share']:.0%} | v{int(metrics['policy/version'])}{diffusion} | "
        f"{stages} (busy: {busy}) | step {metrics['time/step']:.2f}s"
    )


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
        context = ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, **quiet)
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
    return f"worker logs: {link} (-> {ray_logs})"


class Trainer:
    """The loop of one run: its store, checkpoints, prompt sampler and reward service; the workers
    and the learner are its `Fleet` (rl/run/fleet.py), started by `start`."""

    def __init__(self, config: TrainConfig, resume: str | None = None):
        self.config = config
        self.store = RunStore(config.logging.runs_dir)
        self.run_id, self.state = self._open_run(resume)
        self.checkpoints = CheckpointDir(Path(config.logging.runs_dir) / "checkpoints" / self.run_id,
                                         keep_last=config.checkpoint.keep_last)
        self.sampler = PromptSampler(config.data.sources, config.seed, self.state.sampler)
        self.evaluation = None if config.eval is None or config.eval.every == 0 else InRunEval(
            config.eval, config.rollout.engine.sampling, config.schedule.chunk_prompts * config.data.group_size,
            Path(config.logging.runs_dir) / self.run_id / "eval")
        self.checkpointed_step = self.state.step
        self.learner_ahead = False
        self.stop_reason: str | None = None
        self.reward_versions: dict[str, str] = {}
        """Reward component -> the scorer version last recorded (empty at a start or resume: all are recorded again)."""
        self.guard = self._open_guard()

    def _open_guard(self) -> Guard | None:
        """The reward-hacking guard (config `guard`); a resumed run's continues from `guard.json` (its
        rollback count kept, what it saw after the resumed step dropped)."""
        if self.config.guard is None:
            return None
        saved = self.checkpoints.root / "guard.json"
        if self.state.step == 0 or not saved.is_file():
            return Guard(self.config.guard)
        try:
            guard = Guard(self.config.guard, GuardState.model_validate_json(saved.read_text()))
        except ValueError as error:
            raise ConfigError(f"{saved} cannot be resumed with this config's guard: {error}") from None
        guard.forget_after(self.state.step)
        return guard

    def _save_guard_state(self) -> None:
        """Write the guard's state beside the checkpoints (temp file + rename)."""
        if self.guard is not None:
            tmp = self.checkpoints.root / "guard.json.tmp"
            tmp.write_text(self.guard.state().model_dump_json())
            os.replace(tmp, self.checkpoints.root / "guard.json")

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at the next safe point (a signal handler calls this)."""
        self.stop_reason = reason

    def _open_run(self, resume: str | None) -> tuple[str, TrainerState]:
        if resume is None:
            run_id = self.store.create_run(self.config.name, self.config.model_dump(mode="json"))
            fresh = SamplerState(cursors=[0] * len(self.config.data.sources))
            learner, diffusion = self.config.learner, self.config.diffusion_learner
            return run_id, TrainerState(0, learner.initial_version if learner else 0, run_id, fresh,
                                        diffusion.initial_version if diffusion else 0)
        run_id = resume if resume != "latest" else self._latest_run_id()
        try:
            checkpoint = CheckpointDir(Path(self.config.logging.runs_dir) / "checkpoints" / run_id).latest()
        except CheckpointError as error:
            raise ConfigError(f"run '{run_id}' cannot be resumed: {error}") from None
        if checkpoint is None:
            raise ConfigError(f"run '{run_id}' has no complete checkpoint to resume from")
        state = CheckpointDir(checkpoint.parent).load_state(checkpoint)
        self.resume_from = checkpoint
        self.store.resume_run(run_id, state.step)
        return run_id, state

    @property
    def versions(self) -> Versions:
        """The weight versions of the last finished step: what every worker must serve."""
        return Versions(self.state.policy_version, self.state.decoder_version)

    def _updates(self, step: int) -> tuple[str, ...]:
        """The policies updated after `step` (config `train`; `schedule.alternate`: the AR policy
        after odd steps, the decoder after even ones)."""
        if self.config.schedule.alternate:
            return ("ar",) if step % 2 == 1 else ("diffusion",)
        return tuple(self.config.train)

    def _latest_run_id(self) -> str:
        runs = [r for r in self.store.list_runs() if r.name == self.config.name]
        if not runs:
            raise ConfigError(f"no earlier run named '{self.config.name}' in {self.config.logging.runs_dir} to resume")
        return max(runs, key=lambda r: r.started_at).id

    # ----- setup ------------------------------------------------------------------------------

    def start(self) -> None:
        import ray

        config = self.config
        t0 = time.perf_counter()
        # before anything starts: the cluster must hold every role's devices at once (rl/run/placement.py)
        check_cluster_fits(role_demands(config), ray.cluster_resources())
        self.endpoint: RewardEndpoint = start_reward_service(config.rewards, role_resources(config, "reward"))
        # before any model loads: the service must run every reward the prompts need, and take our images
        self.endpoint = check_reward_service(self.endpoint, config)
        self.fleet = Fleet.start(config, self.versions, self._log_event)
        try:  # every learner node writes its part of a checkpoint: the driver must see their files
            for group in self.fleet.learners:
                group.prove_shared_directory(str(self.checkpoints.root))
        except CheckpointError as error:
            raise ConfigError(str(error)) from None
        if self.state.step > 0:
            self._load_learners(self.resume_from)
            if self.guard is not None and self.guard.rollbacks:  # the lr and beta of the rollbacks so far
                self._set_rollback_hyperparameters(self.guard.rollbacks)
            t_publish = time.perf_counter()
            for group in self.fleet.learners:  # workers start from the checkpoint's weights
                group.publish_weights()
            self.store.log_event(self.run_id, "resume", f"weights {self.fleet.describe(self.versions)} published in "
                                                        f"{time.perf_counter() - t_publish:.2f} s")
        self.fleet.check_versions(self.versions, config.faults.restart_timeout_s)  # engines load first
        print(f"run {self.run_id}: workers, learner and reward API ({self.endpoint.url}) up in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)

    def _load_learners(self, checkpoint: Path, versions: Versions | None = None) -> None:
        """Restore each learner from `checkpoint` (a resume; a rollback serves it as `versions`)."""
        if self.fleet.learner is not None:
            self.fleet.learner.load_checkpoint(str(checkpoint / "learner"), versions and versions.policy)
        if self.fleet.diffusion_learner is not None:
            self.fleet.diffusion_learner.load_checkpoint(str(checkpoint / "diffusion_learner"),
                                                         versions and versions.decoder)

    def _set_rollback_hyperparameters(self, rollbacks: int) -> Hyperparameters:
        """Every learner's lr (and the AR policy's beta) after `rollbacks` rollbacks."""
        config = self.config
        beta = config.learner.grpo.beta if config.learner is not None else 0.0
        hyper = rollback_hyperparameters(config.guard.rollback, beta, rollbacks)
        if self.fleet.learner is not None:
            self.fleet.learner.set_hyperparameters(hyper.lr_scale, hyper.beta)
        if self.fleet.diffusion_learner is not None:  # its own beta (flow.beta) is kept
            self.fleet.diffusion_learner.set_lr_scale(hyper.lr_scale)
        return hyper

    def _note_rewards(self, step: int, scored: ScoredStep) -> None:
        """The step's reward events (rl/scoring/reward_mix.py): each scorer's version when first seen and when
        it changes (a reward model replaced mid-run), and a warning for a reward constant over the step."""
        for note in reward_notes(step, scored.mixed, self.endpoint.mix, self.reward_versions):
            self.store.log_event(self.run_id, note.kind, note.message)
            if note.console:
                print(f"warning: {note.message}" if note.kind == "reward_constant" else note.message, flush=True)

    def _log_event(self, kind: str, message: str) -> None:
        self.store.log_event(self.run_id, kind, message)

    def _handle_faults(self, pending: PendingStep, faults: list[ChunkFault]) -> None:
        """Record the faults, restart hung workers, bring every worker to the current weights once,
        then redo the chunks."""
        step = self.state.step + 1
        for fault in (f for f in faults if f.kind == "resample"):  # not a failure: no recovery needed
            self.store.log_event(self.run_id, "resampled", f"step {step}: {fault.describe()}")
            print(f"resample: {fault.describe()}", flush=True)
        failures = [f for f in faults if f.kind != "resample"]
        names = []
        for fault in failures:
            name = self.fleet.name(fault.actor) if fault.actor is not None else "reward task"
            names.append(f"{name} {fault.kind}")
            self.store.log_event(self.run_id, "worker_fault", f"step {step}: {name}: {fault.describe()}")
            print(f"fault: {name}: {fault.describe()}", flush=True)
            if fault.attempts >= self.config.faults.max_chunk_attempts:
                raise WorkerFailedError(f"{fault.describe()}: giving up after faults.max_chunk_attempts = "
                                        f"{self.config.faults.max_chunk_attempts}")
        for actor in {f.actor._actor_id.hex(): f.actor for f in failures if f.kind == "hung" and f.actor}.values():
            self.fleet.restart(actor)
        if failures:
            self.fleet.recover(self.versions, f"step {step}: {', '.join(sorted(set(names)))}")
            pending.restart_stage_clocks()
        for fault in faults:
            pending.redo(fault)

    def shutdown(self) -> None:
        if hasattr(self, "fleet"):
            self.fleet.shutdown()
        if hasattr(self, "endpoint"):
            stop_reward_service(self.config.rewards)

    # ----- the loop ---------------------------------------------------------------------------

    def _launch(self, step: int, again: PendingStep | None = None) -> PendingStep:
        """Submit a step's dataflow; `again`: resample that step's prompts with the current weights."""
        config = self.config
        if again is None:
            before = copy.deepcopy(self.sampler.state)
            items = self.sampler.next_batch(config.data.prompts_per_step)
        else:
            before, items = again.sampler_state, again.items
        sde = config.diffusion_learner.sampling if config.diffusion_learner is not None else None
        return PendingStep(items, config.data.group_size, step_seed(config.seed, step), self.fleet.rollout_actors,
                           self.fleet.decoder_actors, self.endpoint, config.schedule.chunk_prompts,
                           self.state.policy_version, before, sde=sde, decoder_version=self.state.decoder_version)

    def _collect(self, pending: PendingStep) -> ScoredStep:
        """Wait for the step, redoing the chunks of dead, hung or stale workers (and resampling
        those whose tokens a publish overtook). A stage's own error is raised (StageError)."""
        while not pending.done:
            if self.stop_reason:
                raise StopRequested(self.stop_reason)
            faults = pending.poll(self.config.schedule.stage_timeout_s)
            if faults:
                self._handle_faults(pending, faults)
        scored = pending.result()
        if scored.retried_requests:
            self.store.log_event(self.run_id, "reward_retry",
                                 f"step {self.state.step + 1}: {len(scored.retried_requests)} reward requests failed "
                                 f"and were retried; first: {scored.retried_requests[0][:200]}")
        return scored

    def _is_checkpoint_step(self, step: int) -> bool:
        return step % self.config.checkpoint.every == 0 or step == self.config.steps

    def _is_eval_step(self, step: int) -> bool:
        return self.evaluation is not None and self.config.eval.due(step, self.config.steps)

    def _maybe_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """After an eval step's update (config `eval`, rl/evaluation/in_run.py): score the weights the workers
        now serve on the evaluation prompts. Its metrics join the step's (`metrics` is updated and the
        step logged again), its images the eval gallery; a score above the best so far checkpoints this
        step (unless already done) and pins it as the best (`CheckpointDir.mark_best`)."""
        from rewards.client import RewardServerError

        if not self._is_eval_step(step):
            return

        def stop_if_asked(_progress) -> None:  # SIGTERM / Ctrl-C: a long eval stops between its chunks
            if self.stop_reason:
                raise StopRequested(self.stop_reason)

        workers = ActorWorkers(self.fleet.rollout_actors[0], self.fleet.decoder_actors[0],
                               timeout_s=self.config.schedule.stage_timeout_s)
        try:
            result = self.evaluation.run(workers, self.endpoint, step, f"run {self.run_id}", progress=stop_if_asked)
        except RewardServerError as outage:  # the same clean stop as an outage during a step
            raise RewardOutageError(f"during the eval of step {step}: {outage}") from None
        metrics.update(result.metrics)
        self.store.log_metrics(self.run_id, step, metrics)
        self.store.log_samples(self.run_id, step, result.gallery, kind="eval")
        best = self.checkpoints.best_record()
        line = result.describe(self.config.steps)
        if best is None or result.score > best.score:
            if self.checkpointed_step < step:
                self.save_checkpoint()
            self.checkpoints.mark_best(step, result.score)
            line += f" | new best (checkpoint step {step} kept)"
        else:
            line += f" | best {best.score:.4f} at step {best.step}"
        self.store.log_event(self.run_id, "eval", line)
        print(line, flush=True)

    def run(self) -> None:
        """Train until `config.steps`. A stop request, a reward outage or any error checkpoints the
        finished steps, marks the run stopped or failed and raises RunStopped."""
        config = self.config
        first = self.state.step + 1
        pending = self._launch(first) if first <= config.steps else None
        try:
            while (step := self.state.step + 1) <= config.steps:  # a guard rollback moves self.state back
                if self.stop_reason:
                    raise StopRequested(self.stop_reason)
                t_step = time.perf_counter()
                scored = self._collect(pending)
                staleness = self.state.policy_version - scored.batch.policy_version
                while staleness > config.schedule.max_staleness:  # never train on it: sample again
                    self.store.log_event(self.run_id, "stale_rollouts", f"step {step}: rollouts of "
                                         f"v{scored.batch.policy_version} are {staleness} versions behind; resampled")
                    pending = self._launch(step, again=pending)
                    scored = self._collect(pending)
                    staleness = self.state.policy_version - scored.batch.policy_version
                overlap = (config.schedule.mode == "async" and step < config.steps and not self._is_checkpoint_step(step)
                           and not self._is_eval_step(step))  # an eval step may become a (best) checkpoint
                pending = self._launch(step + 1) if overlap else None  # sampled with the current weights
                self.learner_ahead = True  # until the step is recorded, a learner is past self.state
                updated, timings = self._update(step, scored)
                versions = Versions(updated.learner.policy_version if updated.learner else self.state.policy_version,
                                    updated.diffusion.policy_version if updated.diffusion else self.state.decoder_version)
                syncs = self._publish(step, versions, updated, timings)
                self.state.step = step
                self.state.policy_version, self.state.decoder_version = versions.policy, versions.decoder
                self.learner_ahead = False
                timings.update(scored.timings, step=time.perf_counter() - t_step)
                metrics = step_metrics(scored, updated.learner, updated.diffusion, versions, staleness, timings)
                metrics.update(syncs)
                metrics.update(step_image_metrics(scored))  # images/*: what the guard watches
                self.store.log_metrics(self.run_id, step, metrics)
                self.store.log_samples(self.run_id, step, sample_records(scored, config.logging.samples_per_step,
                                                                         config.data.group_size))
                print(progress_line(step, config.steps, metrics), flush=True)
                self._note_rewards(step, scored)
                self._maybe_evaluate(step, metrics)
                if self._guard_step(step, metrics):  # rolled back to a checkpoint: train on from there
                    pending = self._launch(self.state.step + 1)
                    continue
                if self._is_checkpoint_step(step) and self.checkpointed_step < step:  # a new best eval saved it
                    self.save_checkpoint()
                if pending is None and step < config.steps:
                    pending = self._launch(step + 1)
        except StopRequested as stop:
            raise self._stop(pending, f"stop requested ({stop})", "stopped", exit_code=0) from None
        except RewardOutageError as outage:
            budget = config.rewards.outage_budget_s
            raise self._stop(pending, f"reward service down for longer than rewards.outage_budget_s ({budget:.0f} s): "
                                      f"{outage}", "stopped", exit_code=3) from None
        except WorkerFailedError as failure:
            raise self._stop(pending, f"worker failure: {failure}", "failed", exit_code=4) from None
        except GuardTripped as trip:
            raise self._stop(pending, f"reward-hacking guard: {trip}", "stopped", exit_code=5) from None
        except Exception as error:  # a stage's own error (StageError), a learner error, a bug
            traceback.print_exc()  # the whole story for whoever debugs it; the store keeps one line
            raise self._stop(pending, f"error: {one_line(error)}", "failed", exit_code=4) from None
        # a finished run leaves every worker on its last weights
        self.fleet.check_versions(self.versions, config.faults.call_timeout_s)

    def _update(self, step: int, scored: ScoredStep) -> tuple[Updated, dict[str, float]]:
        """Each policy due this step learns from the step's rewards with its own advantages; the
        diffusion learner reads the step's SDE rollouts straight from the object store."""
        config, updated, timings = self.config, Updated(), {"update": 0.0}
        rewards, groups = scored.reward_tensor(), scored.batch.group_index
        for policy in self._updates(step):
            t0 = time.perf_counter()
            if policy == "ar":
                advantages = group_advantages(rewards, groups, config.learner.grpo)
                updated.learner = self.fleet.learner.train_step(scored.batch, advantages)
            else:
                advantages = group_advantages(rewards, groups, config.diffusion_learner.flow)
                updated.diffusion = self.fleet.diffusion_learner.train_step(scored.diffusion_rollout(), advantages)
                timings["update_diffusion"] = time.perf_counter() - t0
            timings["update"] += time.perf_counter() - t0
        return updated, timings

    def _publish(self, step: int, versions: Versions, updated: Updated, timings: dict[str, float]) -> dict[str, float]:
        """Publish every updated policy (after all updates: a recovery on the way publishes every
        stream at `versions`); adds the sync times to `timings`, returns the sync metrics."""
        metrics, timings["sync"] = {}, 0.0
        for name, metrics_of, publish in (("", updated.learner, self.fleet.publish),
                                          ("_diffusion", updated.diffusion, self.fleet.publish_decoder)):
            if metrics_of is None:
                continue
            t0 = time.perf_counter()
            report = publish(versions, step)  # None: recovered on the way (no clean measurement)
            seconds = time.perf_counter() - t0
            timings["sync"] += seconds
            if name:
                timings[f"sync{name}"] = seconds
            if report is not None:
                metrics.update({f"sync{name}/seconds": report.seconds, f"sync{name}/gb_per_s": report.gb_per_s})
        return metrics

    def _stop(self, pending: PendingStep | None, reason: str, status: str, exit_code: int) -> RunStopped:
        """Abandon the in-flight step, checkpoint the finished ones, mark the run stopped / failed."""
        if pending is not None:  # its prompts were drawn but never trained on: give them back
            self.sampler.state = self.state.sampler = pending.sampler_state
        if self.learner_ahead:  # its weights are past the last recorded step: not a consistent checkpoint
            where = (f"no new checkpoint (it came during step {self.state.step + 1}'s update), "
                     f"the last one is step {self.checkpointed_step}")
        elif self.state.step > self.checkpointed_step:
            try:
                where = f"checkpoint {self.save_checkpoint()}"
            except Exception as error:  # e.g. the learner is what failed: say so, still mark the run
                where = (f"saving the checkpoint of step {self.state.step} failed ({one_line(error)}), "
                         f"the last one is step {self.checkpointed_step}")
        elif self.state.step > 0:
            where = f"checkpoint of step {self.state.step} already saved"
        else:
            where = "no step finished, nothing to checkpoint"
        message = f"run {self.run_id} {status} after step {self.state.step}: {reason}; {where}"
        self.store.log_event(self.run_id, status, message)
        self.store.finish_run(self.run_id, status)
        return RunStopped(message, exit_code)

    def save_checkpoint(self) -> Path:
        """The trained policies' learners (`learner/`, `diffusion_learner/`) and exports (`policy/`:
        what vLLM loads; `diffusion_policy/`: the transformer as a diffusers directory), the driver's state."""
        t0 = time.perf_counter()
        tmp = self.checkpoints.begin(self.state.step)
        learner, diffusion = self.fleet.learner, self.fleet.diffusion_learner
        if learner is not None:
            learner.save_checkpoint(str(tmp / "learner"))
            learner.export_policy(str(tmp / "policy"))
        if diffusion is not None:
            diffusion.save_checkpoint(str(tmp / "diffusion_learner"))
            diffusion.export_policy(str(tmp / "diffusion_policy"))
        config = self.config
        path = self.checkpoints.commit(tmp, self.state, learner_ranks=config.learner.world_size if learner else 0,
                                       diffusion_ranks=config.diffusion_learner.world_size if diffusion else 0)
        self.checkpointed_step = self.state.step
        self._save_guard_state()
        print(f"checkpoint {path} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return path

    # ----- the reward-hacking guard (rl/guard/rules.py) ----------------------------------------------

    def _guard_step(self, step: int, metrics: dict[str, float]) -> bool:
        """Show the step's metrics (eval included) to the guard. Each firing is a `guard` event and a
        console line; then the action: warn (nothing more), stop (GuardTripped: the clean stop, exit
        5) or rollback (True: the loop trains on from the restored checkpoint's step)."""
        if self.guard is None:
            return False
        firings = self.guard.observe(step, metrics)
        if self.checkpointed_step == step:  # an eval step saved its checkpoint before the guard saw it
            self._save_guard_state()
        for firing in firings:
            self.store.log_event(self.run_id, "guard", firing.describe())
            print(f"guard: {firing.describe()}", flush=True)
        action, limit = self.config.guard.action, self.config.guard.rollback.max_rollbacks
        if not firings or action == "warn":
            return False
        if action == "stop":
            raise GuardTripped(firings[0].describe())
        if self.guard.rollbacks >= limit:
            raise GuardTripped(f"{firings[0].describe()}; guard.rollback.max_rollbacks ({limit}) already taken")
        self._rollback(step, firings[0].describe())
        return True

    def _rollback(self, step: int, why: str) -> None:
        """Restore the best-eval checkpoint (else the latest) exactly, as a resume would (weights,
        optimizer, lr schedule, sampler, step), under a new version number (workers only take newer
        ones); then train on with the rollback's lr and beta. The later steps are redone: their
        checkpoints and store records are dropped."""
        config = self.config
        target = self.checkpoints.best() or self.checkpoints.latest()
        if target is None:
            raise GuardTripped(f"{why}; no checkpoint to roll back to yet")
        restored = self.checkpoints.load_state(target)
        learner, diffusion = self.fleet.learner, self.fleet.diffusion_learner
        versions = Versions(self.state.policy_version + (learner is not None),
                            self.state.decoder_version + (diffusion is not None))
        self.learner_ahead = True  # until self.state is the checkpoint's, a stop must not checkpoint
        self._load_learners(target, versions)
        digests = []
        for group, export in ((learner, "policy"), (diffusion, "diffusion_policy")):
            if group is None:
                continue
            digest, expected = group.weights_digest(), policy_digest(target / export)
            if digest != expected:
                raise RuntimeError(f"rollback to {target.name}: the {export} learner's weights (sha256 {digest[:16]}) "
                                   f"differ from the checkpoint's export ({expected[:16]})")
            digests.append(f"{export} sha256 {digest}")
        rollbacks = self.guard.count_rollback()
        hyper = self._set_rollback_hyperparameters(rollbacks)
        self.state = TrainerState(restored.step, versions.policy, self.run_id, copy.deepcopy(restored.sampler),
                                  versions.decoder)
        self.sampler.state = copy.deepcopy(restored.sampler)
        self.learner_ahead = False
        self.guard.forget_after(restored.step)
        self.checkpoints.discard_after(restored.step)
        self.checkpointed_step = restored.step
        self._save_guard_state()
        self.store.resume_run(self.run_id, restored.step)
        if learner is not None:
            self.fleet.publish(versions, step)
        if diffusion is not None:
            self.fleet.publish_decoder(versions, step)
        self.fleet.check_versions(versions, config.faults.call_timeout_s)
        lrs = ", ".join(f"{section.lr * hyper.lr_scale:g}" for section in (config.learner, config.diffusion_learner)
                        if section is not None)
        message = (f"rollback {rollbacks}/{config.guard.rollback.max_rollbacks} to {target.name}: learner weights "
                   f"{'; '.join(digests)} (equal to the checkpoint's) served as {self.fleet.describe(versions)}; training "
                   f"on from step {restored.step + 1} with lr x{hyper.lr_scale:g} ({lrs})"
                   + (f", beta {hyper.beta:g}" if learner is not None else ""))
        self.store.log_event(self.run_id, "rollback", message)
        print(f"guard: {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rl.run.train", description="Run GRPO post-training.")
    parser.add_argument("--config", required=True, help="YAML config (see deploy/configs/)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue a run from its last checkpoint: a run id, or the latest run of this name")
    parser.add_argument("--runs-dir", default=None, help="override logging.runs_dir")
    parser.add_argument("--steps", type=int, default=None, help="override steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
        resolve_model_dir(config.model.path)  # a missing checkpoint is one clear line, before Ray starts
        check_rows_fit_config(config)  # images and prompts the reward service must take (service "serve")
    except (CheckpointNotFoundError, ConfigError) as error:
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
        print(f"{stopped}\ncontinue it with: python -m rl.run.train --config {args.config} --resume {trainer.run_id}",
              file=sys.stderr, flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
