"""The rehearsal's own Ray cluster on this machine: one node, or two (a head and a second raylet,
each with its own temp dir and resources), holding exactly the role resources the config asks for.

    nodes 1:  head  = every role (rollout, decoder, reward, learner)
    nodes 2:  head  = rollout + decoder + reward        second raylet = learner (both learners' ranks)

With `ray.role_resources` each actor asks for its role's resource (rl/run/placement.py), so on two
nodes the learner ranks land on one raylet and the workers on the other: the weight-sync groups, the
reward calls and the object store then cross node boundaries as on a cluster (over loopback: one
machine, one /dev/shm, so the shared-memory transport still works where a real second host would
need the object store or broadcast). Built with Ray's `ray.cluster_utils.Cluster` (DESIGN.md).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rl.run.config import TrainConfig
from rl.run.placement import LOCAL_CLUSTER_SYSTEM_CONFIG, role_demands, total_demand

OBJECT_STORE_BYTES = 256 * 2**20
"""Object store per node: a rehearsal step moves a few MB (tiny weights, 64 px images, log-probs)."""


@dataclass(frozen=True)
class NodeSpec:
    """One raylet: its logical CPUs and custom resources."""

    roles: tuple[str, ...]
    cpus: int
    resources: dict[str, float]


def node_specs(config: TrainConfig, nodes: int) -> list[NodeSpec]:
    """The nodes of a rehearsal of `config` (1 or 2), each holding the total demand of its roles
    (rl/run/placement.py `role_demands`; CPUs rounded up, at least 1). Role resources exist only
    with `ray.role_resources`; without them two nodes still split the CPUs the same way."""
    if nodes not in (1, 2):
        raise ValueError(f"a rehearsal runs on 1 or 2 nodes, not {nodes}")
    groups = [("rollout", "decoder", "reward", "learner")] if nodes == 1 else [("rollout", "decoder", "reward"),
                                                                                ("learner",)]
    demands = role_demands(config)
    specs = []
    for roles in groups:
        total = total_demand([d for d in demands if d.role in roles])
        cpus = max(1, math.ceil(total.pop("CPU", 0.0) - 1e-9))
        total.pop("GPU", None)  # the rehearsal config asks for none
        specs.append(NodeSpec(roles, cpus, total))
    return specs


@contextmanager
def local_cluster(specs: list[NodeSpec], logs: Path) -> Iterator[str]:
    """Start the nodes (the first is the head) in temp dirs of their own; yields the address for
    `ray.init(address=...)`; at exit stops them, copies each node's Ray logs (the workers' output:
    vLLM, DeepSpeed, Serve, tracebacks) to `logs`/<session>/node-<i> and removes the temp dirs.

    RAY_TMPDIR is pointed at a private folder while the cluster runs, because Ray's test cluster
    writes its address to `$RAY_TMPDIR/ray/ray_current_cluster`, where a bare `ray.init()` of
    anyone else on the machine would find it and attach."""
    from ray.cluster_utils import Cluster

    root = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are capped
    os.makedirs(os.path.join(root, "ray"))
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = root
    cluster = None
    try:
        head, *others = specs
        cluster = Cluster(initialize_head=True, connect=False, head_node_args=_node_args(head, root, 0))
        for index, spec in enumerate(others, start=1):
            cluster.add_node(**_node_args(spec, root, index))
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        if cluster is not None:
            cluster.shutdown()
        for index in range(len(specs)):
            session = (Path(root) / f"n{index}" / "session_latest").resolve()
            if (session / "logs").is_dir():  # one folder per session: a resumed rehearsal keeps the earlier ones
                shutil.copytree(session / "logs", logs / session.name / f"node-{index}", symlinks=True)
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(root, ignore_errors=True)


def _node_args(spec: NodeSpec, root: str, index: int) -> dict:
    temp_dir = os.path.join(root, f"n{index}")
    os.makedirs(temp_dir, exist_ok=True)
    head = {"_system_config": LOCAL_CLUSTER_SYSTEM_CONFIG} if index == 0 else {}  # the head's settings are the cluster's
    return dict(num_cpus=spec.cpus, resources=dict(spec.resources), temp_dir=temp_dir,
                object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, **head)
