"""The policies a run trains, behind one interface: each one's learner group, its weight stream and its
place in a checkpoint. One `TrainedPolicy` per entry of config `train`, built once at setup from the
fleet's learner groups; the loop updates, publishes, checkpoints and restores them alike.

    policy      learner group (rl/learners/)   learns from                 stream (Versions)  checkpoint folders
    ARPolicy    LearnerGroup (GRPO)            the step's token rollouts   policy             learner/, policy/
    Diffusion-  DiffusionLearnerGroup          the step's SDE rollouts     decoder            diffusion_learner/,
    Policy      (Flow-GRPO)                    (object store)              (transformer)      diffusion_policy/

Both take their advantages from the step's one reward, each with its own config (normalisation,
filtering); after a guard rollback the AR policy also takes the rollback's beta, the diffusion
policy keeps its own (`flow.beta`). Both hand the learner the step's reward regions too (spatial
credit: each learner projects them on its own grid, the AR tokens' or SANA's latents', when its
`spatial` is on).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from rl.guard.rules import Hyperparameters
from rl.objectives.grpo import SpatialCreditConfig, group_advantages
from rl.objectives.regions import ComponentRegions, component_regions
from rl.run.fleet import Fleet, Versions

if TYPE_CHECKING:
    from rl.learners.ar_config import LearnerConfig
    from rl.learners.ar_learner import LearnerMetrics
    from rl.learners.diffusion_config import DiffusionLearnerConfig
    from rl.learners.diffusion_learner import DiffusionLearnerMetrics
    from rl.run.config import TrainConfig
    from rl.run.pipeline import ScoredStep
    from rl.weight_sync import SyncReport

Publish = Callable[[Versions, int], "SyncReport | None"]
"""(versions, step) -> the sync report (None: a worker was lost and recovered on the way): `Fleet.publish*`."""


class TrainedPolicy(ABC):
    """One trained policy: update it from a step, publish it, save and restore it, scale its lr."""

    name: ClassVar[str]
    """Its entry in config `train` (and in `schedule.alternate`'s turns)."""
    learner_dir: ClassVar[str]
    """Checkpoint folder of the learner's own files (DeepSpeed engine, optimizer, lr schedule)."""
    export_dir: ClassVar[str]
    """Checkpoint folder of its export (what the workers load; a rollback proves its weights against it)."""
    key: ClassVar[str]
    """Suffix of its own time/ and sync keys ("" for the AR policy: time/update_diffusion, sync_diffusion/...)."""

    def __init__(self, group, section: LearnerConfig | DiffusionLearnerConfig, publish: Publish):
        self.group, self.section, self._publish = group, section, publish

    @property
    def lr(self) -> float:
        """The configured peak lr (a rollback scales it)."""
        return self.section.lr

    @property
    def world_size(self) -> int:
        return self.section.world_size

    @abstractmethod
    def version(self, versions: Versions) -> int:
        """This policy's version in `versions`."""

    @abstractmethod
    def serving(self, versions: Versions, version: int) -> Versions:
        """`versions` with this policy's stream at `version`."""

    @abstractmethod
    def update(self, scored: ScoredStep) -> LearnerMetrics | DiffusionLearnerMetrics:
        """One learner update on the step's rollouts, from this policy's own advantages."""

    def set_hyperparameters(self, hyper: Hyperparameters) -> None:
        """The lr (and the AR beta) after some guard rollbacks."""
        self.group.set_lr_scale(hyper.lr_scale)

    def publish(self, versions: Versions, step: int) -> SyncReport | None:
        return self._publish(versions, step)

    def save(self, checkpoint: Path) -> None:
        """The learner's files and the export, into a checkpoint being written."""
        self.group.save_checkpoint(str(checkpoint / self.learner_dir))
        self.group.export_policy(str(checkpoint / self.export_dir))

    def restore(self, checkpoint: Path, version: int | None = None) -> None:
        """The learner exactly as `checkpoint` saved it (`version`: serve it as this version)."""
        self.group.load_checkpoint(str(checkpoint / self.learner_dir), version)

    def weights_digest(self) -> str:
        """sha256 of the weights its export writes (rl/checkpoint.py `weights_digest`)."""
        return self.group.weights_digest()


class ARPolicy(TrainedPolicy):
    """The AR policy: GRPO on the image tokens (`learner`), served by every rollout and decoder worker."""

    name, learner_dir, export_dir, key = "ar", "learner", "policy", ""

    def version(self, versions: Versions) -> int:
        return versions.policy

    def serving(self, versions: Versions, version: int) -> Versions:
        return replace(versions, policy=version)

    def update(self, scored: ScoredStep) -> LearnerMetrics:
        advantages = group_advantages(scored.reward_tensor(), scored.batch.group_index, self.section.grpo)
        return self.group.train_step(scored.batch, advantages, step_regions(scored, self.section.grpo.spatial))

    def set_hyperparameters(self, hyper: Hyperparameters) -> None:
        self.group.set_hyperparameters(hyper.lr_scale, hyper.beta)


class DiffusionPolicy(TrainedPolicy):
    """SANA's transformer: Flow-GRPO on the SDE rollouts (`diffusion_learner`), served by the decoders."""

    name, learner_dir, export_dir, key = "diffusion", "diffusion_learner", "diffusion_policy", "_diffusion"

    def version(self, versions: Versions) -> int:
        return versions.decoder

    def serving(self, versions: Versions, version: int) -> Versions:
        return replace(versions, decoder=version)

    def update(self, scored: ScoredStep) -> DiffusionLearnerMetrics:
        """The rollouts stay in the object store: the learner ranks read them from there."""
        advantages = group_advantages(scored.reward_tensor(), scored.batch.group_index, self.section.flow)
        return self.group.train_step(scored.diffusion_rollout(), advantages,
                                     step_regions(scored, self.section.flow.spatial))


def step_regions(scored: ScoredStep, spatial: SpatialCreditConfig | None) -> list[ComponentRegions] | None:
    """The step's reward regions, one entry per mix component that answered some, with its weight;
    None without spatial credit (nothing to send the learner ranks)."""
    if spatial is None:
        return None
    mixed = scored.mixed
    return [component_regions(name, mixed.weights[name], rows) for name, rows in mixed.regions.items()]


def trained_policies(config: TrainConfig, fleet: Fleet) -> list[TrainedPolicy]:
    """The run's trained policies, AR first (the order of publishes, checkpoints and messages)."""
    policies: list[TrainedPolicy] = []
    if fleet.learner is not None:
        policies.append(ARPolicy(fleet.learner, config.learner, fleet.publish))
    if fleet.diffusion_learner is not None:
        policies.append(DiffusionPolicy(fleet.diffusion_learner, config.diffusion_learner, fleet.publish_decoder))
    return policies
