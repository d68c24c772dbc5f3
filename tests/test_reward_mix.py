"""The reward mix (rl/scoring/reward_mix.py): the weighted total against numbers worked out by hand, raw and
group-normalized, the zero-std rule, task rewards that apply to their own prompts only, the
constant-reward warning and version events, and the config checks that stop a bad mix at load."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from rl.scoring.config import RewardsSection
from rl.scoring.reward_mix import (
    GROUP_EPS,
    MixedRewards,
    RewardComponentConfig,
    group_normalize,
    mix_rewards,
    resolve_mix,
    reward_notes,
)

NAN = math.nan
GROUPS = [0, 0, 0, 1, 1, 1]  # two prompts, three samples each


def component(name: str, scorer: str | None = None, **fields) -> RewardComponentConfig:
    if scorer == "http":
        fields.setdefault("url", "http://127.0.0.1:1/score")
    return RewardComponentConfig(name=name, scorer=scorer or name, **fields)


def test_weighted_raw_and_group_normalized_totals_match_a_hand_computation():
    a = component("a", "compressibility", weight=2.0)                # raw
    b = component("b", "http", weight=0.5, normalize="group")
    raw = {"a": np.array([1.0, 0.0, 0.5, 0.2, 0.2, 0.2]), "b": np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])}
    mixed = mix_rewards([a, b], raw, GROUPS, {"a": "jpeg-q95", "b": "v1"})
    # b, group 0: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> z = (-1, 0, 1) / (1 + 1e-4)
    # b, group 1: all 5 -> zero-std rule: 0 on every row
    z = 1 / (1 + GROUP_EPS)
    assert mixed.terms["b"] == pytest.approx([-z, 0.0, z, 0.0, 0.0, 0.0], abs=1e-12)
    # total = 2 a + 0.5 z_b
    expected = [2 * 1.0 - 0.5 * z, 0.0, 2 * 0.5 + 0.5 * z, 0.4, 0.4, 0.4]
    assert mixed.total == pytest.approx(expected, abs=1e-12)
    assert expected[0] == pytest.approx(1.500049995, abs=1e-9)  # 2 - 0.5 / 1.0001, written out
    assert mixed.raw["b"].tolist() == [1.0, 2.0, 3.0, 5.0, 5.0, 5.0] and mixed.versions == {"a": "jpeg-q95", "b": "v1"}


def test_a_task_reward_scores_only_its_prompts_and_group_normalizes_within_them():
    ocr = component("ocr", normalize="group")
    everyone = component("bright", "http", weight=-1.0)
    raw = {"ocr": np.array([NAN, NAN, NAN, 0.7, 0.1, 0.4]),  # group 0 is a GenEval prompt: no OCR reward
           "bright": np.array([0.1, 0.2, 0.3, 0.0, 0.0, 0.6])}
    mixed = mix_rewards([ocr, everyone], raw, GROUPS)
    # ocr, group 1: mean 0.4, deviations (0.3, -0.3, 0), std sqrt(0.18 / 2) = 0.3 -> z = dev / 0.3001
    assert mixed.total == pytest.approx([-0.1, -0.2, -0.3, 0.3 / 0.3001, -0.3 / 0.3001, -0.6], abs=1e-12)
    assert np.isnan(mixed.terms["ocr"][:3]).all()


def test_without_a_mix_the_total_is_the_task_reward_bit_for_bit():
    components = resolve_mix(None, {"ocr"})
    assert [(c.name, c.scorer, c.weight, c.normalize) for c in components] == [("ocr", "ocr", 1.0, "none")]
    rewards = np.array([0.123456789, 0.0, 1.0, 1 / 3, 0.7, 0.2])
    assert mix_rewards(components, {"ocr": rewards}, GROUPS).total.tolist() == rewards.tolist()
    assert [c.name for c in resolve_mix(None, {"geneval", "ocr"})] == ["ocr", "geneval"]


def test_group_normalize_edge_cases():
    # a group of one row has no std: 0; NaN rows stay NaN and do not enter their group's statistics
    values = np.array([3.0, 1.0, NAN, 2.0])
    # group 1 is rows 1 and 3 = (1, 2): mean 1.5, std sqrt(0.5)
    assert group_normalize(values, [0, 1, 1, 1])[:2] == pytest.approx([0.0, -0.5 / (math.sqrt(0.5) + GROUP_EPS)])
    assert np.isnan(group_normalize(values, [0, 1, 1, 1])[2])
    with pytest.raises(ValueError, match=r"rows \[0\] got no reward"):
        mix_rewards([component("ocr")], {"ocr": np.array([NAN, 1.0])}, [0, 1])


def test_constant_rewards_and_new_versions_become_events():
    flat, moving = component("flat", "http"), component("clip", "pickscore")
    mixed = MixedRewards(total=np.zeros(4), raw={"flat": np.array([0.0, 0.0, 0.0, 0.0]),
                                                 "clip": np.array([0.1, 0.2, 0.1, 0.3])},
                         terms={}, versions={"flat": "x1", "clip": "pickscore@abc"})
    assert mixed.constant_components() == {"flat": 0.0}
    known: dict[str, str] = {}
    first = reward_notes(1, mixed, [flat, moving], known)
    assert [(n.kind, n.console) for n in first] == [("reward_version", False), ("reward_version", False),
                                                   ("reward_constant", True)]
    assert "step 1: reward flat (http) is 0 on every sample" in first[2].message
    assert known == {"flat": "x1", "clip": "pickscore@abc"}
    swapped = MixedRewards(np.zeros(4), {"clip": np.array([0.1, 0.2, 0.1, 0.3])}, {}, {"clip": "pickscore@def"})
    [change] = reward_notes(7, swapped, [flat, moving], known)
    assert change.console and change.message == "step 7: reward clip (pickscore) version pickscore@def (was pickscore@abc)"
    assert reward_notes(8, swapped, [flat, moving], known) == []  # nothing new
    # a task reward of 1 on every sample is a solved step, not a broken scorer: stored, not printed
    ocr = component("ocr")
    solved = MixedRewards(np.ones(4), {"ocr": np.ones(4)}, {}, {"ocr": "v"})
    [note] = reward_notes(9, solved, [ocr], {"ocr": "v"})
    assert not note.console and note.message.endswith("(every sample solved its prompt)")
    [note] = reward_notes(9, MixedRewards(np.zeros(4), {"ocr": np.zeros(4)}, {}, {"ocr": "v"}), [ocr], {"ocr": "v"})
    assert note.console and note.message.endswith("(a broken scorer answers a constant)")


@pytest.mark.parametrize("mix, words", [
    ([{"name": "a", "scorer": "http"}], "scorer http needs one"),
    ([{"name": "a", "scorer": "ocr", "url": "http://x/score"}], "`url` goes with scorer http"),
    ([{"name": "a", "scorer": "python", "function": "no_colon"}], "is not 'module:function'"),
    ([{"name": "compressibility", "scorer": "python", "function": "m:f"}], "shadow the built-in"),
    ([{"name": "mean", "scorer": "ocr"}], "taken by the total's metric"),
    ([{"name": "a", "scorer": "ocr"}, {"name": "a", "scorer": "geneval"}], "a appear more than once"),
    ([{"name": "a", "scorer": "ocr", "wieght": 2}], "Extra inputs are not permitted"),
    ([], "at least 1 item"),
])
def test_bad_mixes_are_refused_at_config_load(mix, words):
    with pytest.raises(ValidationError, match=words):
        RewardsSection(mix=mix)
