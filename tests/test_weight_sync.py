"""The broadcast weight transport (rl/weight_sync.py) on gloo, with stand-in receivers on a real Ray
cluster: updates stream into the workers bucket by bucket, a worker refusing part-way neither
blocks the collective nor serves a half-loaded model, and a group is ended on both sides when the
workers are connected again, even while a worker is blocked in one of its receives."""

from __future__ import annotations

import time

import pytest
import torch

from policy.weights import UNSERVICEABLE, VersionedWeights, param_specs
from rl.weight_sync import (
    BroadcastSender,
    TensorSource,
    WeightSyncConfig,
    WeightSyncError,
    make_manifest,
    receive_broadcast,
)

MIB = 2**20


class StandInReceiver:
    """The receiving contract over a plain dict of tensors: the same checks as every worker
    (`VersionedWeights`); remembers the size of the buffer each received tensor arrived in."""

    def __init__(self, served: dict[str, torch.Tensor]):
        self.weights = {name: t.clone() for name, t in served.items()}
        self.contract = VersionedWeights(param_specs(served))
        self.buffer_bytes: list[int] = []

    def update_weights(self, version: int, weights) -> int:
        return self.contract.update(version, weights, self._load)

    def _load(self, pairs) -> None:
        for name, tensor in pairs:
            self.buffer_bytes.append(tensor.untyped_storage().nbytes())
            self.weights[name].copy_(tensor)

    def served_version(self) -> int:
        return self.contract.version

    def received(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        return self.weights, self.buffer_bytes

    def groups(self) -> list[str]:
        from rl import weight_sync

        return sorted(weight_sync._GROUPS)


def test_reconnecting_ends_the_old_group_and_frees_a_worker_blocked_in_its_receive(ray_cluster):
    config = WeightSyncConfig(transport="broadcast", bucket_mb=1, timeout_s=20)
    weights = {"w": torch.arange(10, dtype=torch.float32)}
    workers = [ray_cluster.remote(StandInReceiver).options(num_cpus=0).remote(weights) for _ in range(2)]
    sender = BroadcastSender(workers, config)
    assert sender.publish(1, TensorSource(weights)).version == 1
    # worker 0 waits in a receive the sender never sends (a publish cut short by a failure)
    manifest = make_manifest(param_specs(weights))
    blocked = workers[0].__ray_call__.remote(receive_broadcast, sender.name, manifest, "cpu", 2)
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
    assert reconnected.publish(2, TensorSource(weights)).version == 2
    assert ray_cluster.get([w.served_version.remote() for w in workers]) == [2, 2]
    reconnected.close()
    assert ray_cluster.get([w.groups.remote() for w in workers]) == [[], []]
    del leaked
    for worker in workers:
        ray_cluster.kill(worker)


def model(seed: int, nan_in: str | None = None) -> dict[str, torch.Tensor]:
    """Three 0.6 MiB tensors: with 1 MiB buckets, one bucket each (the whole is 1.8 MiB)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {name: torch.randn(150_000, generator=generator) for name in ("a", "b", "c")}
    if nan_in:
        weights[nan_in][7] = float("nan")
    return weights


def test_a_broadcast_streams_every_bucket_into_a_buffer_of_its_own(ray_cluster):
    config = WeightSyncConfig(transport="broadcast", bucket_mb=1, timeout_s=60)
    workers = [ray_cluster.remote(StandInReceiver).options(num_cpus=0).remote(model(0)) for _ in range(2)]
    sender = BroadcastSender(workers, config)
    try:
        report = sender.publish(1, TensorSource(model(1)))
        assert (report.version, report.buckets, report.bytes) == (1, 3, 3 * 600_000)
        for weights, buffer_bytes in ray_cluster.get([w.received.remote() for w in workers]):
            assert all(torch.equal(weights[name], model(1)[name]) for name in "abc")
            # no whole-model receive buffer: each tensor arrived in its bucket's (< 1 MiB, the model is 1.8)
            assert len(buffer_bytes) == 3 and max(buffer_bytes) < MIB
    finally:
        sender.close()
        for worker in workers:
            ray_cluster.kill(worker)


def test_workers_refusing_part_way_or_up_front_keep_the_group_in_step_and_never_serve_half_a_model(ray_cluster):
    config = WeightSyncConfig(transport="broadcast", bucket_mb=1, timeout_s=60)
    other = {**model(0), "c": torch.zeros(10)}  # refuses every update up front: "c" has another shape
    workers = [ray_cluster.remote(StandInReceiver).options(num_cpus=0).remote(served) for served in (model(0), other)]
    sender = BroadcastSender(workers, config)
    try:
        # a NaN in the last bucket: worker 0 has loaded "a" and "b" when it finds it
        with pytest.raises(WeightSyncError, match=r"worker 0 refused weight version 1: .*c: contains NaN"):
            sender.publish(1, TensorSource(model(1, nan_in="c")))
        assert ray_cluster.get([w.served_version.remote() for w in workers]) == [UNSERVICEABLE, 0]
        # the collective completed for both (worker 1 refused before reading a bucket, then drained
        # them all): the group is still usable, and a good update makes worker 0 serve again
        with pytest.raises(WeightSyncError, match=r"worker 1 refused weight version 2: .*c: shape \(150000,\) != served \(10,\)"):
            sender.publish(2, TensorSource(model(2)))
        assert ray_cluster.get(workers[0].served_version.remote()) == 2
        weights, _ = ray_cluster.get(workers[0].received.remote())
        assert all(torch.equal(weights[name], model(2)[name]) for name in "abc")
        assert ray_cluster.get(workers[1].served_version.remote()) == 0
    finally:
        sender.close()
        for worker in workers:
            ray_cluster.kill(worker)
