"""Versioned weight sync: learner rank 0 -> every rollout and decoder worker, confirmed per version.

Every receiving worker keeps one contract (`WeightReceiver`): `update_weights(version, weights)`
with HF Qwen3 parameter names, returning the version it now serves (or raising
`policy.weights.WeightUpdateError`), and `served_version()`. A sender packs the full AR weights
into byte buffers described by a `Manifest`, moves the bytes with its transport, runs the matching
receive function inside each worker's process (Ray's `__ray_call__`: the function gets the worker
instance), which rebuilds `{name: tensor}` views over the received bytes and calls the worker's own
`update_weights`. The sender then asks every worker for `served_version()` and fails, naming the
worker, unless each one serves the new version.

Transports and rank layout:

    one machine, object store           one machine, shared memory
    learner rank 0 --ray.put(bytes)-->   learner rank 0 --write--> /dev/shm/blip3o-weights-*.bin
      worker i: zero-copy view of the      worker i: mmap of the file (page cache, no copy)
      plasma buffer (also /dev/shm)        (one file, rewritten every publish, removed at close)

    GPU cluster (or gloo on CPU), broadcast over a process group of its own:
      sync rank 0 = learner rank 0 --broadcast(bucket k), k = 0..K-1--+--> sync rank 1 = worker 0
                                                                       +--> sync rank 2 = worker 1
                                                                       +--> sync rank W = worker W-1
      The group has its own TCPStore on rank 0's node and is separate from DeepSpeed's group:
      learner ranks 1.. take part in the ZeRO gather only, never in the broadcast.

      A group is never reused once it failed or the workers were connected again (a restarted
      worker is a new process: it needs a new group). Dropping the Python object does not free the
      peers (NCCL communicators live on; any other reference keeps gloo's sockets open), so a group
      is ended explicitly on both sides: the sender sets CLOSED_KEY in the group's store, aborts its
      side and drops it (gloo closes its sockets, failing the peers' receives); a worker waiting in a
      receive checks that key every second and gives up on its own (aborting its side frees an NCCL
      wait); joining a new group aborts the worker's older group of the same weight stream.

      A worker process is in one group PER WEIGHT STREAM (`WeightReceiver.weight_stream`): a decoder
      worker receives the AR policy (from the AR learner's group) and SANA's transformer (from the
      diffusion learner's group), so reconnecting one stream never ends the other's group:

          AR learner rank 0 ---- group "blip3o-weights-a" ---+--> rollout workers (stream "ar")
                                                             +--> decoder workers (stream "ar")
          diffusion learner rank 0 -- group "blip3o-weights-t" --> decoder workers (stream "transformer")

Every sender reads its weights a bucket at a time from a `WeightSource` (`bucket_mb`): under
ZeRO-3 only one bucket of parameters is gathered at once (rl/learners/ar_learner.py), never the whole model.
The shared-memory and object-store workers read the whole update from the one buffer it was packed
into (no private copy) and check it whole before loading. Broadcast workers receive each bucket
into a buffer of its own and stream it into their model (`policy.weights.WeightStream`), so no
worker allocates a whole-model receive buffer; a worker that refuses part-way still receives every
bucket (the broadcast is a collective), then answers with its error.

Bytes reported are the payload (all parameters once); every worker receives that many.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ContextManager, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from policy.weights import ParamSpec, WeightStream, param_specs


class WeightSyncConfig(BaseModel):
    """How the learner publishes weights to the rollout and decoder workers (the transports are below)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    transport: Literal["object_store", "shared_memory", "broadcast"] = "shared_memory"
    """object_store / shared_memory: one machine; broadcast: a process group (NCCL on GPU, gloo on CPU)."""
    shm_dir: str = "/dev/shm"
    """Folder of the shared-memory files (must be a tmpfs visible to every worker)."""
    broadcast_backend: Literal["gloo", "nccl"] = "gloo"
    """Backend of the weight-sync process group."""
    broadcast_device: Literal["cpu", "cuda"] = "cpu"
    """Where the broadcast buffers live (cuda with nccl)."""
    bucket_mb: int = Field(256, gt=0)
    """Weights are gathered (ZeRO-3), packed and sent in buckets of at most this many MiB (a bigger
    tensor travels alone). It bounds what a publish adds on a learner rank and, over broadcast, on
    a worker (each bucket is streamed into the model as it arrives)."""
    timeout_s: float = Field(300.0, gt=0)
    """Give up (with an error naming the worker) if a worker has not confirmed within this time."""


