"""The run's reward: a weighted sum of reward components, each raw or normalized within its prompt group.

    total_b   = sum over the components c that apply to row b of  w_c * term_c(b)
    term_c(b) = r_c(b)                                          normalize: none
              = (r_c(b) - mean_g(r_c)) / (std_g(r_c) + eps)      normalize: group   (g = b's prompt group)

std_g is the unbiased sample std over the group's rows (as rl/objectives/grpo.py's advantages) and eps =
GROUP_EPS = 1e-4 (BLIP3o-NEXT's advantage eps). Zero-std rule: a group whose values of a component
are all equal, or that has a single row, carries no signal from that component, so its term is 0 on
every row of the group (never r / eps). Normalizing before weighting puts rewards of different
scales on one footing, so one reward's scale cannot drown another's; GRPO then computes its
advantages from the total exactly as before (rl/objectives/grpo.py is not touched).

A task component (scorer `ocr` / `geneval`) scores only the rows whose prompt has that task; on
other rows it does not apply (NaN in the raw values) and adds nothing to their total. Every other
component (a generic scorer the reward service runs, `python`, `http`) scores every row. A group
shares one prompt, hence one task: a component applies to all of a group's rows or to none.

Without `rewards.mix` the mix is one raw task component of weight 1 per task of the prompts, named
after the task: total = the task reward, bit for bit the reward of runs before mixes existed.

Regions (spatial credit): a component whose scorer answers `details.regions` keeps them per row
(`MixedRewards.regions`). They combine like `normalize: group` terms: each component's regions are
normalised within the prompt group on their own (whatever that component's `normalize`), then
weighted by its `weight` and summed where several components' regions cover the same grid cell
(rl/objectives/regions.py `local_advantages`). The scalar total above is not touched by them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from rewards.scorer import BUILTIN_SCORERS

TASK_SCORERS = ("ocr", "geneval")
"""Scorers with their own route and request (a target text / GenEval metadata): they score the
prompts of their task only."""
GROUP_EPS = 1e-4
"""eps of the group normalization (BLIP3o-NEXT's / TRL's advantage eps)."""
RESERVED_NAMES = ("mean", "std")
"""reward/mean and reward/std are the total's metrics."""

ScorerKind = Literal["task", "served", "http", "python"]


class RewardComponentConfig(BaseModel):
    """One reward of the run's mix (`rewards.mix` in the run config)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    """Its key: the metric `reward/<name>`, the sample records, events; a python scorer is served
    under this name."""
    scorer: str = Field(min_length=1)
    """ocr | geneval (the task rewards, on prompts of that task), http (`url`), python
    (`function`, loaded inside the reward service), or the name of a generic scorer the reward
    service runs (compressibility, pickscore, ...: see its /readyz)."""
    weight: float = 1.0
    """Its weight in the total."""
    normalize: Literal["none", "group"] = "none"
    """none: the raw reward; group: centred and scaled within each prompt group before weighting."""
    url: str | None = None
    """http: the URL answering `POST {url}` with the generic protocol (docs/rewards.md, "Your own scorer over HTTP")."""
    function: str | None = None
    """python: "module:function" of f(images, prompts, metadatas) -> one reward per image."""
    token: str | None = None
    """http: bearer token the scorer wants (None = open)."""
    max_items: int = Field(32, ge=1)
    """http: most items per request when the scorer's /readyz states no limits."""
    outage_budget_s: float | None = Field(None, gt=0)
    """How long this scorer may keep failing (5xx, connection errors) before the run stops;
    None: rewards.outage_budget_s. Each scorer has its own clock."""

    @model_validator(mode="after")
    def _fields_fit_the_scorer(self) -> "RewardComponentConfig":
        if self.name in RESERVED_NAMES:
            raise ValueError(f"reward name '{self.name}' is taken by the total's metric reward/{self.name}")
        if not math.isfinite(self.weight):
            raise ValueError(f"reward {self.name}: weight must be finite")
        if (self.scorer == "http") != (self.url is not None):
            raise ValueError(f"reward {self.name}: `url` goes with scorer http, and scorer http needs one")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"reward {self.name}: url '{self.url}' is not http(s)://")
        if (self.scorer == "python") != (self.function is not None):
            raise ValueError(f"reward {self.name}: `function` goes with scorer python, and scorer python needs one")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"reward {self.name}: function '{self.function}' is not 'module:function'")
        if self.scorer == "python" and (self.name in TASK_SCORERS or self.name in BUILTIN_SCORERS):
            raise ValueError(f"python reward '{self.name}' would shadow the built-in scorer of that name")
        if self.token is not None and self.scorer != "http":
            raise ValueError(f"reward {self.name}: `token` is for http scorers (the service's is rewards.token)")
        return self

    @property
    def kind(self) -> ScorerKind:
        if self.scorer in TASK_SCORERS:
            return "task"
        return self.scorer if self.scorer in ("http", "python") else "served"

    @property
    def served_name(self) -> str | None:
        """Its scorer's name on the reward service (None: an http scorer, reached at its own URL)."""
        if self.kind == "http":
            return None
        return self.name if self.kind == "python" else self.scorer

    def applies_to(self, task: str) -> bool:
        """Whether it scores a row whose prompt has this task."""
        return self.kind != "task" or self.scorer == task


