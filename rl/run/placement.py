"""Where each role runs: the Ray resources of one actor of every role, from the config, and the
check that the cluster has them all before any model loads.

    role      units                    one unit asks for
    rollout   rollout.workers          CPU, GPU (rollout.num_*_per_worker)         + {"rollout": 1}
    decoder   decoder.workers          CPU, GPU (decoder.decoder.num_*)            + {"decoder": 1}
    learner   learner.world_size       CPU, GPU (learner.num_*_per_rank), a bundle + {"learner": 1}
              (+ diffusion_learner.world_size, likewise, when the decoder is trained)
    reward    rewards.num_replicas     CPU, GPU (rewards.num_*), a Serve replica   + {"reward": 1}

The custom role resources (`+ {...}`) are asked for only with `ray.role_resources`: the cluster
definitions (deploy/cluster.yaml, deploy/kuberay-rayjob.yaml) give each role's nodes a resource of
the role's name, so an actor asking for it lands only there. All units exist at once for the whole
run, so the cluster must hold their sum; Ray would otherwise leave the extra ones pending forever.
The reward service counts only when the run starts it (`rewards.service: serve`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rl.run.config import ConfigError, TrainConfig

ROLES = ("rollout", "decoder", "learner", "reward")

LOCAL_CLUSTER_SYSTEM_CONFIG = {"num_workers_soft_limit": 32}
"""Ray settings of a cluster started here (`blip3o-rl train` without an address, the rehearsal's
nodes): keep up to 32 idle worker processes. Ray's default keeps one per CPU and kills an idle
worker above that after 1 s. Every step runs a few small tasks (a scoring task per chunk, the
guard's image statistics, the sample rows), so on a small node every step started new Python
processes that imported torch again: the 2-core demo, 14 steps at load ~30, started 66 worker
processes at 14.8 s a step; keeping them, 12 processes and 1.7 s a step. A cluster joined by
address keeps its own setting (`ray start --system-config`; nodes of many CPUs need none)."""


@dataclass(frozen=True)
class RoleDemand:
    """`units` actors of `role`, each asking Ray for `per_unit`."""

    role: str
    units: int
    per_unit: dict[str, float]

    @property
    def total(self) -> dict[str, float]:
        return {name: amount * self.units for name, amount in self.per_unit.items()}


def role_resources(config: TrainConfig, role: str) -> dict[str, float]:
    """The custom resources one actor of `role` asks for (empty unless `ray.role_resources`):
    what goes into Ray's `resources=` option."""
    if role not in ROLES:
        raise ValueError(f"unknown role '{role}'; expected one of {ROLES}")
    return {role: 1.0} if config.ray.role_resources else {}


def _unit(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
    unit = {"CPU": float(cpus)}
    if gpus > 0:
        unit["GPU"] = float(gpus)
    return {**unit, **custom}


def role_demands(config: TrainConfig) -> list[RoleDemand]:
    """What every role of this run asks Ray for (see the table above)."""
    demands = [
        RoleDemand("rollout", config.rollout.workers,
                   _unit(config.rollout.num_cpus_per_worker, config.rollout.num_gpus_per_worker,
                         role_resources(config, "rollout"))),
        RoleDemand("decoder", config.decoder.workers,
                   _unit(config.decoder.decoder.num_cpus, config.decoder.decoder.num_gpus,
                         role_resources(config, "decoder"))),
    ]
    for learner in (config.learner, config.diffusion_learner):  # both learners run on learner nodes
        if learner is not None:
            demands.append(RoleDemand("learner", learner.world_size,
                                      _unit(learner.num_cpus_per_rank, learner.num_gpus_per_rank,
                                            role_resources(config, "learner"))))
    if config.rewards.service == "serve":
        demands.append(RoleDemand("reward", config.rewards.num_replicas,
                                  _unit(config.rewards.num_cpus, config.rewards.num_gpus,
                                        role_resources(config, "reward"))))
    return demands


def total_demand(demands: list[RoleDemand]) -> dict[str, float]:
    total: dict[str, float] = {}
    for demand in demands:
        for name, amount in demand.total.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def check_cluster_fits(demands: list[RoleDemand], cluster: dict[str, float]) -> None:
    """ConfigError naming every resource the run needs more of than the cluster has in total
    (`cluster`: `ray.cluster_resources()`), and which roles ask for it."""
    problems = []
    for name, needed in sorted(total_demand(demands).items()):
        have = float(cluster.get(name, 0.0))
        if needed > have + 1e-9:
            askers = ", ".join(f"{d.role} {d.units} x {d.per_unit[name]:g}" for d in demands if d.per_unit.get(name))
            problems.append(f"{needed:g} {name} ({askers}) but the cluster has {have:g}")
    if problems:
        raise ConfigError("the config needs more than the Ray cluster has: " + "; ".join(problems)
                          + " (lower the counts in the config, or start the run on a cluster that has them; "
                          "custom role resources come from deploy/cluster.yaml / deploy/kuberay-rayjob.yaml)")
