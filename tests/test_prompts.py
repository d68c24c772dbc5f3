"""Prompt sources and the resumable sampler."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from rl.prompts import PromptSampler, PromptSourceConfig, load_source


def test_bundled_sources_load_in_full():
    geneval = load_source(PromptSourceConfig(kind="geneval"))
    assert len(geneval) == 553
    assert all(item.task == "geneval" and json.loads(item.geneval_metadata)["prompt"] == item.caption for item in geneval)
    ocr = load_source(PromptSourceConfig(kind="ocr"))
    assert len(ocr) == 1018 and all(item.caption.count('"') >= 2 for item in ocr)
    counting = load_source(PromptSourceConfig(kind="geneval", tags=["counting"]))
    assert len(counting) == 80
    words = load_source(PromptSourceConfig(kind="words", words=["cat", "sun"]))
    assert [w.caption for w in words] == ['an image with the text "cat"', 'an image with the text "sun"']


def test_bad_source_configs_name_the_problem(tmp_path):
    with pytest.raises(ValidationError, match="words"):
        PromptSourceConfig(kind="words")
    with pytest.raises(ValidationError, match="extra"):
        PromptSourceConfig(kind="ocr", wieght=2)
    with pytest.raises(ValidationError, match="weight must be positive"):
        PromptSourceConfig(kind="ocr", weight=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(PromptSourceConfig(kind="ocr", path=tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_source(PromptSourceConfig(kind="geneval", path=bad))
    with pytest.raises(ValueError, match="no prompts"):
        load_source(PromptSourceConfig(kind="geneval", tags=["no-such-tag"]))


def test_one_epoch_visits_every_prompt_once_then_reshuffles():
    sources = [PromptSourceConfig(kind="words", words=[f"w{i}" for i in range(10)])]
    sampler = PromptSampler(sources, seed=3)
    first_epoch = [p.caption for p in sampler.next_batch(10)]
    second_epoch = [p.caption for p in sampler.next_batch(10)]
    assert sorted(first_epoch) == sorted(second_epoch) and len(set(first_epoch)) == 10
    assert first_epoch != second_epoch  # a new permutation per epoch


def test_resume_from_saved_state_continues_the_same_sequence():
    sources = [
        PromptSourceConfig(kind="words", words=["cat", "sun", "road"], weight=1),
        PromptSourceConfig(kind="geneval", tags=["colors"], weight=3),
    ]
    straight = PromptSampler(sources, seed=7)
    expected = [straight.next_batch(4) for _ in range(6)]

    first = PromptSampler(sources, seed=7)
    got = [first.next_batch(4) for _ in range(2)]
    saved = copy.deepcopy(first.state)
    resumed = PromptSampler(sources, seed=7, state=saved)
    got += [resumed.next_batch(4) for _ in range(4)]
    assert got == expected


def test_mix_follows_weights():
    sources = [PromptSourceConfig(kind="words", words=["a"], weight=1), PromptSourceConfig(kind="words", words=["b"], weight=3)]
    sampler = PromptSampler(sources, seed=0)
    captions = [p.caption for _ in range(100) for p in sampler.next_batch(8)]
    share_b = sum('"b"' in c for c in captions) / len(captions)
    assert 0.70 < share_b < 0.80  # expected 0.75; 800 draws give a std of ~0.015