def _unique_names(components: list[RewardComponentConfig]) -> list[RewardComponentConfig]:
    names = [c.name for c in components]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"reward names must be unique: {', '.join(twice)} appear more than once")
    return components


RewardMix = Annotated[list[RewardComponentConfig], Field(min_length=1), AfterValidator(_unique_names)]
"""`rewards.mix`: the run's rewards."""


def resolve_mix(mix: Sequence[RewardComponentConfig] | None, tasks: Iterable[str]) -> tuple[RewardComponentConfig, ...]:
    """The run's components: the configured mix, or (None) one raw task reward per task of the prompts."""
    if mix:
        return tuple(mix)
    return tuple(RewardComponentConfig(name=task, scorer=task) for task in TASK_SCORERS if task in set(tasks))


def uncovered_tasks(components: Sequence[RewardComponentConfig], tasks: Iterable[str]) -> list[str]:
    """Prompt tasks no component scores (their rows would get no reward at all)."""
    return sorted(task for task in set(tasks) if not any(c.applies_to(task) for c in components))


# ---------------------------------------------------------------------------------------------
# The math


def group_normalize(values: np.ndarray, group_index: np.ndarray, eps: float = GROUP_EPS) -> np.ndarray:
    """(v - mean_g) / (std_g + eps) within each group (unbiased std); 0 for a group with one row
    or all-equal values; NaN (does not apply) stays NaN."""
    values = np.asarray(values, dtype=np.float64)  # [R]
    group_index = np.asarray(group_index)  # [R]
    out = np.full_like(values, np.nan)  # [R]
    for group in np.unique(group_index):
        rows = (group_index == group) & ~np.isnan(values)  # [R] bool
        v = values[rows]  # [G]
        if v.size == 0:
            continue
        if v.size < 2 or bool((v == v[0]).all()):
            out[rows] = 0.0
            continue
        out[rows] = (v - v.mean()) / (v.std(ddof=1) + eps)
    return out


@dataclass(frozen=True)
class MixedRewards:
    """A step's rewards: the total GRPO trains on and every component behind it, row for row."""

    total: np.ndarray
    """[R] float64: the weighted sum of the terms that apply to each row."""
    raw: dict[str, np.ndarray]
    """Component name -> [R] raw rewards (NaN where it does not apply)."""
    terms: dict[str, np.ndarray]
    """Component name -> [R] the value weighted into the total (raw, or group-normalized)."""
    versions: dict[str, str]
    """Component name -> the version of the scorer that computed its rewards."""
    weights: dict[str, float] = field(default_factory=dict)
    """Component name -> its weight in the total (also the weight of its regions)."""
    regions: dict[str, list[tuple]] = field(default_factory=dict)
    """Component name -> per row its regions (rewards.scorer.Region; an empty tuple where it answered
    none); only components that answered some on some row."""

    def constant_components(self) -> dict[str, float]:
        """Components whose raw rewards are one value on every row they apply to (at least 2
        rows): the 'every reward came back 0' failure. Name -> that value."""
        constant = {}
        for name, values in self.raw.items():
            applied = values[~np.isnan(values)]
            if applied.size >= 2 and bool((applied == applied[0]).all()):
                constant[name] = float(applied[0])
        return constant


