"""The Trainer: one GRPO run's loop (rl/run/train.py is its command: `python -m rl.run.train`, `blip3o-rl train`).

    start()   reward service, workers and learners up (a resume: the checkpoint's weights published)
    run()     per step: collect the oldest step in flight (rl/run/collect.py) -> update each trained
              policy (rl/run/policies.py) -> wait until the steps in flight have their images -> publish
              -> async: launch the steps the schedule now allows (rl/run/in_flight.py) -> record the
              step (rl/run/step_report.py) -> in-run eval (rl/evaluation/in_run.py) -> the guard, which
              may roll back (rl/guard/rollback.py) -> checkpoint when due -> launch the next steps
              Any error ends it through `_stop`: the steps in flight abandoned (the oldest one's prompts
              given back), the finished steps checkpointed, the run marked stopped or failed
              (RunStopped, with the exit code).
"""

from __future__ import annotations

import copy
import time
import traceback
from pathlib import Path

from rl.checkpoint import CheckpointDir, CheckpointError, TrainerState
from rl.evaluation.harness import ActorWorkers
from rl.evaluation.in_run import InRunEval, keep_if_best
from rl.guard.image_stats import step_image_metrics
from rl.guard.rollback import RunGuard, roll_back, rollback_target
from rl.guard.rules import Firing
from rl.prompts.sources import PromptSampler
from rl.run.alarms import Alarms
from rl.run.collect import collect, wait_sampled
from rl.run.config import ConfigError, TrainConfig
from rl.run.fleet import Fleet, Versions
from rl.run.in_flight import InFlight, launch_limit
from rl.run.lanes import Lanes
from rl.run.lifecycle import STOPS, RunStopped, StopRequested, one_line, open_run, stop_of
from rl.run.pipeline import PendingStep, RewardOutageError, ScoredStep, step_seed
from rl.run.placement import check_cluster_fits, role_demands, role_resources
from rl.run.policies import TrainedPolicy, trained_policies
from rl.run.reward_checks import check_reward_service
from rl.run.step_report import StepSchedule, note_rewards, progress_line, sample_records, step_metrics
from rl.run_store import RunStore
from rl.scoring.service import RewardEndpoint, start_reward_service, stop_reward_service