ALIGN = 64
"""Byte alignment of every tensor inside a buffer (any dtype view stays aligned)."""


class WeightSyncError(RuntimeError):
    """A worker did not confirm a weight version (timed out, refused, or serves another version)."""


class WeightReceiver(Protocol):
    """What every worker serving the AR policy implements (ARRolloutWorker, DiffusionDecoderWorker;
    tests/support/receivers.py's TransformersReceiver), each through `policy.weights.VersionedWeights`;
    rollout/decoder_weights.py's TransformerReceiver is a decoder seen as a receiver of SANA's transformer."""

    weight_stream: str
    """Which of its process's weights it loads (`policy.weights.AR_STREAM`, `TRANSFORMER_STREAM`): a
    process keeps one broadcast group per stream."""

    def update_weights(self, version: int, weights: dict[str, torch.Tensor] | WeightStream) -> int: ...

    def served_version(self) -> int: ...


class WeightSource(Protocol):
    """What a sender publishes: every tensor's name, full shape and dtype, and the whole tensors of
    one bucket at a time (under ZeRO-3 gathering them is a collective of every learner rank)."""

    @property
    def specs(self) -> dict[str, ParamSpec]: ...

    def gathered(self, names: Sequence[str]) -> ContextManager[Mapping[str, torch.Tensor]]: ...


@dataclass
class TensorSource:
    """Whole tensors already in memory (a non-ZeRO-3 learner, an adapter, tests and benchmarks)."""

    weights: Mapping[str, torch.Tensor]

    @property
    def specs(self) -> dict[str, ParamSpec]:
        return param_specs(self.weights)

    @contextlib.contextmanager
    def gathered(self, names: Sequence[str]) -> Iterator[Mapping[str, torch.Tensor]]:
        yield {name: self.weights[name] for name in names}


