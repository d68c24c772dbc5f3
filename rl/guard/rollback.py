"""The guard in a run: what a firing does, and the rollback to a checkpoint.

    Trainer (rl/run/trainer.py), once a step, after its metrics (and eval):
      RunGuard.observe(step, metrics) -> [Firing]        the rules (rl/guard/rules.py)
      RunGuard.act(firings)             each firing: a `guard` event and a `guard:` console line; then
                                        config `guard.action`: warn -> None; stop -> GuardTripped (the
                                        run's clean stop, exit 5); rollback -> the Firing to roll back
                                        from (GuardTripped once `rollback.max_rollbacks` are taken)
      rollback_target(checkpoints, firing)
                                        the best-eval checkpoint, else the newest, among those OLDER
                                        than the excursion's first step (`Firing.since`): an eval can
                                        pin step s as best before the guard fires at s, and with
                                        patience p the excursion began p - 1 steps before the firing,
                                        so the newest checkpoints can hold the very weights that
                                        tripped it (or weights from inside the excursion)
      roll_back(guard, checkpoints, target, serving)
                                        restore every trained policy's learner from it exactly, as a
                                        resume would, under a new version (workers only take newer
                                        ones), proven bit for bit: the sha256 of its weights after the
                                        load must be the checkpoint export's; then lr x lr_scale^n
                                        (and the AR beta); what the rules saw after the target is
                                        forgotten and the later checkpoints are deleted (redone steps)
      the trainer then serves the restored weights (a publish of each) and trains on from there.

The guard's state is `guard.json` beside the run's checkpoints (temp file + rename), written after
each checkpoint and rollback; a resume takes it back without what it saw after the resumed step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rl.checkpoint import CheckpointDir, TrainerState, policy_digest
from rl.guard.config import GuardSection
from rl.guard.rules import Firing, Guard, GuardState, Hyperparameters, rollback_hyperparameters

GUARD_FILE = "guard.json"


class GuardTripped(Exception):
    """The guard fired with action `stop`, or with no rollback left (or no checkpoint to roll back to)."""


class Restorable(Protocol):
    """What a rollback needs of a trained policy (rl/run/policies.py `TrainedPolicy`)."""

    export_dir: str

    def restore(self, checkpoint: Path, version: int | None = None) -> None: ...

    def weights_digest(self) -> str: ...

    def set_hyperparameters(self, hyper: Hyperparameters) -> None: ...


class RunGuard(Guard):
    """The run's guard: the rules, their state file, the configured action."""

    def __init__(self, config: GuardSection, root: Path, configured_beta: float, log_event: Callable[[str, str], None],
                 state: GuardState | None = None):
        """`root`: the run's checkpoint folder; `configured_beta`: the AR learner's beta (0 without one)."""
        super().__init__(config, state)
        self.root, self.configured_beta, self.log_event = Path(root), configured_beta, log_event

    @classmethod
    def open(cls, config: GuardSection, root: Path, resumed_step: int, configured_beta: float,
             log_event: Callable[[str, str], None]) -> RunGuard:
        """A new guard, or a resumed run's from its `guard.json` (rollback count kept, what it saw after
        `resumed_step` dropped); ValueError if that file does not fit this config's rules."""
        saved = Path(root) / GUARD_FILE
        if resumed_step == 0 or not saved.is_file():
            return cls(config, root, configured_beta, log_event)
        try:
            guard = cls(config, root, configured_beta, log_event, GuardState.model_validate_json(saved.read_text()))
        except ValueError as error:
            raise ValueError(f"{saved} cannot be resumed with this config's guard: {error}") from None
        guard.forget_after(resumed_step)
        return guard

    def save(self) -> None:
        """Write the state beside the checkpoints (temp file + rename)."""
        tmp = self.root / (GUARD_FILE + ".tmp")
        tmp.write_text(self.state().model_dump_json())
        os.replace(tmp, self.root / GUARD_FILE)

    def hyperparameters(self) -> Hyperparameters:
        """lr scale and AR beta after the rollbacks taken so far (rl/guard/rules.py `rollback_hyperparameters`)."""
        return rollback_hyperparameters(self.config.rollback, self.configured_beta, self.rollbacks)

    def act(self, firings: Sequence[Firing]) -> Firing | None:
        """Record each firing (event and console); then the action: None (nothing fired, or warn), the
        firing to roll back from, or GuardTripped (stop, or no rollback left)."""
        for firing in firings:
            self.log_event("guard", firing.describe())
            print(f"guard: {firing.describe()}", flush=True)
        action, limit = self.config.action, self.config.rollback.max_rollbacks
        if not firings or action == "warn":
            return None
        if action == "stop":
            raise GuardTripped(firings[0].describe())
        if self.rollbacks >= limit:
            raise GuardTripped(f"{firings[0].describe()}; guard.rollback.max_rollbacks ({limit}) already taken")
        return firings[0]


def rollback_target(checkpoints: CheckpointDir, firing: Firing) -> Path:
    """The checkpoint a rollback from `firing` restores: among the checkpoints older than the
    excursion's first step, the best-eval one, else the newest. GuardTripped if there is none (none
    yet, or pruning kept only newer ones: `checkpoint.keep_last`)."""
    best = checkpoints.best_record()
    if best is not None and best.step < firing.since:
        return checkpoints.best()
    older = [step for step in checkpoints.complete_steps() if step < firing.since]
    if not older:
        raise GuardTripped(f"{firing.describe()}; no checkpoint to roll back to from before step {firing.since}, "
                           "where the excursion began")
    checkpoints.verify(checkpoints.path_for(older[-1]))
    return checkpoints.path_for(older[-1])


def restore_exactly(policy: Restorable, checkpoint: Path, version: int) -> str:
    """Load `policy`'s learner from `checkpoint` serving `version`, and prove it: the sha256 of its
    weights must be the checkpoint export's (RuntimeError otherwise). Returns `<export> sha256 <digest>`."""
    policy.restore(checkpoint, version)
    digest, expected = policy.weights_digest(), policy_digest(checkpoint / policy.export_dir)
    if digest != expected:
        raise RuntimeError(f"rollback to {checkpoint.name}: the {policy.export_dir} learner's weights (sha256 "
                           f"{digest[:16]}) differ from the checkpoint's export ({expected[:16]})")
    return f"{policy.export_dir} sha256 {digest}"


@dataclass(frozen=True)
class Rollback:
    """A rollback done: the learners serve the target's weights under new versions."""

    count: int
    """Rollbacks so far, this one included."""
    target: Path
    restored: TrainerState
    """The target's driver state (step, prompt sampler); its versions are the ones saved there."""
    digests: list[str]
    """`<export> sha256 <digest>` of each restored policy."""
    hyper: Hyperparameters
    """What the learners train with from now on."""


def roll_back(guard: RunGuard, checkpoints: CheckpointDir, target: Path,
              serving: Sequence[tuple[Restorable, int]]) -> Rollback:
    """Restore each trained policy (with the version it is to serve as, `serving`) from `target`
    (`rollback_target`), exactly; lower their lr; forget what came after the target (guard, checkpoints)."""
    restored = checkpoints.load_state(target)
    digests = [restore_exactly(policy, target, version) for policy, version in serving]
    count = guard.count_rollback()
    hyper = guard.hyperparameters()
    for policy, _ in serving:
        policy.set_hyperparameters(hyper)
    guard.forget_after(restored.step)
    checkpoints.discard_after(restored.step)
    guard.save()
    return Rollback(count, target, restored, digests, hyper)
