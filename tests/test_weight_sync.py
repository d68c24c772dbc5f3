"""The broadcast weight transport's process groups (rl/weight_sync.py) on gloo, with stand-in
receivers on a real Ray cluster: a group is ended on both sides when the workers are connected
again, even while a worker is blocked in one of its receives."""

from __future__ import annotations

import time

import pytest
import torch

from rl.learner_config import WeightSyncConfig
from rl.weight_sync import BroadcastSender, WeightSyncError, make_manifest, receive_broadcast


class StandInReceiver:
    """The receiving contract with nothing behind it: keeps the last weights it was given."""

    def __init__(self):
        self.version, self.weights = 0, {}

    def update_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        self.weights = {name: tensor.clone() for name, tensor in weights.items()}
        self.version = version
        return version

    def served_version(self) -> int:
        return self.version

    def groups(self) -> list[str]:
        from rl import weight_sync

        return sorted(weight_sync._GROUPS)


def test_reconnecting_ends_the_old_group_and_frees_a_worker_blocked_in_its_receive(ray_cluster):
    config = WeightSyncConfig(transport="broadcast", bucket_mb=1, timeout_s=20)
    workers = [ray_cluster.remote(StandInReceiver).options(num_cpus=0).remote() for _ in range(2)]
    weights = {"w": torch.arange(10, dtype=torch.float32)}
    sender = BroadcastSender(workers, config)
    assert sender.publish(1, weights).version == 1
    # worker 0 waits in a receive the sender never sends (a publish cut short by a failure)
    blocked = workers[0].__ray_call__.remote(receive_broadcast, sender.name, make_manifest(weights), "cpu", 2)
    time.sleep(1.0)
    # Another reference to the group: dropping the sender's own one then frees nobody (as with an
    # NCCL communicator, which outlives its Python object anyway), so only ending it explicitly does.
    leaked = sender.group
    started = time.monotonic()
    sender.close()
    reconnected = BroadcastSender(workers, config)  # what the learner's connect_workers does
    with pytest.raises(WeightSyncError, match="ended weight-sync group"):
        ray_cluster.get(blocked, timeout=60)
    assert time.monotonic() - started < 10  # not the group's 20 s timeout
    assert ray_cluster.get([w.groups.remote() for w in workers]) == [[reconnected.name]] * 2  # the old one left
    assert reconnected.publish(2, weights).version == 2
    assert ray_cluster.get([w.served_version.remote() for w in workers]) == [2, 2]
    reconnected.close()
    assert ray_cluster.get([w.groups.remote() for w in workers]) == [[], []]
    del leaked
    for worker in workers:
        ray_cluster.kill(worker)