# ---------------------------------------------------------------------------------------------
# Packing: {name: tensor} <-> byte buckets + manifest


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    slots: tuple[TensorSlot, ...]
    bucket_bytes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    @property
    def bucket_starts(self) -> tuple[int, ...]:
        """Where each bucket begins when all are laid end to end in one buffer (aligned)."""
        starts, end = [], 0
        for size in self.bucket_bytes:
            starts.append(-(-end // ALIGN) * ALIGN)
            end = starts[-1] + size
        return tuple(starts)

    @property
    def flat_bytes(self) -> int:
        return self.bucket_starts[-1] + self.bucket_bytes[-1]

    def bucket_names(self, bucket: int) -> list[str]:
        return [slot.name for slot in self.slots if slot.bucket == bucket]

    def specs(self) -> dict[str, ParamSpec]:
        return {slot.name: ParamSpec(slot.shape, getattr(torch, slot.dtype)) for slot in self.slots}


def make_manifest(specs: Mapping[str, ParamSpec], bucket_limit: int | None = None) -> Manifest:
    """Lay tensors out in buckets of at most `bucket_limit` bytes (a bigger tensor gets its own)."""
    if not specs:
        raise ValueError("no weights to publish")
    slots, buckets, used = [], [], 0
    for name, spec in specs.items():
        nbytes = int(np.prod(spec.shape, dtype=np.int64)) * spec.dtype.itemsize
        start = -(-used // ALIGN) * ALIGN
        if not buckets or (bucket_limit is not None and used > 0 and start + nbytes > bucket_limit):
            buckets.append(0)
            start = 0
        dtype = str(spec.dtype).removeprefix("torch.")
        slots.append(TensorSlot(name, dtype, tuple(spec.shape), len(buckets) - 1, start, nbytes))
        used = start + nbytes
        buckets[-1] = used
    return Manifest(tuple(slots), tuple(buckets))


def pack_bucket(weights: Mapping[str, torch.Tensor], manifest: Manifest, bucket: int, out: torch.Tensor) -> None:
    """Copy the tensors of `bucket` into the uint8 buffer `out` [bucket_bytes]."""
    for slot in manifest.slots:
        if slot.bucket == bucket:
            src = weights[slot.name].detach().contiguous().reshape(-1).view(torch.uint8)  # [nbytes]
            out[slot.offset : slot.offset + slot.nbytes].copy_(src, non_blocking=True)


def pack_from(source: WeightSource, manifest: Manifest, buffer_of) -> Iterator[torch.Tensor]:
    """Gather and pack one bucket at a time into `buffer_of(bucket)`; yields each packed buffer
    (the next bucket is gathered only when the caller asks for it)."""
    for bucket in range(len(manifest.bucket_bytes)):
        out = buffer_of(bucket)
        with source.gathered(manifest.bucket_names(bucket)) as tensors:
            pack_bucket(tensors, manifest, bucket, out)
        yield out


def pack_flat(source: WeightSource, manifest: Manifest, flat: torch.Tensor) -> None:
    """Gather and pack every bucket, one at a time, into one buffer of `manifest.flat_bytes`
    (shared memory, object store; `flat_buckets` lays them out)."""
    for _ in pack_from(source, manifest, flat_buckets(flat, manifest).__getitem__):
        pass


def unpack_bucket(buffer: torch.Tensor, manifest: Manifest, bucket: int) -> dict[str, torch.Tensor]:
    """Views `{name: tensor}` of one bucket's tensors over its received uint8 buffer (no copy)."""
    out = {}
    for slot in manifest.slots:
        if slot.bucket == bucket:
            raw = buffer[slot.offset : slot.offset + slot.nbytes]  # [nbytes] uint8
            out[slot.name] = raw.view(getattr(torch, slot.dtype)).view(slot.shape)
    return out


def unpack(buffers: Sequence[torch.Tensor], manifest: Manifest) -> dict[str, torch.Tensor]:
    """Views `{name: tensor}` over all the received uint8 buffers (no copy)."""
    return {name: t for bucket, buffer in enumerate(buffers) for name, t in unpack_bucket(buffer, manifest, bucket).items()}


def flat_buckets(flat: torch.Tensor, manifest: Manifest) -> list[torch.Tensor]:
    """The buckets as slices of one buffer of `manifest.flat_bytes` (shared memory, object store)."""
    return [flat[start : start + size] for start, size in zip(manifest.bucket_starts, manifest.bucket_bytes)]


# ---------------------------------------------------------------------------------------------
# Senders (run in learner rank 0) and receive functions (run inside each worker via __ray_call__)


@dataclass
class SyncReport:
    """One publish: every worker confirmed `version`."""

    version: int
    transport: str
    bytes: int
    """Payload: every parameter once (each worker receives this many)."""
    seconds: float
    """Packing + transport + every worker loading + confirmation."""
    pack_seconds: float
    """Of which: copying the weights into the send buffer."""
    workers: int
    buckets: int
    """Buckets the weights were gathered and packed in (`bucket_mb`)."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def _confirm(workers: Sequence, update_refs: list, version: int, timeout_s: float) -> None:
    """Wait for every worker's update, then check that each one serves `version`."""
    import ray

    ready, pending = ray.wait(update_refs, num_returns=len(update_refs), timeout=timeout_s)
    if pending:
        late = [i for i, ref in enumerate(update_refs) if ref in pending]
        raise WeightSyncError(f"workers {late} did not confirm weight version {version} within {timeout_s:.0f} s")
    answered = []
    for i, ref in enumerate(update_refs):
        try:
            answered.append(ray.get(ref))
        except Exception as error:  # the worker's own error (e.g. WeightUpdateError) inside a RayTaskError
            cause = getattr(error, "cause", None) or error
            raise WeightSyncError(
                f"worker {i} refused weight version {version}: {type(cause).__name__}: {cause}") from error
    # Ask again rather than trust the update's return value alone: the version a worker reports
    # serving is what every later rollout will be stamped with.
    served = ray.get([w.served_version.remote() for w in workers], timeout=timeout_s)
    wrong = {i: (a, s) for i, (a, s) in enumerate(zip(answered, served)) if a != version or s != version}
    if wrong:
        raise WeightSyncError(f"after publishing version {version}, workers answered/serve {wrong} "
                              "(worker: (update's answer, served_version))")


def _tensor_view(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only plasma / mmap buffer: the worker copies, never writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class ObjectStoreSender:
    """One `ray.put` of the packed bytes; workers read it zero-copy from the object store."""

    transport = "object_store"

    def __init__(self, workers: Sequence, config: WeightSyncConfig):
        self.workers, self.config = list(workers), config

    def publish(self, version: int, source: WeightSource) -> SyncReport:
        import ray

        start = time.perf_counter()
        manifest = make_manifest(source.specs, self.config.bucket_mb * 2**20)
        buffer = np.empty(manifest.flat_bytes, dtype=np.uint8)  # [bytes] (every bucket, end to end)
        pack_flat(source, manifest, torch.from_numpy(buffer))
        ref = ray.put(buffer)
        packed = time.perf_counter()
        refs = [w.__ray_call__.remote(receive_from_object_store, manifest, ref, version) for w in self.workers]
        _confirm(self.workers, refs, version, self.config.timeout_s)
        del ref
        return SyncReport(version, self.transport, manifest.total_bytes, time.perf_counter() - start, packed - start,
                          len(self.workers), len(manifest.bucket_bytes))

    def close(self) -> None:
        pass


def receive_from_object_store(worker: WeightReceiver, manifest: Manifest, buffer: np.ndarray, version: int) -> int:
    return worker.update_weights(version, unpack(flat_buckets(_tensor_view(buffer), manifest), manifest))


class SharedMemorySender:
    """Packs straight into one file on tmpfs, reused every publish (its pages stay allocated);
    workers map it. Every worker must be on this machine. Reuse is safe because a publish returns
    only after every worker has copied the weights; after a failed publish the file is dropped so a
    late worker never reads a half-overwritten buffer."""

    transport = "shared_memory"

    def __init__(self, workers: Sequence, config: WeightSyncConfig):
        self.workers, self.config = list(workers), config
        if not os.path.isdir(config.shm_dir):
            raise ValueError(f"shared-memory folder {config.shm_dir} does not exist")
        self.path: str | None = None
        self.mapped: np.memmap | None = None

    def _buffer(self, size: int) -> torch.Tensor:
        if self.mapped is None or self.mapped.shape[0] != size:
            self.close()
            self.path = os.path.join(self.config.shm_dir, f"blip3o-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
            self.mapped = np.memmap(self.path, dtype=np.uint8, mode="w+", shape=(size,))
        return torch.from_numpy(self.mapped)  # [size] uint8

    def publish(self, version: int, source: WeightSource) -> SyncReport:
        start = time.perf_counter()
        manifest = make_manifest(source.specs, self.config.bucket_mb * 2**20)
        pack_flat(source, manifest, self._buffer(manifest.flat_bytes))
        packed = time.perf_counter()
        refs = [w.__ray_call__.remote(receive_from_shared_memory, manifest, self.path, version) for w in self.workers]
        try:
            _confirm(self.workers, refs, version, self.config.timeout_s)
        except Exception:
            self.close()
            raise
        return SyncReport(version, self.transport, manifest.total_bytes, time.perf_counter() - start, packed - start,
                          len(self.workers), len(manifest.bucket_bytes))

    def close(self) -> None:
        """Drop the file (a worker still reading keeps its own mapping of it)."""
        self.mapped = None
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)
        self.path = None


def receive_from_shared_memory(worker: WeightReceiver, manifest: Manifest, path: str, version: int) -> int:
    if not os.path.exists(path):
        raise WeightSyncError(
            f"{path} not found: the shared-memory transport needs every worker on the learner's machine")
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: never alters the file
    return worker.update_weights(version, unpack(flat_buckets(torch.from_numpy(mapped), manifest), manifest))


CLOSED_KEY = "closed"
"""Set in a group's store by the sender when it ends the group."""
CLOSED_CHECK_S = 1.0
"""How often a worker waiting in a receive looks for CLOSED_KEY."""


@dataclass
class Membership:
    """A weight-sync group this worker process joined, the store it was formed over, and the weight
    stream it carries."""

    group: object
    store: object
    stream: str


_GROUPS: dict[str, Membership] = {}
"""Weight-sync process groups (c10d backends) this process has joined, by name (lives in each worker process)."""
_ABANDONED: list[tuple[object, object]] = []
"""(group, receive in flight) this worker gave up on while the sender's side was still open: gloo's
destructor would wait for that receive, so they are kept until it has ended (purged at each join)."""


def _new_group(name: str, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float, store=None):
    """A process group of its own (not torch.distributed's default one) and its prefixed store."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = torch.distributed.TCPStore(host, port, world, is_master=False, timeout=timeout)
    prefixed = torch.distributed.PrefixStore(name, store)
    if backend == "nccl":  # untested here (CPU-only machine); same construction as vLLM's stateless groups
        options = torch.distributed.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return torch.distributed.ProcessGroupNCCL(prefixed, rank, world, options), prefixed
    return torch.distributed.ProcessGroupGloo(prefixed, rank, world, timeout), prefixed


def _abort(group) -> None:
    """Abort a group this process is in: NCCL aborts its communicators (failing its operations in
    flight); gloo has nothing to abort, its sockets close when the object goes. Best effort: a
    group that already failed may refuse."""
    try:
        group.abort()
    except RuntimeError:
        pass


def join_broadcast_group(worker: WeightReceiver, name: str, host: str, port: int, rank: int, world: int,
                         backend: str, timeout_s: float) -> int:
    """Join the group `name` for `worker.weight_stream`, leaving (aborting) that stream's older group:
    per stream, a worker is in the newest group only; the groups of its other streams stay."""
    stream = worker.weight_stream
    for old in [old for old, membership in _GROUPS.items() if membership.stream == stream]:
        leave_broadcast_group(worker, old)
    _ABANDONED[:] = [(group, work) for group, work in _ABANDONED if not work.is_completed()]
    group, store = _new_group(name, host, port, rank, world, backend, timeout_s)
    _GROUPS[name] = Membership(group, store, stream)
    return rank


def leave_broadcast_group(worker: WeightReceiver, name: str) -> None:
    membership = _GROUPS.pop(name, None)
    if membership is not None:
        _abort(membership.group)


def _broadcast(group, tensor: torch.Tensor) -> None:
    options = torch.distributed.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def _closed(store) -> bool:
    """The sender ended the group (or its store is gone with it)."""
    try:
        return store.check([CLOSED_KEY])
    except RuntimeError:  # the sender's TCPStore went away
        return True


def _receive(name: str, membership: Membership, buffer: torch.Tensor) -> None:
    """One bucket of the broadcast, given up on (WeightSyncError) once the sender ends the group."""
    options = torch.distributed.BroadcastOptions()
    options.rootRank = 0
    work = membership.group.broadcast([buffer], options)
    checked = time.monotonic()
    while not work.is_completed():  # polled: a timed-out wait() may abort an NCCL communicator
        time.sleep(0.001)
        if time.monotonic() - checked > CLOSED_CHECK_S:
            checked = time.monotonic()
            if _closed(membership.store):
                _GROUPS.pop(name, None)
                _abort(membership.group)
                _ABANDONED.append((membership.group, work))
                raise WeightSyncError(f"the sender ended weight-sync group '{name}' during a receive")
    try:
        work.wait()  # raises the operation's error; on NCCL also orders the stream after it
    except RuntimeError:
        leave_broadcast_group(None, name)  # a group that failed is not used again
        raise


class BroadcastBuckets:
    """The buckets of one broadcast, received as the worker's update reads them, each into a buffer
    of its own (the load may still hold earlier buckets' tensors). `drain` receives what the update
    did not read, so the collective completes even when a worker refused the update part-way."""

    def __init__(self, name: str, membership: Membership, manifest: Manifest, device: str):
        self.name, self.membership, self.manifest, self.device = name, membership, manifest, device
        self.received = 0
        self.broken = False

    def _receive(self, buffer: torch.Tensor) -> None:
        try:
            _receive(self.name, self.membership, buffer)
        except BaseException:
            self.broken = True  # the group is gone: nothing more will arrive
            raise
        self.received += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for bucket, size in enumerate(self.manifest.bucket_bytes):
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)  # [bytes_k]
            self._receive(buffer)
            yield unpack_bucket(buffer, self.manifest, bucket)

    def drain(self) -> None:
        rest = self.manifest.bucket_bytes[self.received:]
        if self.broken or not rest:
            return
        scratch = torch.empty(max(rest), dtype=torch.uint8, device=self.device)
        for size in rest:
            self._receive(scratch[:size])


def receive_broadcast(worker: WeightReceiver, name: str, manifest: Manifest, device: str, version: int) -> int:
    membership = _GROUPS.get(name)
    if membership is None:
        raise WeightSyncError(f"this worker is not in weight-sync group '{name}' (never joined, or it ended)")
    buckets = BroadcastBuckets(name, membership, manifest, device)
    try:
        return worker.update_weights(version, WeightStream(manifest.specs(), buckets))
    finally:
        buckets.drain()


class BroadcastSender:
    """A process group of learner rank 0 (sync rank 0) and the workers; weights go out in buckets."""

    transport = "broadcast"

    def __init__(self, workers: Sequence, config: WeightSyncConfig):
        import ray

        self.workers, self.config = list(workers), config
        self.name = f"blip3o-weights-{uuid.uuid4().hex[:8]}"
        world = len(self.workers) + 1
        host = ray.util.get_node_ip_address()
        timeout = datetime.timedelta(seconds=config.timeout_s)
        store = torch.distributed.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        joins = [
            w.__ray_call__.remote(join_broadcast_group, self.name, host, store.port, rank + 1, world,
                                  config.broadcast_backend, config.timeout_s)
            for rank, w in enumerate(self.workers)
        ]
        # Constructing the group is a rendezvous with every worker's join above.
        self.group, self.prefixed_store = _new_group(self.name, host, store.port, 0, world,
                                                     config.broadcast_backend, config.timeout_s, store)
        self.store = store
        ray.get(joins, timeout=config.timeout_s)

    def publish(self, version: int, source: WeightSource) -> SyncReport:
        if self.group is None:
            raise WeightSyncError(f"weight-sync group '{self.name}' is closed or broken: connect the workers again")
        start = time.perf_counter()
        manifest = make_manifest(source.specs, self.config.bucket_mb * 2**20)
        refs = [w.__ray_call__.remote(receive_broadcast, self.name, manifest, self.config.broadcast_device, version)
                for w in self.workers]
        buffer = torch.empty(max(manifest.bucket_bytes), dtype=torch.uint8, device=self.config.broadcast_device)
        pack_seconds = 0.0
        try:
            pack_start = time.perf_counter()
            for packed in pack_from(source, manifest, lambda bucket: buffer[:manifest.bucket_bytes[bucket]]):
                pack_seconds += time.perf_counter() - pack_start
                _broadcast(self.group, packed)
                pack_start = time.perf_counter()
        except RuntimeError as error:  # c10d: a member process died ("Connection closed by peer") or timed out
            # A process group cannot lose a member: end ours at once, which also frees the other
            # workers blocked in its receives, so they answer again.
            self._end_group()
            raise WeightSyncError(f"broadcasting weight version {version} failed (a worker process died?): "
                                  f"{str(error).splitlines()[0][:300]}") from error
        _confirm(self.workers, refs, version, self.config.timeout_s)
        return SyncReport(version, self.transport, manifest.total_bytes, time.perf_counter() - start, pack_seconds,
                          len(self.workers), len(manifest.bucket_bytes))

    def _end_group(self) -> None:
        """Tell the workers the group is over, abort our side and drop it (gloo closes its sockets)."""
        if self.group is None:
            return
        try:
            self.prefixed_store.set(CLOSED_KEY, "1")
        except RuntimeError:
            pass  # the store is ours; it only fails if this process is going down anyway
        _abort(self.group)
        self.group = self.prefixed_store = self.store = None

    def close(self) -> None:
        """End the group (first: a worker still blocked in a receive of it is freed), then ask every
        worker to leave it. Best effort: workers that died have no group left to leave."""
        import ray

        self._end_group()
        refs = [w.__ray_call__.remote(leave_broadcast_group, self.name) for w in self.workers]
        for ref in refs:
            try:
                ray.get(ref, timeout=self.config.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass


SENDERS = {"object_store": ObjectStoreSender, "shared_memory": SharedMemorySender, "broadcast": BroadcastSender}


def make_sender(config: WeightSyncConfig, workers: Sequence):
    """The sender for `config.transport`, built once at setup (the broadcast one forms its group here)."""
    if not workers:
        raise ValueError("no workers to publish weights to")
    return SENDERS[config.transport](workers, config)
