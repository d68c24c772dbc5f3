"""The run's fleet (rl/run/fleet.py) with stand-in workers on a real Ray cluster: a publish that loses
a worker is recovered (reconnect, publish again, every worker proven on the version), a worker left
half-updated by a failed streamed publish is restarted first, and a worker Ray will not restart any
more stops the run with a named error."""

from __future__ import annotations

import time

import pytest

from policy.weights import UNSERVICEABLE
from rl.run.fleet import Fleet, Versions, WorkerFailedError
from rl.weight_sync import SyncReport, WeightSyncError


class StandInWorker:
    """Serves whatever version it is set to (a restarted worker would serve 0)."""

    def __init__(self, version: int = 0):
        self.version = version

    def set(self, version: int) -> None:
        self.version = version

    def served_version(self) -> int:
        return self.version


class HalfUpdatedWorker(StandInWorker):
    """Left half-updated by a failed streamed publish until restarted (Ray runs the constructor
    again: the new process serves the weights on disk, v0)."""

    def __init__(self):
        import ray

        super().__init__(0 if ray.get_runtime_context().was_current_actor_reconstructed else UNSERVICEABLE)


class FlakyLearner:
    """Its first `failures` publishes fail like a broadcast that lost a worker; later ones set the
    version on every connected worker."""

    def __init__(self, ray, version: int, failures: int):
        self.ray, self.version, self.failures = ray, version, failures
        self.connected: list = []
        self.calls: list[str] = []

    def connect_workers(self, workers: list) -> None:
        self.calls.append("connect")
        self.connected = list(workers)

    def publish_weights(self) -> SyncReport:
        self.calls.append("publish")
        if self.failures:
            self.failures -= 1
            raise WeightSyncError("broadcasting weight version 2 failed (a worker process died?)")
        self.ray.get([w.set.remote(self.version) for w in self.connected])
        return SyncReport(self.version, "stand-in", 0, 0.01, 0.0, len(self.connected), 1)

    def shutdown(self) -> None:
        pass


PATIENCE_S = 60
"""How long the fleet waits for a stand-in: they answer at once, but a new actor's first answer took
over 10 s on a box at load 39 (no test here waits a timeout out)."""


def make_fleet(ray, versions: tuple[int, int], learner) -> tuple[Fleet, list]:
    events: list[tuple[str, str]] = []
    rollout = ray.remote(StandInWorker).options(num_cpus=0).remote(versions[0])
    decoder = ray.remote(StandInWorker).options(num_cpus=0).remote(versions[1])
    fleet = Fleet([rollout], [decoder], learner, max_worker_restarts=0, restart_timeout_s=PATIENCE_S,
                  call_timeout_s=PATIENCE_S,
                  log_event=lambda kind, message: events.append((kind, message)))
    learner.connect_workers(fleet.workers)
    return fleet, events


def test_a_failed_publish_is_recovered_and_every_worker_then_serves_the_version(ray_cluster):
    learner = FlakyLearner(ray_cluster, version=2, failures=1)
    fleet, events = make_fleet(ray_cluster, (1, 0), learner)  # the decoder was restarted: serves v0
    assert fleet.publish(Versions(2), step=2) is None  # recovered on the way: no clean measurement
    assert fleet.served_versions(PATIENCE_S) == [2, 2]
    assert learner.calls == ["connect", "publish", "connect", "publish"]  # reconnected before publishing again
    assert [kind for kind, _ in events] == ["worker_fault", "recovered"]
    assert events[0][1].startswith("publishing v2 failed: broadcasting weight version 2 failed")
    assert events[1][1].startswith("step 2: weight publish failed: reloaded rollout-0 (v1), decoder-0 (v0); "
                                   "every worker serves v2")
    fleet.check_versions(Versions(2), timeout_s=PATIENCE_S)
    fleet.shutdown()


def test_a_worker_dead_for_good_is_a_named_failure(ray_cluster):
    fleet, _ = make_fleet(ray_cluster, (3, 3), FlakyLearner(ray_cluster, version=3, failures=0))
    assert fleet.name(fleet.decoder_actors[0]) == "decoder-0"
    ray_cluster.kill(fleet.decoder_actors[0])  # no restarts left
    with pytest.raises(WorkerFailedError, match=r"dead for good \(its start failed, or faults.max_worker_restarts = "
                                                r"0 are used up\)"):
        fleet.recover(Versions(3), "step 4: decoder-0 dead")
    fleet.shutdown()


class WorkerThatCannotStart(StandInWorker):
    def __init__(self):
        raise ValueError("User-specified max_model_len (2048) is greater than the derived max_model_len (1024)")


def test_a_worker_whose_start_failed_fails_the_connect_with_its_own_error(ray_cluster):
    """Not the weight transport's rendezvous waiting out its timeout (300 s for gloo) for a process that is gone."""
    learner = FlakyLearner(ray_cluster, version=0, failures=0)
    rollout = ray_cluster.remote(WorkerThatCannotStart).options(num_cpus=0).remote()
    decoder = ray_cluster.remote(StandInWorker).options(num_cpus=0).remote(0)
    fleet = Fleet([rollout], [decoder], learner, max_worker_restarts=2, restart_timeout_s=PATIENCE_S,
                  call_timeout_s=PATIENCE_S, log_event=lambda kind, message: None)
    started = time.monotonic()
    with pytest.raises(WorkerFailedError, match=r"its start failed(.|\n)*max_model_len \(2048\) is greater"):
        fleet._connect()
    assert learner.calls == [] and time.monotonic() - started < PATIENCE_S
    fleet.shutdown()


def test_a_half_updated_worker_is_restarted_before_the_publish_again(ray_cluster):
    learner = FlakyLearner(ray_cluster, version=2, failures=1)
    events: list[tuple[str, str]] = []
    rollout = ray_cluster.remote(StandInWorker).options(num_cpus=0).remote(1)
    # the failed publish left this one half-updated; its restart serves the weights on disk (v0)
    decoder = ray_cluster.remote(HalfUpdatedWorker).options(num_cpus=0, max_restarts=1).remote()
    fleet = Fleet([rollout], [decoder], learner, max_worker_restarts=1, restart_timeout_s=60, call_timeout_s=10,
                  log_event=lambda kind, message: events.append((kind, message)))
    learner.connect_workers(fleet.workers)
    assert fleet.publish(Versions(2), step=2) is None
    assert fleet.served_versions(PATIENCE_S) == [2, 2]
    assert events[1][1].startswith("step 2: weight publish failed: reloaded rollout-0 (v1), decoder-0 (v0), "
                                   "decoder-0 (restarted: half-updated); every worker serves v2")
    fleet.shutdown()
