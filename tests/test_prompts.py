"""Prompt sources, the refusal of evaluation prompts, and the resumable sampler."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from rewards.ocr import extract_target
from rl.prompts.sources import (
    BUNDLED,
    EVAL_SETS,
    EvalPromptOverlapError,
    PromptSampler,
    PromptSourceConfig,
    load_source,
)
from rl.run.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DATA, CONFIGS = ROOT / "rl" / "prompts" / "data", ROOT / "deploy" / "configs"
EVAL = DATA / "eval"


def test_bundled_sources_are_the_training_sets_and_load_in_full():
    assert BUNDLED == {"geneval": DATA / "train" / "geneval_train_metadata.jsonl", "ocr": DATA / "train" / "ocr_train.txt"}
    geneval = load_source(PromptSourceConfig(kind="geneval"))
    assert len(geneval) == 5000
    assert all(item.task == "geneval" and json.loads(item.geneval_metadata)["prompt"] == item.caption for item in geneval)
    ocr = load_source(PromptSourceConfig(kind="ocr"))
    assert len(ocr) == 4000 and all(item.caption.count('"') == 2 for item in ocr)
    counting = load_source(PromptSourceConfig(kind="geneval", tags=["counting"]))
    assert len(counting) == 1471  # 0.5 / 1.7 of 5000, see tests/test_prompt_sets.py
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
    unquoted = tmp_path / "unquoted.txt"
    unquoted.write_text('a sign that says "OPEN"\na sign that says OPEN\n')
    with pytest.raises(ValueError, match="unquoted.txt:2: prompt has no double-quoted target"):
        load_source(PromptSourceConfig(kind="ocr", path=unquoted))


# --- training is never on evaluation prompts --------------------------------------------------


def eval_oracle() -> tuple[set[str], set[str]]:
    """Normalised prompts of all three evaluation sets and targets of the OCR one, read here
    independently of rl.prompts.sources (lower case, spaces removed: the OCR reward's normalisation)."""
    norm = lambda text: text.replace(" ", "").lower()  # noqa: E731
    prompts, targets = set(), set()
    for name in ("geneval_evaluation_metadata.jsonl", "flow_grpo_geneval_test_metadata.jsonl"):
        prompts |= {norm(json.loads(line)["prompt"]) for line in (EVAL / name).read_text().splitlines() if line.strip()}
    for line in (EVAL / "flow_grpo_ocr_test.txt").read_text().splitlines():
        prompts.add(norm(line.strip()))
        targets.add(norm(re.search(r'"([^"]*)"', line).group(1)))
    return prompts, targets


def test_evaluation_sets_are_packaged_whole():
    prompts, targets = eval_oracle()
    lines = {name: (EVAL / name).read_text().splitlines() for name in sorted(p.name for p in EVAL.iterdir())}
    assert {name: len(text) for name, text in lines.items()} == {
        "flow_grpo_geneval_test_metadata.jsonl": 2212,  # GenEval's 553, four times each
        "flow_grpo_ocr_test.txt": 1018,
        "geneval_evaluation_metadata.jsonl": 553,
    }
    assert len(prompts) == 553 + 1018 and len(targets) == 953  # 65 OCR test targets repeat
    assert sorted(EVAL_SETS.values()) == sorted(EVAL.iterdir())


def shipped_sources(root: Path) -> list[tuple[str, PromptSourceConfig]]:
    """Every source of the bundled sets and the shipped configs; relative paths under `root`, where the
    synthetic edit sets the edit configs' runs would write are written."""
    from rl.prompts.edit_synthetic import ensure_synthetic_sources

    sources = [(f"bundled {kind}", PromptSourceConfig(kind=kind)) for kind in BUNDLED]
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(path, root=root)
        ensure_synthetic_sources(config.data.sources, log=lambda line: None)
        sources += [(f"{path.name} data.sources.{i}", source) for i, source in enumerate(config.data.sources)]
    return sources


def test_every_shipped_training_source_is_disjoint_from_every_evaluation_set(tmp_path):
    prompts, targets = eval_oracle()
    checked = {}
    for name, source in shipped_sources(tmp_path):
        assert not source.allow_eval_prompts, name
        items = load_source(source)
        overlap = [i.caption for i in items if i.caption.replace(" ", "").lower() in prompts]
        if items[0].task == "ocr":
            overlap += [i.caption for i in items if extract_target(i.caption).replace(" ", "").lower() in targets]
        assert overlap == [], name
        checked[name] = len(items)
    assert checked == {
        "bundled geneval": 5000,
        "bundled ocr": 4000,
        "gpu-blip3o-next-grpo-geneval.yaml data.sources.0": 5000,
        "gpu-blip3o-next-joint-geneval.yaml data.sources.0": 5000,
        "gpu-blip3o-next-grpo-text.yaml data.sources.0": 4000,
        "tiny-cpu-glyph-ocr.yaml data.sources.0": 1,  # one word: no OCR test target
        "tiny-cpu-glyph-ocr-lora.yaml data.sources.0": 1,
        "tiny-cpu-glyph-ocr-spatial.yaml data.sources.0": 1,
        "tiny-cpu-sana.yaml data.sources.0": 5000,
        "tiny-cpu-sana.yaml data.sources.1": 4000,
        "tiny-cpu-sana-diffusion.yaml data.sources.0": 5000,
        "tiny-cpu-sana-joint.yaml data.sources.0": 5000,
        "gpu-blip3o-next-grpo-edit.yaml data.sources.0": 4000,  # synthetic word edits (a placeholder for yours)
        "tiny-cpu-glyph-edit.yaml data.sources.0": 1,  # one edit: "cat sun", sun -> we
        "tiny-cpu-sana-edit.yaml data.sources.0": 8,
    }


@pytest.mark.parametrize(
    "name,kind,count,example",
    [
        ("geneval_evaluation_metadata.jsonl", "geneval", 553, "a photo of a bench"),
        ("flow_grpo_geneval_test_metadata.jsonl", "geneval", 2212, "a photo of two wine glasses"),
        ("flow_grpo_ocr_test.txt", "ocr", 1018, "Spring Collection 2024"),
    ],
)
def test_an_evaluation_set_as_training_source_is_refused(name, kind, count, example):
    source = PromptSourceConfig(kind=kind, path=EVAL / name)
    with pytest.raises(EvalPromptOverlapError) as error:
        load_source(source)
    message = str(error.value)
    assert name in message and f"{count} of its {count} prompts are evaluation prompts" in message
    assert example in message and "allow_eval_prompts" in message
    # tests may opt in
    assert len(load_source(PromptSourceConfig(kind=kind, path=EVAL / name, allow_eval_prompts=True))) == count


def test_one_overlapping_prompt_or_target_is_enough(tmp_path):
    ocr = tmp_path / "ocr.txt"
    ocr.write_text(
        'A chalkboard that says "Fresh Bread Daily 7"\n'
        'A mug on a desk printed with "spring collection  2024"\n'  # a test target up to case and spaces
    )
    with pytest.raises(EvalPromptOverlapError, match=r"1 of its 2 prompts .*'A mug on a desk.*is a target of Flow-GRPO OCR test"):
        load_source(PromptSourceConfig(kind="ocr", path=ocr))
    geneval = tmp_path / "geneval.jsonl"
    clean = {"tag": "colors", "include": [{"class": "toaster", "count": 1, "color": "green"}], "prompt": "a photo of a green toaster"}
    taken = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "A Photo of a  Bench"}
    geneval.write_text(json.dumps(clean) + "\n" + json.dumps(taken) + "\n")
    with pytest.raises(EvalPromptOverlapError, match=r"1 of its 2 prompts .*the prompt is in GenEval evaluation"):
        load_source(PromptSourceConfig(kind="geneval", path=geneval))
    # the check is on what is trained: a tag filter that leaves only the clean line passes
    assert [i.caption for i in load_source(PromptSourceConfig(kind="geneval", path=geneval, tags=["colors"]))] == [clean["prompt"]]
    # words are targets too: "Planetarium" is an OCR test target, "cat" is not
    with pytest.raises(EvalPromptOverlapError, match=r"1 of its 2 prompts"):
        load_source(PromptSourceConfig(kind="words", words=["cat", "planetarium"]))


def test_config_load_refuses_an_overlapping_source_unless_allowed(tmp_path):
    test_set = EVAL / "flow_grpo_ocr_test.txt"
    sources = [{"kind": "words", "words": ["cat"]}, {"kind": "ocr", "path": str(test_set)}]
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "tiny-cpu-glyph-ocr.yaml", {"data.sources": sources})
    message = str(error.value)
    assert "sources.1: prompt source 'ocr'" in message and str(test_set) in message
    assert "1018 of its 1018 prompts are evaluation prompts" in message
    sources[1]["allow_eval_prompts"] = True
    # without the demo's in-run eval, which scores some of these prompts (tests/test_inrun_eval.py)
    config = load_config(CONFIGS / "tiny-cpu-glyph-ocr.yaml", {"data.sources": sources, "eval": None})
    assert config.data.sources[1].allow_eval_prompts
    # a missing file is also a config error now, not a failure at the first step
    with pytest.raises(ConfigError, match="sources.0: prompt file .*missing.txt .*does not exist"):
        load_config(CONFIGS / "tiny-cpu-glyph-ocr.yaml", {"data.sources": [{"kind": "ocr", "path": str(tmp_path / "missing.txt")}]})


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
