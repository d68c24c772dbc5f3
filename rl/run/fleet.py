"""The run's fleet: the rollout and decoder workers (Ray actors), the learner groups, and the one
invariant between them: every worker serves the learners' weight versions.

    Trainer (rl/run/trainer.py: the loop, checkpoints, run store, sampler, reward service)
      -> Fleet.publish(v)          AR learner --weights v--> every worker; a lost worker -> recover
      -> Fleet.publish_decoder(d)  diffusion learner --transformer d--> every decoder; likewise
      -> Fleet.recover(Versions)   restart half-updated workers, wait for restarted ones,
                                   reconnect the weight transports, publish again, prove each
                                   worker serves both versions
      -> Fleet.restart(actor)      kill a hung worker; Ray restarts it like a dead one

Two policies, two versioned weight streams (config `train`): the AR policy (rollout workers and the
decoders' AR copy; `learner`) and SANA's transformer (the decoders' second stream,
rollout/decoder_weights.py; `diffusion_learner`). A policy that is not trained has no learner: its
workers serve the weights on disk, version 0 (or the initial version) for the whole run.

A restarted worker is a new process that serves the weights on disk (version 0), so recovery
always reconnects and publishes, and trusts only the versions each worker reports serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl.run.config import TrainConfig
    from rl.weight_sync import SyncReport

LogEvent = Callable[[str, str], None]
"""(kind, message): records an event in the run store."""


class WorkerFailedError(RuntimeError):
    """A worker could not be brought back, or one chunk kept failing: the run cannot go on."""


@dataclass(frozen=True)
class Versions:
    """What every worker must serve: the AR policy's version and SANA's transformer version."""

    policy: int
    decoder: int = 0


class Fleet:
    """Rollout and decoder actors plus the learner group, with their names and versions."""

    def __init__(self, rollout_actors: list, decoder_actors: list, learner, *, max_worker_restarts: int,
                 restart_timeout_s: float, call_timeout_s: float, log_event: LogEvent, diffusion_learner=None):
        """`learner`: the AR policy's LearnerGroup (None: the AR policy is frozen); `diffusion_learner`:
        SANA's DiffusionLearnerGroup (None: the transformer is frozen)."""
        self.rollout_actors, self.decoder_actors, self.learner = rollout_actors, decoder_actors, learner
        self.diffusion_learner = diffusion_learner
        self.max_worker_restarts = max_worker_restarts
        self.restart_timeout_s = restart_timeout_s
        """How long a restarting worker is waited for."""
        self.call_timeout_s = call_timeout_s
        self.log_event = log_event
        self.names = {a._actor_id.hex(): f"rollout-{i}" for i, a in enumerate(rollout_actors)}
        self.names.update({a._actor_id.hex(): f"decoder-{i}" for i, a in enumerate(decoder_actors)})

    @classmethod
    def start(cls, config: TrainConfig, versions: Versions, log_event: LogEvent) -> Fleet:
        """Start every worker and the learners of the trained policies at `versions`, and connect the
        weight transports (the engines load in the background: `check_versions` waits for them)."""
        from rl.learners.diffusion_learner import DiffusionLearnerGroup
        from rl.learners.group import LearnerGroup
        from rl.run.placement import role_resources
        from rollout.ar_worker import ARRolloutActor
        from rollout.decoder_worker import decoder_actor

        restarts = config.faults.max_worker_restarts
        rollout_actors = [
            ARRolloutActor.options(num_cpus=config.rollout.num_cpus_per_worker,
                                   num_gpus=config.rollout.num_gpus_per_worker,
                                   resources=role_resources(config, "rollout"), max_restarts=restarts, max_task_retries=0).remote(config.rollout.engine)
            for _ in range(config.rollout.workers)
        ]
        decoder_actors = [decoder_actor(config.decoder.decoder, max_restarts=restarts,
                                        resources=role_resources(config, "decoder"))
                          for _ in range(config.decoder.workers)]
        learner = diffusion_learner = None
        try:
            if config.learner is not None:
                learner = LearnerGroup(config.learner.model_copy(update={"initial_version": versions.policy}),
                                       timeout_s=config.faults.learner_timeout_s,
                                       resources=role_resources(config, "learner"))
            if config.diffusion_learner is not None:
                diffusion_config = config.diffusion_learner.model_copy(update={"initial_version": versions.decoder})
                diffusion_learner = DiffusionLearnerGroup(diffusion_config, timeout_s=config.faults.learner_timeout_s,
                                                          resources=role_resources(config, "learner"))
            fleet = cls(rollout_actors, decoder_actors, learner, max_worker_restarts=restarts,
                        restart_timeout_s=config.faults.restart_timeout_s,
                        call_timeout_s=config.faults.call_timeout_s, log_event=log_event,
                        diffusion_learner=diffusion_learner)
            fleet._connect()
        except BaseException:  # nobody else holds these actors yet: end them here
            import ray

            for actor in rollout_actors + decoder_actors:
                ray.kill(actor)
            for group in (learner, diffusion_learner):
                if group is not None:
                    group.shutdown()
            raise
        return fleet

    @property
    def learners(self) -> list:
        """The learner groups of the trained policies (AR first)."""
        return [group for group in (self.learner, self.diffusion_learner) if group is not None]

    def _connect(self) -> None:
        """(Re)build each learner's weight transport to its workers (a restarted worker is a new process).
        Every worker must have started first: one whose start failed fails here with its own error,
        where the transport's rendezvous would wait out its timeout for it."""
        self.served_versions(self.restart_timeout_s)
        if self.learner is not None:
            self.learner.connect_workers(self.workers)
        if self.diffusion_learner is not None:
            self.diffusion_learner.connect_workers(self.decoder_actors)

    @property
    def workers(self) -> list:
        """Every actor serving the AR policy: rollout workers, then decoder workers."""
        return self.rollout_actors + self.decoder_actors

    def name(self, actor) -> str:
        return self.names[actor._actor_id.hex()]

    def served_versions(self, timeout_s: float) -> list[int]:
        """Every worker's served AR version. A restarting worker is waited for (up to `timeout_s`);
        one Ray will not restart any more is an error."""
        return self._ask(lambda worker: worker.served_version.remote(), self.workers, timeout_s)

    def served_decoder_versions(self, timeout_s: float) -> list[int]:
        """Every decoder's served transformer version (only asked when the transformer is trained:
        a glyph decoder has none)."""
        return self._ask(lambda decoder: decoder.served_decoder_version.remote(), self.decoder_actors, timeout_s)

    def _ask(self, call, actors: list, timeout_s: float) -> list:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([call(actor) for actor in actors], timeout=max(deadline - time.monotonic(), 0.1))
            except ActorUnavailableError:  # between its death and its restart
                if time.monotonic() > deadline:
                    raise WorkerFailedError(f"a worker did not come back within {timeout_s:.0f} s") from None
                time.sleep(1.0)
            except ActorDiedError as error:
                raise WorkerFailedError(f"a worker is dead for good (its start failed, or faults.max_worker_restarts = "
                                        f"{self.max_worker_restarts} are used up): {error}") from None
            except GetTimeoutError:
                raise WorkerFailedError(f"workers did not answer served_version within {timeout_s:.0f} s") from None

    def check_versions(self, versions: Versions, timeout_s: float) -> None:
        served = self.served_versions(timeout_s)
        if any(v != versions.policy for v in served):
            raise RuntimeError(f"workers serve versions {served}, expected {versions.policy} everywhere")
        if self.diffusion_learner is not None:
            served = self.served_decoder_versions(timeout_s)
            if any(v != versions.decoder for v in served):
                raise RuntimeError(f"decoders serve transformer versions {served}, expected {versions.decoder} "
                                   "everywhere")

    def restart(self, actor) -> None:
        """Kill a hung worker; Ray restarts it like a dead one (it then serves the weights on disk)."""
        import ray

        ray.kill(actor, no_restart=False)

    def recover(self, versions: Versions, why: str) -> None:
        """Bring every worker to the learners' `versions` (a restarted one serves the weights on disk)
        and prove it with the versions each one reports; record the event."""
        t0 = time.perf_counter()
        workers = self.workers
        half_updated = self._restart_half_updated()
        served = self.served_versions(self.restart_timeout_s)
        behind = [f"{self.name(w)} (v{v})" for w, v in zip(workers, served) if v != versions.policy]
        if self.diffusion_learner is not None:
            transformers = self.served_decoder_versions(self.restart_timeout_s)
            behind += [f"{self.name(d)} (transformer v{v})" for d, v in zip(self.decoder_actors, transformers)
                       if v != versions.decoder]
        behind += [f"{name} (restarted: half-updated)" for name in half_updated]
        # Always, even when no worker is behind (a restarted one may load the current weights from
        # disk): a restarted worker is a new process, which must join the weight transport again
        # (a broadcast group holds processes, not actors); a same-version publish is accepted.
        self._connect()
        for group in self.learners:
            group.publish_weights()
        try:
            self.check_versions(versions, self.call_timeout_s)
        except RuntimeError as error:
            raise WorkerFailedError(f"after recovery: {error}") from None
        message = (f"{why}: reloaded {', '.join(behind) or 'no worker'}; every worker serves "
                   f"{self.describe(versions)} "
                   f"({time.perf_counter() - t0:.1f} s)")
        self.log_event("recovered", message)
        print(f"recovered: {message}", flush=True)

    def _restart_half_updated(self) -> list[str]:
        """Restart every worker left half-updated by a streamed publish that failed part-way
        (policy/weights.py UNSERVICEABLE: no reload can be trusted to mend an engine interrupted
        mid-load), wait until none reports it any more; their names."""
        from policy.weights import UNSERVICEABLE

        def half_updated() -> list:
            found = [w for w, v in zip(self.workers, self.served_versions(self.restart_timeout_s)) if v == UNSERVICEABLE]
            if self.diffusion_learner is not None:
                transformers = self.served_decoder_versions(self.restart_timeout_s)
                found += [d for d, v in zip(self.decoder_actors, transformers) if v == UNSERVICEABLE and d not in found]
            return found

        restarted = half_updated()
        for actor in restarted:
            self.restart(actor)
        deadline = time.monotonic() + self.restart_timeout_s
        while restarted and half_updated():  # the kill is asynchronous: the old process may still answer
            if time.monotonic() > deadline:
                raise WorkerFailedError(f"half-updated workers did not restart within {self.restart_timeout_s:.0f} s")
            time.sleep(0.5)
        return [self.name(actor) for actor in restarted]

    def describe(self, versions: Versions) -> str:
        """"v3", or "v3, transformer v2" when the decoder's transformer is trained too (messages, events)."""
        return f"v{versions.policy}" + (f", transformer v{versions.decoder}" if self.diffusion_learner else "")

    def publish(self, versions: Versions, step: int) -> SyncReport | None:
        """Publish the AR learner's weights (`versions.policy`, trained in `step`); a worker lost on
        the way is recovered, which publishes every stream again (then no report: None)."""
        return self._publish(self.learner, versions, step, f"v{versions.policy}")

    def publish_decoder(self, versions: Versions, step: int) -> SyncReport | None:
        """Publish the diffusion learner's transformer (`versions.decoder`) to every decoder; likewise."""
        return self._publish(self.diffusion_learner, versions, step, f"transformer v{versions.decoder}")

    def _publish(self, group, versions: Versions, step: int, what: str) -> SyncReport | None:
        from ray.exceptions import RayActorError

        from rl.weight_sync import WeightSyncError

        try:
            return group.publish_weights()
        except (WeightSyncError, RayActorError, TimeoutError) as error:
            detail = str(error).splitlines()[0][:300]
            self.log_event("worker_fault", f"publishing {what} failed: {detail}")
            print(f"fault: publishing {what} failed: {detail}", flush=True)
            self.recover(versions, f"step {step}: weight publish failed")
            return None

    def shutdown(self) -> None:
        import ray

        for actor in self.workers:
            ray.kill(actor)
        for group in self.learners:
            group.shutdown()
