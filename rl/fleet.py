"""The run's fleet: the rollout and decoder workers (Ray actors), the learner group, and the one
invariant between them: every worker serves the learner's weight version.

    Trainer (rl/train.py: the loop, checkpoints, run store, sampler, reward service)
      -> Fleet.publish(v)        learner --weights v--> every worker; a lost worker -> recover(v)
      -> Fleet.recover(v, why)   wait for restarted workers, reconnect the weight transport,
                                 publish again, prove each worker serves v
      -> Fleet.restart(actor)    kill a hung worker; Ray restarts it like a dead one

A restarted worker is a new process that serves the weights on disk (version 0), so recovery
always reconnects and publishes, and trusts only the version each worker reports serving.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl.train_config import TrainConfig
    from rl.weight_sync import SyncReport

LogEvent = Callable[[str, str], None]
"""(kind, message): records an event in the run store."""


class WorkerFailedError(RuntimeError):
    """A worker could not be brought back, or one chunk kept failing: the run cannot go on."""


class Fleet:
    """Rollout and decoder actors plus the learner group, with their names and versions."""

    def __init__(self, rollout_actors: list, decoder_actors: list, learner, *, max_worker_restarts: int,
                 restart_timeout_s: float, call_timeout_s: float, log_event: LogEvent):
        self.rollout_actors, self.decoder_actors, self.learner = rollout_actors, decoder_actors, learner
        self.max_worker_restarts = max_worker_restarts
        self.restart_timeout_s = restart_timeout_s
        """How long a restarting worker is waited for."""
        self.call_timeout_s = call_timeout_s
        self.log_event = log_event
        self.names = {a._actor_id.hex(): f"rollout-{i}" for i, a in enumerate(rollout_actors)}
        self.names.update({a._actor_id.hex(): f"decoder-{i}" for i, a in enumerate(decoder_actors)})

    @classmethod
    def start(cls, config: TrainConfig, policy_version: int, log_event: LogEvent) -> Fleet:
        """Start every worker and the learner at `policy_version`, and connect the weight transport
        (the engines load in the background: `check_versions` waits for them)."""
        from rl.learner_group import LearnerGroup
        from rl.placement import role_resources
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
        learner = None
        try:
            learner_config = config.learner.model_copy(update={"initial_version": policy_version})
            learner = LearnerGroup(learner_config, timeout_s=config.faults.learner_timeout_s,
                                   resources=role_resources(config, "learner"))
            fleet = cls(rollout_actors, decoder_actors, learner, max_worker_restarts=restarts,
                        restart_timeout_s=config.faults.restart_timeout_s,
                        call_timeout_s=config.faults.call_timeout_s, log_event=log_event)
            learner.connect_workers(fleet.workers)
        except BaseException:  # nobody else holds these actors yet: end them here
            import ray

            for actor in rollout_actors + decoder_actors:
                ray.kill(actor)
            if learner is not None:
                learner.shutdown()
            raise
        return fleet

    @property
    def workers(self) -> list:
        """Every actor serving the AR policy: rollout workers, then decoder workers."""
        return self.rollout_actors + self.decoder_actors

    def name(self, actor) -> str:
        return self.names[actor._actor_id.hex()]

    def served_versions(self, timeout_s: float) -> list[int]:
        """Every worker's served version. A restarting worker is waited for (up to `timeout_s`);
        one Ray will not restart any more is an error."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([w.served_version.remote() for w in self.workers],
                               timeout=max(deadline - time.monotonic(), 0.1))
            except ActorUnavailableError:  # between its death and its restart
                if time.monotonic() > deadline:
                    raise WorkerFailedError(f"a worker did not come back within {timeout_s:.0f} s") from None
                time.sleep(1.0)
            except ActorDiedError as error:
                raise WorkerFailedError(f"a worker is dead for good (faults.max_worker_restarts = "
                                        f"{self.max_worker_restarts} used up): {error}") from None
            except GetTimeoutError:
                raise WorkerFailedError(f"workers did not answer served_version within {timeout_s:.0f} s") from None

    def check_versions(self, version: int, timeout_s: float) -> None:
        served = self.served_versions(timeout_s)
        if any(v != version for v in served):
            raise RuntimeError(f"workers serve versions {served}, expected {version} everywhere")

    def restart(self, actor) -> None:
        """Kill a hung worker; Ray restarts it like a dead one (it then serves the weights on disk)."""
        import ray

        ray.kill(actor, no_restart=False)

    def recover(self, version: int, why: str) -> SyncReport:
        """Bring every worker to the learner's `version` (a restarted one serves the weights on disk)
        and prove it with the version each one reports; record the event."""
        t0 = time.perf_counter()
        workers = self.workers
        served = self.served_versions(self.restart_timeout_s)
        behind = [f"{self.name(w)} (v{v})" for w, v in zip(workers, served) if v != version]
        # Always, even when no worker is behind (a restarted one may load the current weights from
        # disk): a restarted worker is a new process, which must join the weight transport again
        # (a broadcast group holds processes, not actors); a same-version publish is accepted.
        self.learner.connect_workers(workers)
        report = self.learner.publish_weights()
        served = self.served_versions(self.call_timeout_s)
        if any(v != version for v in served):
            raise WorkerFailedError(f"after recovery the workers serve {served}, expected v{version}")
        message = (f"{why}: reloaded {', '.join(behind) or 'no worker'}; every worker serves v{version} "
                   f"({time.perf_counter() - t0:.1f} s)")
        self.log_event("recovered", message)
        print(f"recovered: {message}", flush=True)
        return report

    def publish(self, version: int, step: int) -> SyncReport:
        """Publish the learner's weights (`version`, trained in `step`); a worker lost on the way is
        recovered, which publishes again."""
        from ray.exceptions import RayActorError

        from rl.weight_sync import WeightSyncError

        try:
            return self.learner.publish_weights()
        except (WeightSyncError, RayActorError, TimeoutError) as error:
            detail = str(error).splitlines()[0][:300]
            self.log_event("worker_fault", f"publishing v{version} failed: {detail}")
            print(f"fault: publishing v{version} failed: {detail}", flush=True)
            return self.recover(version, f"step {step}: weight publish failed")

    def shutdown(self) -> None:
        import ray

        for actor in self.workers:
            ray.kill(actor)
        self.learner.shutdown()
