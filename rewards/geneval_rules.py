"""GenEval's rules, on detections: which objects count, colours, positions, include/exclude.

Official rules (djghosh13/geneval `evaluation/evaluate_images.py`): keep detections with score
> 0.3 (> 0.9 for the counting tag), at most 16 per class, highest score first, no NMS. An image
is correct if every include clause holds (at least `count` objects, colour and position judged on
the top `count`) and no exclude clause does (at least `count` objects of its class).

Graded RL reward (Flow-GRPO's reward server, `evaluate_reward`): one term per include clause
`1 - |count - found| / count` (found = all kept objects: it goes negative when there are many more
than asked, e.g. 1 asked and 16 found gives -14; kept as in Flow-GRPO); a clause with a colour or
position whose count is not exactly met adds one more term 0; otherwise colour adds
`1 - |count - matches| / count` and position adds 1 if every (object, target) pair holds, else 0.
The reward is the mean of the terms. Exclude clauses do not enter it (the count term already
punishes extra objects).
Deviation: Flow-GRPO appends a stray 1.0 after a failed position check (so a failure counts as
0 and 1, i.e. 0.5 over two terms); we add exactly one term, 0 or 1, as the formula intends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

COCO_CLASSES: tuple[str, ...] = tuple(
    line.strip() for line in (Path(__file__).parent / "data" / "object_names.txt").read_text().splitlines()
)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1

CocoClass = Literal[COCO_CLASSES]  # type: ignore[valid-type]
Color = Literal[COLORS]  # type: ignore[valid-type]
Relation = Literal["left of", "right of", "above", "below"]


class ExcludeClause(BaseModel):
    """Fail if at least `count` objects of `class` are found."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_attribute_docstrings=True)

    cls: CocoClass = Field(alias="class")
    """COCO class name, as in GenEval's object_names.txt."""
    count: Annotated[int, Field(ge=1, le=MAX_OBJECTS)]
    """How many objects make the clause hold."""


class IncludeClause(ExcludeClause):
    """Require at least `count` objects of `class`, optionally of a colour and at a position."""

    color: Color | None = None
    """Colour every one of the top `count` objects must have (CLIP zero-shot)."""
    position: tuple[Relation, Annotated[int, Field(ge=0)]] | None = None
    """(relation, index of an earlier include clause): where these objects must be relative to it."""


class GenevalMetadata(BaseModel):
    """One line of GenEval's evaluation metadata."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tag: Literal[TAGS]  # type: ignore[valid-type]
    """Task family; decides the detection threshold (0.9 for counting, else 0.3)."""
    include: Annotated[list[IncludeClause], Field(min_length=1, max_length=8)]
    """Clauses that must all hold."""
    exclude: Annotated[list[ExcludeClause], Field(max_length=8)] = []
    """Clauses none of which may hold."""
    prompt: str = ""
    """The caption the image was generated from (informational)."""

    @model_validator(mode="after")
    def _positions_refer_back(self) -> "GenevalMetadata":
        for index, clause in enumerate(self.include):
            if clause.position is not None and clause.position[1] >= index:
                raise ValueError(
                    f"include[{index}].position refers to clause {clause.position[1]}; "
                    "it must name an earlier include clause"
                )
        return self


@dataclass(frozen=True)
class Detection:
    """One detected object: class, box (x1, y1, x2, y2 in pixels), score, optional mask."""

    label: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    """[H, W] bool instance mask of the whole image."""


@dataclass(frozen=True)
class ClauseReport:
    """How one include clause was judged."""

    cls: str
    count: int
    found: int
    ok: bool
    colors: list[str] | None = None
    relations: list[list[str]] | None = None
    """Relations found for each (object, target object) pair checked, in order."""


@dataclass(frozen=True)
class GenevalResult:
    """Strict correctness (official rules), graded reward (Flow-GRPO) and why."""

    correct: bool
    reward: float
    tag: str
    objects: dict[str, list[Detection]]
    include: list[ClauseReport]
    exclude_violated: list[int]
    """Indices of exclude clauses that held (each makes the image incorrect)."""
    terms: list[float]
    """The graded reward's terms, in order (their mean is `reward`)."""
    regions: tuple = ()
    """Per-object regions (rewards.scorer.Region; filled by rewards/geneval.py `object_regions`)."""


ColourFn = Callable[[list[Detection], str], list[str]]
"""Colour names of the given objects of a class (GenEval: CLIP on grey-composited crops)."""


def select_objects(detections: list[Detection], tag: str) -> dict[str, list[Detection]]:
    """The objects GenEval counts: score above the tag's threshold, top 16 per class, best first."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    objects: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: -d.score):
        kept = objects.setdefault(detection.label, [])
        if detection.score > threshold and len(kept) < MAX_OBJECTS:
            kept.append(detection)
    return {label: kept for label, kept in objects.items() if kept}


def relative_position(box_a, box_b, margin: float = POSITION_MARGIN) -> set[str]:
    """Where A is relative to B; the gap must exceed `margin` * (size A + size B) on an axis."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2  # [2] centre A - centre B (x, y)
    dims = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])  # [2] width A + width B, height A + height B
    revised = np.maximum(np.abs(offset) - margin * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _positions_hold(objects: list[Detection], targets: list[Detection], relation: str) -> tuple[bool, list[list[str]]]:
    """Every object must stand in `relation` to every target; stops at the first failure (as GenEval)."""
    seen: list[list[str]] = []
    for obj in objects:
        for target in targets:
            relations = relative_position(obj.box, target.box)
            seen.append(sorted(relations))
            if relation not in relations:
                return False, seen
    return True, seen


def evaluate(metadata: GenevalMetadata, detections: list[Detection], colours_of: ColourFn) -> GenevalResult:
    """Judge one image's detections against one metadata line (see the module docstring)."""
    objects = select_objects(detections, metadata.tag)
    groups: list[list[Detection] | None] = []  # official: top `count` objects of each held clause
    exact_groups: list[list[Detection] | None] = []  # Flow-GRPO: objects of exactly-met clauses
    reports, terms = [], []
    for clause in metadata.include:
        found = objects.get(clause.cls, [])
        top = found[: clause.count]
        ok = len(top) >= clause.count
        exact = len(found) == clause.count
        terms.append(1 - abs(clause.count - len(found)) / clause.count)
        if not exact and (clause.color or clause.position):
            terms.append(0.0)
        colors = relations = None
        colour_ok = True
        if ok and clause.color:
            colors = colours_of(top, clause.cls)
            matches = colors.count(clause.color)
            colour_ok = ok = matches >= clause.count
            if exact:
                terms.append(1 - abs(clause.count - matches) / clause.count)
        if ok and clause.position:
            relation, target = clause.position
            if groups[target] is None:
                ok = False
            else:
                ok, relations = _positions_hold(top, groups[target], relation)
        exact_ok = exact and colour_ok
        if exact_ok and clause.position:
            relation, target = clause.position
            targets = exact_groups[target]
            exact_ok = targets is not None and _positions_hold(found, targets, relation)[0]
            terms.append(float(exact_ok))
        groups.append(top if ok else None)
        exact_groups.append(found if exact_ok else None)
        reports.append(ClauseReport(clause.cls, clause.count, len(found), ok, colors, relations))
    violated = [i for i, clause in enumerate(metadata.exclude) if len(objects.get(clause.cls, [])) >= clause.count]
    correct = all(report.ok for report in reports) and not violated
    return GenevalResult(correct, sum(terms) / len(terms), metadata.tag, objects, reports, violated, terms)