def mix_rewards(components: Sequence[RewardComponentConfig], raw: dict[str, np.ndarray],
                group_index: Sequence[int] | np.ndarray, versions: dict[str, str] | None = None,
                regions: dict[str, list[tuple]] | None = None) -> MixedRewards:
    """total_b = sum_c w_c term_c(b) over the components applying to row b (module docstring);
    `regions`: component name -> per row its regions, kept as they are. ValueError for a row no
    component applies to, or a non-finite reward."""
    group_index = np.asarray(group_index)  # [R]
    total = np.zeros(len(group_index), dtype=np.float64)  # [R]
    scored = np.zeros(len(group_index), dtype=bool)  # [R] some component applies
    terms: dict[str, np.ndarray] = {}
    for component in components:
        values = np.asarray(raw[component.name], dtype=np.float64)  # [R], NaN = does not apply
        if values.shape != total.shape:
            raise ValueError(f"reward {component.name}: {values.size} values for {total.size} rows")
        if np.isinf(values).any():
            raise ValueError(f"reward {component.name} is infinite on some rows")
        term = group_normalize(values, group_index) if component.normalize == "group" else values  # [R]
        applies = ~np.isnan(term)  # [R]
        total[applies] += component.weight * term[applies]
        scored |= applies
        terms[component.name] = term
    if not scored.all():
        raise ValueError(f"rows {np.flatnonzero(~scored)[:8].tolist()} got no reward from any component")
    return MixedRewards(total, {c.name: np.asarray(raw[c.name], dtype=np.float64) for c in components}, terms,
                        dict(versions or {}), {c.name: c.weight for c in components},
                        {name: rows for name, rows in (regions or {}).items() if any(rows)})


# ---------------------------------------------------------------------------------------------
# What the run records besides the numbers


@dataclass(frozen=True)
class RewardNote:
    """An event the trainer records (and prints) about a step's rewards."""

    kind: Literal["reward_version", "reward_constant"]
    message: str
    console: bool
    """Also printed: warnings and version changes; the first version of each scorer is only stored."""


def reward_notes(step: int, mixed: MixedRewards, components: Sequence[RewardComponentConfig],
                 known_versions: dict[str, str]) -> list[RewardNote]:
    """The step's reward events: every scorer version not seen before (all of them at the first
    step of a run or of a resume; then only changes: a reward model replaced mid-run), and a
    warning for each component constant over the whole step. Updates `known_versions`."""
    notes = []
    scorers = {c.name: c.scorer for c in components}
    for name, version in sorted(mixed.versions.items()):
        before = known_versions.get(name)
        if before == version:
            continue
        change = f" (was {before})" if before is not None else ""
        notes.append(RewardNote("reward_version", f"step {step}: reward {name} ({scorers.get(name, '?')}) "
                                                  f"version {version}{change}", console=before is not None))
        known_versions[name] = version
    for name, value in sorted(mixed.constant_components().items()):
        scorer = scorers.get(name, "?")
        solved = scorer in SOLVED_AT_ONE and value == 1.0  # recorded, not printed: a learned demo does it every step
        why = "every sample solved its prompt" if solved else "a broken scorer answers a constant"
        notes.append(RewardNote("reward_constant", f"step {step}: reward {name} ({scorer}) is {value:g} on every "
                                                   f"sample of the step: no signal from it ({why})", console=not solved))
    return notes


SOLVED_AT_ONE = ("ocr", "geneval", "edit_ocr", "edit_color", "consistency")
"""Scorers whose reward 1 means the prompt is solved (OCR: the text read; GenEval: every rule; the edit
checks: the target read / coloured; consistency: the background kept to its PSNR cap)."""
