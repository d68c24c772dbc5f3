"""Places the learner's DeepSpeed ranks (one `LearnerRank` actor each) and fans every call out.

    LearnerGroup (driver)
      |-- placement group: world_size bundles {CPU, GPU}, packed on as few nodes as possible
      |-- rank 0 .. rank W-1  (LearnerRank actors; rank 0 picks MASTER_ADDR / MASTER_PORT)
      '-- every call goes to all ranks (they run collectives together); rank 0's answer is returned

A rank that fails leaves its peers waiting inside a collective, so results are collected
fail-fast: the first error is raised at once, and nothing waits longer than `timeout_s`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rl.learners.ar_config import LearnerConfig
from rl.learners.ar_learner import LearnerMetrics, LearnerRank
from rl.objectives.grpo import GroupAdvantages
from rl.objectives.regions import ComponentRegions
from rl.weight_sync import SyncReport, WeightSyncConfig
from rollout.records import RolloutBatch


def _get_all(refs: list, timeout_s: float, what: str) -> list:
    """ray.get of all refs, raising the first failure as soon as it happens."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"learner ranks did not finish {what} within {timeout_s:.0f} s")
        try:
            ray.get(ready)
        except ray.exceptions.RayTaskError as error:  # the rank's own error, without Ray's wrapper
            raise (error.cause or error) from error
    return ray.get(refs)


class LearnerGroup:
    """The learner as one object: `train_step`, `connect_workers`, `publish_weights`, `gather_weights`."""

    def __init__(self, config: LearnerConfig, timeout_s: float = 1800.0, resources: dict[str, float] | None = None,
                 rank_class: type = LearnerRank):
        """`resources`: custom Ray resources of each rank (the learner role's, rl/run/placement.py), in
        its bundle and its actor options. `rank_class`: the rank actor (the diffusion learner's
        `DiffusionLearnerRank` shares this placement and fan-out)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.config, self.timeout_s = config, timeout_s
        resources = resources or {}
        bundle = {"CPU": config.num_cpus_per_rank, **resources}
        if config.num_gpus_per_rank > 0:
            bundle["GPU"] = config.num_gpus_per_rank
        self.placement = placement_group([dict(bundle) for _ in range(config.world_size)], strategy="PACK")
        ray.get(self.placement.ready(), timeout=timeout_s)
        actor_class = ray.remote(rank_class)
        self.ranks = [
            actor_class.options(
                num_cpus=config.num_cpus_per_rank,
                num_gpus=config.num_gpus_per_rank,
                resources=resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=rank),
            ).remote(config)
            for rank in range(config.world_size)
        ]
        master_addr, master_port = ray.get(self.ranks[0].master_endpoint.remote(), timeout=timeout_s)
        _get_all([r.setup.remote(i, master_addr, master_port) for i, r in enumerate(self.ranks)], timeout_s, "setup")

    def train_step(self, batch: RolloutBatch, advantages: GroupAdvantages,
                   regions: list[ComponentRegions] | None = None) -> LearnerMetrics:
        """`regions`: the step's reward regions (spatial credit; each rank projects them on its grid)."""
        import ray

        refs = ray.put(batch), ray.put(advantages), ray.put(regions)  # one copy, read by every rank
        return _get_all([r.train_step.remote(*refs) for r in self.ranks], self.timeout_s, "train_step")[0]

    def connect_workers(self, workers: list, sync: WeightSyncConfig | None = None) -> None:
        """Publish to these workers from now on (actor handles of ARRolloutWorker / DiffusionDecoderWorker);
        `sync` overrides the configured transport."""
        _get_all([r.connect_workers.remote(workers, sync) for r in self.ranks], self.timeout_s, "connect_workers")

    def publish_weights(self) -> SyncReport:
        """Send the current version to every worker; returns once each one serves it."""
        return _get_all([r.publish_weights.remote() for r in self.ranks], self.timeout_s, "publish_weights")[0]

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """What a publish sends (CPU copies): full AR weights, or the LoRA adapter."""
        return _get_all([r.gather_weights.remote() for r in self.ranks], self.timeout_s, "gather_weights")[0]

    def gather_base_weights(self) -> dict[str, torch.Tensor]:
        """The AR weights without any adapter (CPU copies): under LoRA the frozen base."""
        return _get_all([r.gather_base_weights.remote() for r in self.ranks], self.timeout_s,
                        "gather_base_weights")[0]

    def logprobs(self, batch: RolloutBatch, reference: bool = False) -> torch.Tensor:
        """Log-probs [R, N] of the batch's rows under the policy (or the KL reference), as the learner scores them."""
        import ray

        batch_ref = ray.put(batch)
        return _get_all([r.logprobs.remote(batch_ref, reference) for r in self.ranks], self.timeout_s, "logprobs")[0]

    def save_checkpoint(self, directory: str) -> None:
        """Engine state of every rank (ZeRO shards, optimizer, lr schedule) and the version; returns
        once every rank committed its part (`CheckpointDir.commit` then checks them)."""
        _get_all([r.save_checkpoint.remote(directory) for r in self.ranks], self.timeout_s, "save_checkpoint")

    def prove_shared_directory(self, root: str) -> None:
        """CheckpointError unless this process (the driver) reads the probe file each rank writes
        under `root`: checkpoints need that folder shared by the driver and every learner node."""
        import uuid

        from rl.checkpoint import check_probes

        nonce = uuid.uuid4().hex[:8]
        hosts = _get_all([r.write_probe.remote(root, nonce) for r in self.ranks], self.timeout_s, "write_probe")
        check_probes(Path(root), hosts, nonce)

    def load_checkpoint(self, directory: str, version: int | None = None) -> int:
        """Restore a `save_checkpoint`; returns the restored version (`version`: serve it as this one)."""
        return _get_all([r.load_checkpoint.remote(directory, version) for r in self.ranks], self.timeout_s,
                        "load_checkpoint")[0]

    def set_hyperparameters(self, lr_scale: float, beta: float) -> None:
        """Peak lr = config lr x `lr_scale` and KL coefficient `beta` from now on (a guard rollback)."""
        _get_all([r.set_hyperparameters.remote(lr_scale, beta) for r in self.ranks], self.timeout_s,
                 "set_hyperparameters")

    def set_lr_scale(self, lr_scale: float) -> None:
        """Peak lr = config lr x `lr_scale` (a guard rollback of a learner without the AR's beta)."""
        _get_all([r.set_lr_scale.remote(lr_scale) for r in self.ranks], self.timeout_s, "set_lr_scale")

    def weights_digest(self) -> str:
        """sha256 of the weights an export writes (rl/checkpoint.py `weights_digest`)."""
        return _get_all([r.weights_digest.remote() for r in self.ranks], self.timeout_s, "weights_digest")[0]

    def export_policy(self, directory: str) -> None:
        """The AR policy as a Hugging Face directory (what vLLM loads)."""
        _get_all([r.export_policy.remote(directory) for r in self.ranks], self.timeout_s, "export_policy")

    def policy_version(self) -> int:
        import ray

        return ray.get(self.ranks[0].policy_version.remote(), timeout=self.timeout_s)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:  # best effort: lets rank 0 remove its shared-memory file before the actors go
            ray.get([rank.close.remote() for rank in self.ranks], timeout=60)
        except ray.exceptions.RayError:
            pass
        for rank in self.ranks:
            ray.kill(rank)
        remove_placement_group(self.placement)
