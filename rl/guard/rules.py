"""The reward-hacking guard: rules over each step's metrics that catch a reward being gamed.

    Trainer._guard_step(step, metrics)              rl/run/trainer.py: once a step, after its metrics (and eval)
      -> Guard.observe(step, metrics) -> [Firing]    this module: pure, no I/O, no Ray
      -> each firing: a `guard` event in the run store and a `guard:` console line
      -> config `guard.action`:
           warn      nothing more
           stop      the run's clean stop with a checkpoint, exit code 5
           rollback  restore the best-eval checkpoint (else the newest) among those older than the
                     excursion's first step (`Firing.since`), then train on with
                     `rollback_hyperparameters` (lower lr, higher beta); a firing after
                     `rollback.max_rollbacks` rollbacks stops the run instead (exit 5)
                     (rl/guard/rollback.py)

Rules (config `guard.rules`, rl/run/config.py):
    band                 metric m leaves [c - tol, c + tol] (absolute) or [c (1 - tol), c (1 + tol)]
                         (relative; tol times |c|), c = mean of m over the first `baseline_steps` steps
                         that logged it, for `patience` steps in a row. Fires once per excursion: again
                         only after m came back into the band.
    reward_up_eval_down  at a step with an eval point e_s: the oldest eval point e_o at most `window`
                         steps earlier; fires when e_o - e_s > min_eval_drop and R(s) - R(o) >
                         min_reward_rise, R(t) = mean training reward of the `reward_average` steps
                         ending at t. No eval points (no in-run eval): it never fires.

The guard's state (baseline values, recent points, streaks, the rollback count) is `GuardState`, a
pydantic model the trainer keeps as JSON beside the run's checkpoints. A resume or a rollback to
step k calls `forget_after(k)`: what the rules saw after k is dropped (those steps are redone),
the rollback count is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from rl.guard.config import BandRuleConfig, GuardSection, RewardEvalRuleConfig, RollbackSection


class Point(BaseModel):
    step: int
    value: float


class BandState(BaseModel):
    kind: Literal["band"] = "band"
    baseline: list[Point] = []
    """The first `baseline_steps` values (their mean is the band's centre)."""
    streak: list[int] = []
    """Steps of the current run of values outside the band."""
    fired_at: int | None = None
    """Step the current excursion fired at (None: not fired, or back inside since)."""


class RewardEvalState(BaseModel):
    kind: Literal["reward_up_eval_down"] = "reward_up_eval_down"
    rewards: list[Point] = []
    """Training reward of the last window + reward_average steps."""
    evals: list[Point] = []
    """Eval points of the last `window` steps."""


class GuardState(BaseModel):
    """Everything the guard carries from step to step; saved with the checkpoints."""

    rollbacks: int = 0
    """Rollbacks taken so far in this run (never forgotten: it bounds them)."""
    rules: list[Annotated[BandState | RewardEvalState, Field(discriminator="kind")]] = []
    """One per configured rule, in order."""


@dataclass(frozen=True)
class Firing:
    """One rule that fired at one step."""

    rule: str
    """Which rule, e.g. `band images/dark_share`."""
    step: int
    value: float
    """The value that tripped it (the metric; the eval score for reward_up_eval_down)."""
    detail: str
    """Why, with the numbers."""
    since: int
    """First step of the excursion: the first of the `patience` steps outside the band; for
    reward_up_eval_down the step after the earlier, better eval point. A rollback restores a
    checkpoint older than this step (a newer one holds weights from inside the excursion)."""

    def describe(self) -> str:
        return f"step {self.step}: {self.rule}: {self.detail}"


def _finite(metrics: Mapping[str, float | None], key: str | None) -> float | None:
    value = metrics.get(key) if key is not None else None
    return float(value) if value is not None and math.isfinite(value) else None


class BandRule:
    """A statistic leaving a band around its first-steps mean."""

    def __init__(self, config: BandRuleConfig, state: BandState):
        self.config, self.state = config, state

    @property
    def name(self) -> str:
        return f"band {self.config.metric}"

    def band(self) -> tuple[float, float, float] | None:
        """(centre, low, high) once the baseline is complete, else None."""
        config, baseline = self.config, self.state.baseline
        if len(baseline) < config.baseline_steps:
            return None
        centre = sum(p.value for p in baseline) / len(baseline)
        half = config.tolerance * abs(centre) if config.relative else config.tolerance
        return centre, centre - half, centre + half

    def observe(self, step: int, metrics: Mapping[str, float | None]) -> Firing | None:
        value, state = _finite(metrics, self.config.metric), self.state
        if value is None:
            return None
        band = self.band()
        if band is None:  # still measuring the first steps
            state.baseline.append(Point(step=step, value=value))
            return None
        centre, low, high = band
        if low <= value <= high:
            state.streak, state.fired_at = [], None
            return None
        state.streak.append(step)
        if len(state.streak) < self.config.patience or state.fired_at is not None:
            return None
        state.fired_at = step
        width = f"+-{self.config.tolerance:.0%}" if self.config.relative else f"+-{self.config.tolerance:g}"
        return Firing(self.name, step, value, f"{value:.4f} is outside [{low:.4f}, {high:.4f}] ({width} around "
                                              f"{centre:.4f}, its mean over steps "
                                              f"{state.baseline[0].step}-{state.baseline[-1].step}) for "
                                              f"{len(state.streak)} step(s)", since=state.streak[0])

    def forget_after(self, step: int) -> None:
        state = self.state
        state.baseline = [p for p in state.baseline if p.step <= step]
        state.streak = [s for s in state.streak if s <= step]
        if state.fired_at is not None and state.fired_at > step:
            state.fired_at = None


class RewardEvalRule:
    """The training reward going up while the in-run eval goes down."""

    def __init__(self, config: RewardEvalRuleConfig, state: RewardEvalState):
        self.config, self.state = config, state

    name = "reward_up_eval_down"

    def _eval_value(self, metrics: Mapping[str, float | None]) -> float | None:
        key = self.config.eval_metric
        if key is None:  # the in-run eval's score: eval/<bench>/score (rl/evaluation/in_run.py)
            key = next((k for k in metrics if k.startswith("eval/") and k.endswith("/score")), None)
        return _finite(metrics, key)

    def reward_at(self, step: int) -> float | None:
        """Mean training reward of the `reward_average` steps ending at `step` (those it saw)."""
        values = [p.value for p in self.state.rewards if step - self.config.reward_average < p.step <= step]
        return sum(values) / len(values) if values else None

    def observe(self, step: int, metrics: Mapping[str, float | None]) -> Firing | None:
        config, state = self.config, self.state
        reward = _finite(metrics, config.reward_metric)
        if reward is not None:
            state.rewards.append(Point(step=step, value=reward))
        state.rewards = [p for p in state.rewards if p.step > step - config.window - config.reward_average]
        state.evals = [p for p in state.evals if p.step >= step - config.window]
        score = self._eval_value(metrics)
        if score is None:
            return None
        earlier = [p for p in state.evals if p.step < step]
        state.evals.append(Point(step=step, value=score))
        if not earlier:
            return None
        oldest = earlier[0]
        before, now = self.reward_at(oldest.step), self.reward_at(step)
        if before is None or now is None:
            return None
        drop, rise = oldest.value - score, now - before
        if drop > config.min_eval_drop and rise > config.min_reward_rise:
            return Firing(self.name, step, score, f"eval score {oldest.value:.4f} (step {oldest.step}) -> {score:.4f} "
                                                  f"while the training reward rose {before:.4f} -> {now:.4f}",
                          since=oldest.step + 1)
        return None

    def forget_after(self, step: int) -> None:
        self.state.rewards = [p for p in self.state.rewards if p.step <= step]
        self.state.evals = [p for p in self.state.evals if p.step <= step]


class Guard:
    """Feed it every step's metrics (`observe`); it returns the rules that fired, as `Firing`s."""

    def __init__(self, config: GuardSection, state: GuardState | None = None):
        self.config = config
        state = state or GuardState()
        if not state.rules:
            state.rules = [BandState() if rule.kind == "band" else RewardEvalState() for rule in config.rules]
        if [s.kind for s in state.rules] != [rule.kind for rule in config.rules]:
            raise ValueError(f"guard state of rules {[s.kind for s in state.rules]} does not match the configured "
                             f"rules {[rule.kind for rule in config.rules]}")
        self._state = state
        self.rules = [BandRule(rule, s) if rule.kind == "band" else RewardEvalRule(rule, s)
                      for rule, s in zip(config.rules, state.rules)]

    @property
    def rollbacks(self) -> int:
        return self._state.rollbacks

    def observe(self, step: int, metrics: Mapping[str, float | None]) -> list[Firing]:
        """Check `step`'s metrics against every rule, in config order."""
        return [firing for rule in self.rules if (firing := rule.observe(step, metrics)) is not None]

    def forget_after(self, step: int) -> None:
        """Back to what the rules knew after `step` (a resume or a rollback redoes the later steps)."""
        for rule in self.rules:
            rule.forget_after(step)

    def count_rollback(self) -> int:
        """One more rollback; returns how many there were."""
        self._state.rollbacks += 1
        return self._state.rollbacks

    def state(self) -> GuardState:
        return self._state.model_copy(deep=True)


@dataclass(frozen=True)
class Hyperparameters:
    """What the learner trains with after some rollbacks (`LearnerRank.set_hyperparameters`)."""

    lr_scale: float
    """Multiplier of the configured peak lr."""
    beta: float
    """KL coefficient."""


def rollback_hyperparameters(rollback: RollbackSection, configured_beta: float, rollbacks: int) -> Hyperparameters:
    """lr x lr_scale^n and beta = rollback.beta (if set) after n >= 1 rollbacks; the config's before.
    A function of n alone, so a resumed run lands on the same values."""
    if rollbacks == 0:
        return Hyperparameters(1.0, configured_beta)
    beta = rollback.beta if rollback.beta is not None else configured_beta
    return Hyperparameters(rollback.lr_scale**rollbacks, beta)
