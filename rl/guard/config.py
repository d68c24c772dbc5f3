"""The reward-hacking guard's config section: its rules and what a firing does (`rl/guard/rules.py`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class BandRuleConfig(BaseModel):
    """Fires when a metric leaves a band around its value in the run's first steps (rl/guard/rules.py)."""

    model_config = STRICT

    kind: Literal["band"]
    metric: str = Field(min_length=1)
    """A key the trainer logs every step, e.g. `images/dark_share` (rl/guard/image_stats.py)."""
    baseline_steps: int = Field(3, ge=1)
    """W: the band's centre is the metric's mean over the first W steps that logged it."""
    tolerance: float = Field(gt=0)
    """Half-width of the band: a fraction of |centre| (`relative`), else in the metric's unit."""
    relative: bool = True
    """tolerance as a fraction of the centre (True) or absolute (False)."""
    patience: int = Field(1, ge=1)
    """Steps in a row outside the band before the rule fires."""


class RewardEvalRuleConfig(BaseModel):
    """Fires when the training reward rose while the in-run eval score fell (rl/guard/rules.py); without
    in-run eval (`eval`) there are no eval points and it never fires."""

    model_config = STRICT

    kind: Literal["reward_up_eval_down"]
    window: int = Field(10, ge=1)
    """Steps looked back: a new eval point is compared with the oldest one at most this many steps before it."""
    eval_metric: str | None = None
    """Eval key to watch; None: the in-run eval's score (`eval/<bench>/score`)."""
    reward_metric: str = "reward/mean"
    """Training reward key."""
    reward_average: int = Field(3, ge=1)
    """The training reward at a step is the mean of this many steps ending there (one step is noisy)."""
    min_eval_drop: float = Field(0.0, ge=0)
    """The eval score must fall by more than this."""
    min_reward_rise: float = Field(0.0, ge=0)
    """...while the training reward rises by more than this."""


class RollbackSection(BaseModel):
    model_config = STRICT

    lr_scale: float = Field(0.5, gt=0, le=1)
    """Each rollback multiplies the learning rate by this: after n rollbacks lr = learner.lr x lr_scale^n."""
    beta: float | None = Field(None, ge=0)
    """KL coefficient from the first rollback on (None: learner.grpo.beta). Raising it from 0 loads the
    frozen reference (the model's initial weights) on every learner rank then."""
    max_rollbacks: int = Field(2, ge=1)
    """A firing after this many rollbacks stops the run instead (exit code 5)."""


class GuardSection(BaseModel):
    """The reward-hacking guard (rl/guard/rules.py): rules over each step's metrics and what a firing does."""

    model_config = STRICT

    rules: list[Annotated[BandRuleConfig | RewardEvalRuleConfig, Field(discriminator="kind")]] = Field(min_length=1)
    """Checked every step, in order."""
    action: Literal["warn", "stop", "rollback"] = "warn"
    """warn: a `guard` event and a console line; stop: also the clean stop with a checkpoint (exit 5);
    rollback: also restore the best-eval checkpoint (else the latest) and continue with `rollback`'s lr and beta."""
    rollback: RollbackSection = RollbackSection()
    """How training continues after a rollback."""