class Trainer:
    """One run: its store records, checkpoints, prompt sampler, in-run eval and guard. `start` brings
    up the reward service, the workers and the learners; `run` trains."""

    def __init__(self, config: TrainConfig, resume: str | None = None):
        self.config = config
        self.store = RunStore(config.logging.runs_dir)
        self.run_id, self.state, self.resume_from = open_run(config, self.store, resume)
        runs_dir = Path(config.logging.runs_dir)
        self.checkpoints = CheckpointDir(runs_dir / "checkpoints" / self.run_id, keep_last=config.checkpoint.keep_last)
        # its own copy: state.sampler stays the state after the last TRAINED step's prompts (what a
        # checkpoint records), while the sampler runs ahead by the steps in flight
        self.sampler = PromptSampler(config.data.sources, config.seed, copy.deepcopy(self.state.sampler))
        self.evaluation = None if config.eval is None or config.eval.every == 0 else InRunEval(
            config.eval, config.rollout.engine.sampling, config.schedule.chunk_prompts * config.data.group_size,
            runs_dir / self.run_id / "eval")
        self.guard = self._open_guard()
        self.store.add_metrics_listener(Alarms(self.run_id, config.logging.alarms, self._log_event))
        self.policies: dict[str, TrainedPolicy] = {}
        """The trained policies by their `train` name, AR first (`attach`)."""
        self.in_flight = InFlight(Lanes([], []))
        """The steps launched and not yet trained, oldest first (`attach` gives it the fleet's lanes)."""
        self.checkpointed_step = self.state.step
        self.learner_ahead = False
        """A learner is past `state` (mid-update, mid-rollback): a stop must not checkpoint then."""
        self.stop_reason: str | None = None
        self.reward_versions: dict[str, str] = {}
        """Reward component -> the scorer version last recorded (empty at a start or resume: all are recorded again)."""

    def _open_guard(self) -> RunGuard | None:
        """The reward-hacking guard (config `guard`); a resumed run's continues from its saved state."""
        config = self.config
        if config.guard is None:
            return None
        beta = config.learner.grpo.beta if config.learner is not None else 0.0
        try:
            return RunGuard.open(config.guard, self.checkpoints.root, self.state.step, beta, self._log_event)
        except ValueError as error:
            raise ConfigError(str(error)) from None

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

    def _is_checkpoint_step(self, step: int) -> bool:
        return step % self.config.checkpoint.every == 0 or step == self.config.steps

    def _is_eval_step(self, step: int) -> bool:
        return self.evaluation is not None and self.config.eval.due(step, self.config.steps)

    def _is_barrier(self, step: int) -> bool:
        """A checkpoint step, or an eval step (which may become a best checkpoint, and whose eval uses
        the workers): no step is launched past it before it is trained, evaluated and checkpointed."""
        return self._is_checkpoint_step(step) or self._is_eval_step(step)

    @property
    def max_ahead(self) -> int:
        """Steps that may be in flight beyond the one being trained: `schedule.max_staleness` (async), 0 (sync)."""
        schedule = self.config.schedule
        return schedule.max_staleness if schedule.mode == "async" else 0

    def _log_event(self, kind: str, message: str) -> None:
        self.store.log_event(self.run_id, kind, message)

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at the next safe point (a signal handler calls this)."""
        self.stop_reason = reason

    def _check_stop(self) -> None:
        if self.stop_reason:
            raise StopRequested(self.stop_reason)

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
        self.attach(Fleet.start(config, self.versions, self._log_event))
        try:  # every learner node writes its part of a checkpoint: the driver must see their files
            for group in self.fleet.learners:
                group.prove_shared_directory(str(self.checkpoints.root))
        except CheckpointError as error:
            raise ConfigError(str(error)) from None
        if self.state.step > 0:  # workers start from the checkpoint's weights
            self.restore_weights()
        self.fleet.check_versions(self.versions, config.faults.restart_timeout_s)  # engines load first
        print(f"run {self.run_id}: workers, learner and reward API ({self.endpoint.url}) up in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)

    def restore_weights(self) -> None:
        """A resume: every learner as the checkpoint saved it, its weights published to the workers."""
        for policy in self.policies.values():
            policy.restore(self.resume_from)
        self._set_hyperparameters()
        t_publish = time.perf_counter()
        for group in self.fleet.learners:
            group.publish_weights()
        self._log_event("resume", f"weights {self.fleet.describe(self.versions)} published in "
                                  f"{time.perf_counter() - t_publish:.2f} s")

    def attach(self, fleet: Fleet) -> None:
        """Train with this fleet's learners (one `TrainedPolicy` each, chosen here, once); the steps in
        flight share one lane per worker (rl/run/lanes.py)."""
        self.fleet = fleet
        self.policies = {policy.name: policy for policy in trained_policies(self.config, fleet)}
        self.in_flight = InFlight(Lanes(fleet.rollout_actors, fleet.decoder_actors))

    def _set_hyperparameters(self) -> None:
        """Every learner's lr (and the AR beta) after the guard's rollbacks so far (none: as configured)."""
        if self.guard is not None and self.guard.rollbacks:
            hyper = self.guard.hyperparameters()
            for policy in self.policies.values():
                policy.set_hyperparameters(hyper)

    def shutdown(self) -> None:
        if hasattr(self, "fleet"):
            self.fleet.shutdown()
        if hasattr(self, "endpoint"):
            stop_reward_service(self.config.rewards)

    # ----- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Train until `config.steps`. A stop request, a reward outage or any error checkpoints the
        finished steps, marks the run stopped or failed and raises RunStopped."""
        config = self.config
        self._fill()
        try:
            while (step := self.state.step + 1) <= config.steps:  # a guard rollback moves self.state back
                self._check_stop()
                t_step = time.perf_counter()
                scored, resampled = self._collect_fresh(step)
                t_collected = time.perf_counter()
                schedule = StepSchedule(len(self.in_flight) - 1, [self.state.policy_version - v
                                                                  for v in scored.row_versions], resampled)
                updated, timings, syncs = self._train(step, scored)
                if self._overlaps(step):  # async: the next steps sample while this one is recorded
                    self._fill()
                timings.update(step=time.perf_counter() - t_step, collect_wait=t_collected - t_step)
                metrics = self._record(step, scored, updated, schedule, timings, syncs)
                self._evaluate(step, metrics)
                rolled_back = self._guard_step(step, metrics)  # to a checkpoint: train on from there
                if not rolled_back and self._is_checkpoint_step(step) and self.checkpointed_step < step:
                    self.save_checkpoint()  # (unless a new best eval saved it)
                self._fill()
        except Exception as error:
            if not isinstance(error, STOPS):
                traceback.print_exc()  # the whole story for whoever debugs it; the store keeps one line
            raise self._stop(*stop_of(error, config.rewards.outage_budget_s)) from None
        # a finished run leaves every worker on its last weights
        self.fleet.check_versions(self.versions, config.faults.call_timeout_s)

    def _fill(self) -> None:
        """Launch every step the schedule allows after the last trained one and not launched yet
        (rl/run/in_flight.py `launch_limit`): each samples with the weights published last."""
        limit = launch_limit(self.state.step, self.max_ahead, self.config.steps, self._is_barrier)
        for step in range((self.in_flight.last or self.state.step) + 1, limit + 1):
            self.in_flight.add(self._launch(step))

    def _launch(self, step: int) -> PendingStep:
        """Draw a step's prompts and submit its dataflow on the lanes of the steps in flight."""
        config = self.config
        before = copy.deepcopy(self.sampler.state)
        items = self.sampler.next_batch(config.data.prompts_per_step)
        sde = config.diffusion_learner.sampling if config.diffusion_learner is not None else None
        return PendingStep(items, config.data.group_size, step_seed(config.seed, step), self.fleet.rollout_actors,
                           self.fleet.decoder_actors, self.endpoint, config.schedule.chunk_prompts,
                           self.state.policy_version, before, sde=sde, decoder_version=self.state.decoder_version,
                           step=step, lanes=self.in_flight.lanes)

    def _collect_fresh(self, step: int) -> tuple[ScoredStep, int]:
        """The oldest step in flight, scored, and the rows sampled again on the way: a chunk whose rows
        lag the learner by more than `schedule.max_staleness` versions is never trained on, but sampled
        again with the current weights (the schedule's versions never lag that much; a safety net)."""
        pending, resampled = self.in_flight.head(step), 0
        while True:  # rl/run/collect.py: faults recorded and recovered on the way
            scored = collect(self.in_flight, step, self.versions, self.fleet, self.config, self._log_event,
                             self._check_stop)
            stale = pending.too_old(self.state.policy_version, self.config.schedule.max_staleness)
            if not stale:
                return scored, resampled
            for fault in stale:
                self._log_event("stale_rollouts", f"step {step}: {fault.describe()}")
                resampled += pending.rows(fault.chunk)
                pending.redo(fault)

    def _overlaps(self, step: int) -> bool:
        """Async: the next steps are launched as soon as this step's weights are published, except after
        a checkpoint step or an eval step (a barrier: they are launched once it is checkpointed)."""
        return self.config.schedule.mode == "async" and not self._is_barrier(step)

    def _train(self, step: int, scored: ScoredStep) -> tuple[dict, dict[str, float], dict[str, float]]:
        """Each policy due after `step` learns from the step's rewards; once the steps in flight have their
        images (`wait_sampled`), each updated one publishes (after all updates: a recovery on the way
        publishes every stream at the new versions); the step is then finished and leaves the window.
        Returns the learners' metrics by policy, the stage times, the sync metrics."""
        self.learner_ahead = True  # until the step is recorded, a learner is past self.state
        updated, versions = {}, self.versions
        timings: dict[str, float] = {"update": 0.0, "sync": 0.0}
        syncs: dict[str, float] = {}
        for name in self._updates(step):
            policy, t0 = self.policies[name], time.perf_counter()
            updated[name] = policy.update(scored)
            versions = policy.serving(versions, updated[name].policy_version)
            seconds = time.perf_counter() - t0
            timings["update"] += seconds
            timings.update({f"update{policy.key}": seconds} if policy.key else {})
        t0 = time.perf_counter()
        wait_sampled(self.in_flight, versions, self.fleet, self.config, self._log_event)
        timings["wait_sampled"] = time.perf_counter() - t0
        for policy in (p for name, p in self.policies.items() if name in updated):
            t0 = time.perf_counter()
            report = policy.publish(versions, step)  # None: recovered on the way (no clean measurement)
            seconds = time.perf_counter() - t0
            timings["sync"] += seconds
            timings.update({f"sync{policy.key}": seconds} if policy.key else {})
            if report is not None:
                syncs[f"sync{policy.key}/seconds"], syncs[f"sync{policy.key}/gb_per_s"] = report.seconds, report.gb_per_s
        self.in_flight.pop()
        self.state.step, self.state.policy_version, self.state.decoder_version = step, versions.policy, versions.decoder
        # the prompts of the trained steps only: the steps in flight drew theirs from the oldest one's state on
        self.state.sampler = copy.deepcopy(self.in_flight.earliest_sampler_state() or self.sampler.state)
        self.learner_ahead = False
        return updated, timings, syncs

    def _record(self, step: int, scored: ScoredStep, updated: dict, schedule: StepSchedule, timings: dict[str, float],
                syncs: dict[str, float]) -> dict[str, float]:
        """The step's metrics, samples, progress line and reward notes (rl/run/step_report.py)."""
        config = self.config
        metrics = step_metrics(scored, updated.get("ar"), updated.get("diffusion"), self.versions,
                               schedule.staleness_max, timings | scored.timings, schedule)
        metrics.update(syncs)
        metrics.update(step_image_metrics(scored))  # images/*: what the guard watches
        self.store.log_metrics(self.run_id, step, metrics)
        self.store.log_samples(self.run_id, step, sample_records(scored, config.logging.samples_per_step,
                                                                 config.data.group_size))
        print(progress_line(step, config.steps, metrics), flush=True)
        note_rewards(self.store, self.run_id, step, scored, self.endpoint.mix, self.reward_versions)
        return metrics

    def _evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """After an eval step's update (config `eval`, rl/evaluation/in_run.py): the weights the workers
        now serve, on the evaluation prompts. Its metrics join the step's (`metrics` is updated and the
        step logged again), its images the eval gallery; a new best score pins this step's checkpoint."""
        from rewards.client import RewardServerError

        if not self._is_eval_step(step):
            return
        workers = ActorWorkers(self.fleet.rollout_actors[0], self.fleet.decoder_actors[0],
                               timeout_s=self.config.schedule.stage_timeout_s)
        try:  # SIGTERM / Ctrl-C: a long eval stops between its chunks
            result = self.evaluation.run(workers, self.endpoint, step, f"run {self.run_id}",
                                         progress=lambda _: self._check_stop())
        except RewardServerError as outage:  # the same clean stop as an outage during a step
            raise RewardOutageError(f"during the eval of step {step}: {outage}") from None
        metrics.update(result.metrics)
        self.store.log_metrics(self.run_id, step, metrics)
        self.store.log_samples(self.run_id, step, result.gallery, kind="eval")
        line = keep_if_best(result, self.checkpoints, self._checkpoint_once, self.config.steps)
        self._log_event("eval", line)
        print(line, flush=True)

    def _guard_step(self, step: int, metrics: dict[str, float]) -> bool:
        """Show the step's metrics (eval included) to the guard (rl/guard/rollback.py); True: it rolled
        the run back to a checkpoint, and the loop trains on from the restored step."""
        if self.guard is None:
            return False
        firings = self.guard.observe(step, metrics)
        if self.checkpointed_step == step:  # an eval step saved its checkpoint before the guard saw it
            self.guard.save()
        firing = self.guard.act(firings)
        if firing is None:
            return False
        self._rollback(step, firing)
        return True

    def _rollback(self, step: int, firing: Firing) -> None:
        """Restore the rollback target exactly, as a resume would (weights, optimizer, lr schedule,
        sampler, step), under new versions (workers only take newer ones), serve it, and train on with
        the rollback's lr and beta. The later steps are redone: their checkpoints and records are dropped."""
        target = rollback_target(self.checkpoints, firing)  # GuardTripped if there is none
        self._drop_in_flight(f"step {step}: guard rollback")  # async: the next steps' rollouts, of weights now dropped
        versions = self.versions
        for policy in self.policies.values():
            versions = policy.serving(versions, policy.version(versions) + 1)
        self.learner_ahead = True  # until self.state is the target's, a stop must not checkpoint
        done = roll_back(self.guard, self.checkpoints, target,
                         [(policy, policy.version(versions)) for policy in self.policies.values()])
        sampler = done.restored.sampler
        self.state = TrainerState(done.restored.step, versions.policy, self.run_id, copy.deepcopy(sampler),
                                  versions.decoder)
        self.sampler.state = copy.deepcopy(sampler)
        self.learner_ahead = False
        self.checkpointed_step = done.restored.step
        self.store.resume_run(self.run_id, done.restored.step)
        for policy in self.policies.values():
            policy.publish(versions, step)
        self.fleet.check_versions(versions, self.config.faults.call_timeout_s)
        lrs = ", ".join(f"{policy.lr * done.hyper.lr_scale:g}" for policy in self.policies.values())
        beta = f", beta {done.hyper.beta:g}" if "ar" in self.policies else ""  # the diffusion learner keeps its own
        message = (f"rollback {done.count}/{self.config.guard.rollback.max_rollbacks} to {target.name}: learner "
                   f"weights {'; '.join(done.digests)} (equal to the checkpoint's) served as "
                   f"{self.fleet.describe(versions)}; training on from step {done.restored.step + 1} with lr "
                   f"x{done.hyper.lr_scale:g} ({lrs}){beta}")
        self._log_event("rollback", message)
        print(f"guard: {message}", flush=True)

    def _drop_in_flight(self, why: str) -> None:
        """Drop every step in flight once its tasks are waited out (`InFlight.drain`): the next steps'
        stage clocks must not start behind them. A worker whose task runs past the stage timeout is
        restarted and every worker brought back to the current weights, as for a hang. (A stop needs
        none of this: the workers end with the run.)"""
        busy = self.in_flight.drain(self.config.schedule.stage_timeout_s)
        for actor in busy:
            self.fleet.restart(actor)
        if busy:
            self.fleet.recover(self.versions, f"{why}: {', '.join(self.fleet.name(a) for a in busy)} still busy with "
                                              "a dropped step")

    # ----- checkpoints and stops ----------------------------------------------------------------

    def _checkpoint_once(self) -> None:
        """Checkpoint the last finished step unless it has one."""
        if self.checkpointed_step < self.state.step:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Each trained policy's learner and export (rl/run/policies.py) and the driver's state."""
        t0 = time.perf_counter()
        tmp = self.checkpoints.begin(self.state.step)
        for policy in self.policies.values():
            policy.save(tmp)
        ranks = {name: policy.world_size for name, policy in self.policies.items()}
        path = self.checkpoints.commit(tmp, self.state, learner_ranks=ranks.get("ar", 0),
                                       diffusion_ranks=ranks.get("diffusion", 0))
        self.checkpointed_step = self.state.step
        if self.guard is not None:
            self.guard.save()
        print(f"checkpoint {path} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return path

    def _stop(self, reason: str, status: str, exit_code: int) -> RunStopped:
        """Abandon the steps in flight, checkpoint the finished ones, mark the run stopped / failed."""
        earliest = self.in_flight.earliest_sampler_state()
        if earliest is not None:  # their prompts were drawn but never trained on: give them all back
            self.sampler.state, self.state.sampler = copy.deepcopy(earliest), copy.deepcopy(earliest)
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
