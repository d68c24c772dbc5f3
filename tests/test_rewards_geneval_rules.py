"""GenEval rule engine on constructed detections: hand-computed cases for every tag and rule, and
every line of the bundled metadata file judged right, wrong, and empty."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError

from rewards.geneval_rules import (
    COCO_CLASSES,
    Detection,
    GenevalMetadata,
    evaluate,
    relative_position,
    select_objects,
)

METADATA = Path(__file__).resolve().parents[1] / "rl" / "prompts" / "data" / "eval" / "geneval_evaluation_metadata.jsonl"
SIDE = 40.0


def box_at(x: float, y: float) -> tuple[float, float, float, float]:
    return (x, y, x + SIDE, y + SIDE)


@dataclass(frozen=True)
class Painted(Detection):
    """A constructed detection carrying the colour the fake CLIP reports for it."""

    color: str = "red"


def det(label: str, x: float = 0, y: float = 0, score: float = 0.95, color: str = "red") -> Painted:
    return Painted(label, box_at(x, y), score, color=color)


def colours_of(objects, cls):
    return [obj.color for obj in objects]


def meta(**fields) -> GenevalMetadata:
    return GenevalMetadata.model_validate(fields)


# ---- relative position: hand-computed -------------------------------------------------------------


def test_relative_position_hand_computed():
    b = (100, 100, 140, 140)  # centre (120, 120), 40 x 40
    # A centred 60 px to the right: offset (60, 0), margin 0.1 * (40 + 40) = 8 -> revised (52, 0),
    # dx = 52 / 60 = 0.87 > 0.5 -> right of.
    assert relative_position((160, 100, 200, 140), b) == {"right of"}
    assert relative_position((40, 100, 80, 140), b) == {"left of"}
    assert relative_position((100, 40, 140, 80), b) == {"above"}  # image y grows downwards
    assert relative_position((100, 160, 140, 200), b) == {"below"}
    # Offset (6, 0) is inside the margin 8: revised 0 -> no relation at all.
    assert relative_position((106, 100, 146, 140), b) == set()
    # Diagonal offset (60, 60): revised (52, 52) / |offset| 84.85 = (0.613, 0.613) -> both.
    assert relative_position((160, 160, 200, 200), b) == {"right of", "below"}
    # Offset (60, 20): revised (52, 12) / 63.25 = (0.822, 0.190) -> right of only.
    assert relative_position((160, 120, 200, 160), b) == {"right of"}


def test_select_objects_thresholds_and_cap():
    dets = [det("dog", score=0.31), det("dog", score=0.3), det("cat", score=0.95), det("cat", score=0.85)]
    kept = select_objects(dets, "two_object")
    assert [d.score for d in kept["dog"]] == [0.31]  # strictly above 0.3
    assert [d.score for d in kept["cat"]] == [0.95, 0.85]  # best first
    counting = select_objects(dets, "counting")
    assert list(counting) == ["cat"] and [d.score for d in counting["cat"]] == [0.95]  # > 0.9
    many = select_objects([det("cup", score=0.4 + i / 100) for i in range(20)], "single_object")
    assert len(many["cup"]) == 16 and many["cup"][0].score == pytest.approx(0.59)


# ---- one hand-computed case per tag ---------------------------------------------------------------


def test_single_object_overcount_is_correct_but_graded_down():
    m = meta(tag="single_object", include=[{"class": "dog", "count": 1}])
    result = evaluate(m, [det("dog"), det("dog", 100)], colours_of)
    assert result.correct  # at least one dog
    assert result.terms == [0.0] and result.reward == 0.0  # 1 - |1 - 2| / 1
    result = evaluate(m, [det("dog")] * 3, colours_of)
    assert result.reward == -1.0  # 1 - |1 - 3| / 1: Flow-GRPO's formula goes negative, kept


def test_two_object():
    m = meta(tag="two_object", include=[{"class": "dog", "count": 1}, {"class": "cat", "count": 1}])
    assert evaluate(m, [det("dog"), det("cat", 100)], colours_of).correct
    result = evaluate(m, [det("dog"), det("cup", 100)], colours_of)
    assert not result.correct and result.terms == [1.0, 0.0] and result.reward == 0.5
    assert [(r.cls, r.found, r.ok) for r in result.include] == [("dog", 1, True), ("cat", 0, False)]


def test_counting_include_and_exclude():
    m = meta(tag="counting", include=[{"class": "clock", "count": 3}], exclude=[{"class": "clock", "count": 4}])
    three = [det("clock", 50 * i) for i in range(3)]
    assert evaluate(m, three, colours_of).correct
    result = evaluate(m, three + [det("clock", 200)], colours_of)
    assert not result.correct and result.exclude_violated == [0]
    assert result.reward == pytest.approx(1 - 1 / 3)  # exclude does not enter the graded reward
    result = evaluate(m, three[:2], colours_of)
    assert not result.correct and result.reward == pytest.approx(2 / 3)
    # Counting uses the 0.9 threshold: a 0.85 clock does not count.
    assert not evaluate(m, three[:2] + [det("clock", 200, score=0.85)], colours_of).correct


def test_colors():
    m = meta(tag="colors", include=[{"class": "car", "count": 1, "color": "blue"}])
    assert evaluate(m, [det("car", color="blue")], colours_of).correct
    result = evaluate(m, [det("car", color="red")], colours_of)
    assert not result.correct and result.terms == [1.0, 0.0] and result.include[0].colors == ["red"]
    # Colour judged on the top object only; a wrong-coloured second car does not matter (official),
    # but the graded count term drops to 0 and the colour term is replaced by a 0.
    result = evaluate(m, [det("car", score=0.99, color="blue"), det("car", 100, score=0.5, color="red")], colours_of)
    assert result.correct and result.terms == [0.0, 0.0] and result.reward == 0.0
    # No car: count term 0 and the colour term 0.
    assert evaluate(m, [], colours_of).terms == [0.0, 0.0]


def test_position():
    m = meta(
        tag="position",
        include=[{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    )
    right = evaluate(m, [det("teddy bear", 100, 100), det("dog", 200, 100)], colours_of)
    assert right.correct and right.terms == [1.0, 1.0, 1.0] and right.include[1].relations == [["right of"]]
    left = evaluate(m, [det("teddy bear", 100, 100), det("dog", 0, 100)], colours_of)
    # One position term 0 (Flow-GRPO would also append a stray 1.0 here: reward 0.75 there, 2/3 here).
    assert not left.correct and left.terms == [1.0, 1.0, 0.0] and left.reward == pytest.approx(2 / 3)
    no_bear = evaluate(m, [det("dog", 0, 100)], colours_of)
    assert not no_bear.correct and no_bear.terms == [0.0, 1.0, 0.0]


def test_color_attr():
    m = meta(
        tag="color_attr",
        include=[{"class": "cup", "count": 1, "color": "purple"}, {"class": "apple", "count": 1, "color": "black"}],
    )
    assert evaluate(m, [det("cup", color="purple"), det("apple", 100, color="black")], colours_of).correct
    swapped = evaluate(m, [det("cup", color="black"), det("apple", 100, color="purple")], colours_of)
    assert not swapped.correct and swapped.terms == [1.0, 0.0, 1.0, 0.0] and swapped.reward == 0.5


# ---- metadata validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"tag": "shapes", "include": [{"class": "dog", "count": 1}]}, "tag"),
        ({"tag": "single_object", "include": [{"class": "unicorn", "count": 1}]}, "class"),
        ({"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "teal"}]}, "color"),
        ({"tag": "single_object", "include": [{"class": "dog", "count": 0}]}, "count"),
        ({"tag": "single_object", "include": []}, "include"),
        ({"tag": "position", "include": [{"class": "dog", "count": 1, "position": ["right of", 0]}]}, "earlier"),
        ({"tag": "single_object", "include": [{"class": "dog", "count": 1}], "colour": "red"}, "colour"),
    ],
)
def test_bad_metadata_is_rejected_with_its_field(fields, problem):
    with pytest.raises(ValidationError, match=problem):
        GenevalMetadata.model_validate(fields)


# ---- every line of the metadata file ---------------------------------------------------------------

OFFSETS = {"right of": (120, 0), "left of": (-120, 0), "above": (0, -120), "below": (0, 120)}


def satisfying(m: GenevalMetadata) -> list[Detection]:
    """Detections that meet every clause: `count` objects per class, coloured and placed as asked."""
    dets, origins = [], []
    for index, clause in enumerate(m.include):
        x, y = 400.0, 400.0 + 300 * index if clause.position is None else 0
        if clause.position is not None:
            relation, target = clause.position
            dx, dy = OFFSETS[relation]
            x, y = origins[target][0] + dx, origins[target][1] + dy
        origins.append((x, y))
        dets += [det(clause.cls, x + 45 * k, y, color=clause.color or "red") for k in range(clause.count)]
    return dets


def lines() -> list[str]:
    return METADATA.read_text().splitlines()


def test_metadata_file_covers_all_tags_and_clause_kinds():
    parsed = [GenevalMetadata.model_validate_json(line) for line in lines()]
    assert len(parsed) == 553
    assert {m.tag for m in parsed} == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    clauses = [c for m in parsed for c in m.include]
    assert {c.position[0] for c in clauses if c.position} == set(OFFSETS)
    assert {c.count for c in clauses} == {1, 2, 3, 4} and sum(len(m.exclude) for m in parsed) == 80
    assert {c.cls for c in clauses} <= set(COCO_CLASSES)


def test_every_metadata_line_right_wrong_and_empty():
    for number, line in enumerate(lines()):
        m = GenevalMetadata.model_validate_json(line)
        good = evaluate(m, satisfying(m), colours_of)
        assert good.correct and good.reward == 1.0, (number, line, good)
        empty = evaluate(m, [], colours_of)
        assert not empty.correct and empty.reward == 0.0, (number, line)
        # Break the last include clause in the way its tag tests, and check both outputs.
        last = m.include[-1]
        dets = satisfying(m)
        if m.tag == "counting":
            dets.append(det(last.cls, 0, 0))  # one too many: the exclude clause fires
            expected = (1 - 1 / last.count,)
        elif last.color is not None:
            dets = [d if d.label != last.cls else det(d.label, *d.box[:2], color="white" if last.color != "white" else "black") for d in dets]
            expected = (sum([1.0, 1.0] * (len(m.include) - 1) + [1.0, 0.0]) / (2 * len(m.include)),)
        elif last.position is not None:
            target = m.include[last.position[1]].cls
            dets = [d if d.label != last.cls else det(d.label, *next(t.box[:2] for t in dets if t.label == target)) for d in dets]
            expected = (2 / 3,)  # count, count, position 0
        else:
            dets = [d for d in dets if d.label != last.cls]
            expected = (1 - 1 / len(m.include),)
        bad = evaluate(m, dets, colours_of)
        assert not bad.correct, (number, line)
        assert bad.reward == pytest.approx(expected[0]), (number, line, bad.terms)
