"""The broadcast weight transport (rl/weight_sync.py) on gloo, with stand-in receivers on a real Ray
cluster: updates stream into the workers bucket by bucket, a worker refusing part-way neither
blocks the collective nor serves a half-loaded model, a group is ended on both sides when the
workers are connected again, even while a worker is blocked in one of its receives, and a decoder
is in one group per weight stream (AR policy, SANA transformer) at once."""

from __future__ import annotations

import time

import pytest
import torch

from policy.weights import AR_STREAM, UNSERVICEABLE, VersionedWeights, param_specs
from rl.weight_sync import (
    BroadcastSender,
    TensorSource,
    WeightSyncConfig,
    WeightSyncError,
    make_manifest,
    receive_broadcast,
)
from rollout.decoder_weights import TransformerWeightsHandle

MIB = 2**20


class StandInReceiver:
    """The receiving contract over a plain dict of tensors: the same checks as every worker
    (`VersionedWeights`); remembers the size of the buffer each received tensor arrived in."""

    weight_stream = AR_STREAM

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


class StandInDecoder(StandInReceiver):
    """A decoder worker's two weight streams: the AR policy (`update_weights`) and SANA's transformer
    (`update_decoder_weights`, reached through rollout/decoder_weights.py's TransformerWeightsHandle
    as the diffusion learner reaches it)."""

    def __init__(self, ar: dict[str, torch.Tensor], transformer: dict[str, torch.Tensor]):
        super().__init__(ar)
        self.transformer = StandInReceiver(transformer)

    def update_decoder_weights(self, version: int, weights) -> int:
        return self.transformer.update_weights(version, weights)

    def served_decoder_version(self) -> int:
        return self.transformer.served_version()

    def served(self) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        return self.served_version(), self.served_decoder_version(), self.weights["w"], self.transformer.weights["t"]

    def memberships(self) -> dict[str, str]:
        from rl import weight_sync

        return {name: membership.stream for name, membership in weight_sync._GROUPS.items()}


def test_a_decoder_is_in_one_group_per_weight_stream_and_reconnecting_one_keeps_the_other(ray_cluster):
    """The joint config's topology on gloo: the AR learner broadcasts to a rollout worker and a
    decoder, the diffusion learner to the decoder's transformer. Publishes alternate between the
    streams; reconnecting one stream (after a close, or as after a lost sender, without one) ends
    only that stream's older group. Before one group per stream, joining the transformer's group
    left the AR one and the first AR publish failed: here at once (gloo: the decoder had closed the
    group's sockets), on NCCL only after the group's timeout (10 s here, so never a hung suite)."""
    config = WeightSyncConfig(transport="broadcast", bucket_mb=1, timeout_s=10)

    def ar(v: int) -> dict[str, torch.Tensor]:
        return {"w": torch.full((1000,), float(v))}

    def transformer(v: int) -> dict[str, torch.Tensor]:
        return {"t": torch.full((500,), -float(v))}

    rollout = ray_cluster.remote(StandInReceiver).options(num_cpus=0).remote(ar(0))
    decoder = ray_cluster.remote(StandInDecoder).options(num_cpus=0).remote(ar(0), transformer(0))
    senders = {"ar": BroadcastSender([rollout, decoder], config),
               "transformer": BroadcastSender([TransformerWeightsHandle(decoder)], config)}
    weights = {"ar": ar, "transformer": transformer}

    def publish(stream: str, version: int) -> None:
        assert senders[stream].publish(version, TensorSource(weights[stream](version))).version == version

    def decoder_serves(ar_version: int, transformer_version: int) -> None:
        served_ar, served_transformer, w, t = ray_cluster.get(decoder.served.remote(), timeout=30)
        assert (served_ar, served_transformer) == (ar_version, transformer_version)
        assert torch.equal(w, ar(ar_version)["w"]) and torch.equal(t, transformer(transformer_version)["t"])

    def memberships() -> dict[str, str]:
        return ray_cluster.get(decoder.memberships.remote(), timeout=30)

    try:
        for version in (1, 2, 3):
            publish("ar", version)
            decoder_serves(version, version - 1)
            publish("transformer", version)
            decoder_serves(version, version)
        assert memberships() == {senders["ar"].name: "ar", senders["transformer"].name: "transformer"}
        assert ray_cluster.get(rollout.served_version.remote(), timeout=30) == 3
        # reconnect the AR stream as the learner's connect_workers does (close, then a new group)
        senders["ar"].close()
        senders["ar"] = BroadcastSender([rollout, decoder], config)
        assert memberships() == {senders["ar"].name: "ar", senders["transformer"].name: "transformer"}
        publish("transformer", 4)
        publish("ar", 4)
        decoder_serves(4, 4)
        # a new transformer group while the old sender never closed (a learner that died): joining
        # ends the decoder's older transformer group only
        lost = senders["transformer"]
        senders["transformer"] = BroadcastSender([TransformerWeightsHandle(decoder)], config)
        assert memberships() == {senders["ar"].name: "ar", senders["transformer"].name: "transformer"}
        publish("ar", 5)
        publish("transformer", 5)
        decoder_serves(5, 5)
        lost.close()  # ends its own side; the decoder already left that group
        assert ray_cluster.get(rollout.served_version.remote(), timeout=30) == 5
    finally:
        for sender in senders.values():
            sender.close()
        for worker in (rollout, decoder):
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
