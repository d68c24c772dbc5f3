"""Training prompt sets (`blip3o-rl prompts geneval|ocr`): GenEval's facts, Flow-GRPO's weights,
no evaluation prompt, the same file for the same seed, and the CLI end to end."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from deploy.cli import main
from rewards.geneval_rules import COCO_CLASSES, GenevalMetadata
from rewards.ocr import extract_target
from rl.prompts.generators import (
    NUMBER_WORDS,
    TAG_WEIGHTS,
    geneval_lines,
    ocr_lines,
    plural,
    split_by_weights,
    with_article,
)
from tests.test_prompts import DATA, EVAL, ROOT, eval_oracle

SHIPPED = {"geneval": DATA / "train" / "geneval_train_metadata.jsonl", "ocr": DATA / "train" / "ocr_train.txt"}
norm = lambda text: text.replace(" ", "").lower()  # noqa: E731


def caption(record: dict) -> str:
    """GenEval's prompt templates, rebuilt from a metadata line's clauses."""
    tag, include = record["tag"], record["include"]
    names = [clause["class"] for clause in include]
    colors = [clause.get("color") for clause in include]
    if tag == "single_object":
        return f"a photo of {with_article(names[0])}"
    if tag == "two_object":
        return f"a photo of {with_article(names[0])} and {with_article(names[1])}"
    if tag == "counting":
        return f"a photo of {NUMBER_WORDS[include[0]['count']]} {plural(names[0])}"
    if tag == "colors":
        return f"a photo of {with_article(colors[0])} {names[0]}"
    if tag == "position":
        return f"a photo of {with_article(names[1])} {include[1]['position'][0]} {with_article(names[0])}"
    return f"a photo of {with_article(colors[0])} {names[0]} and {with_article(colors[1])} {names[1]}"


def test_templates_reproduce_genevals_own_evaluation_prompts():
    lines = (EVAL / "geneval_evaluation_metadata.jsonl").read_text().splitlines()
    assert [caption(json.loads(line)) for line in lines] == [json.loads(line)["prompt"] for line in lines]
    # the spellings that come with GenEval's rules
    assert (with_article("apple"), with_article("bench"), plural("skis"), plural("wine glass"), plural("knife")) == (
        "an apple", "a bench", "skises", "wine glasses", "knifes",
    )


def test_split_by_weights_is_largest_remainder():
    # weights 0.7, 0.3, 0.1, 0.5, 0.1 (sum 1.7) of 5000: 2058.82, 882.35, 294.12, 1470.59, 294.12;
    # floors sum to 4998, the 2 left go to the largest fractions (.82 position, .59 counting)
    assert split_by_weights(TAG_WEIGHTS, 5000) == {
        "position": 2059, "color_attr": 882, "colors": 294, "counting": 1471, "two_object": 294,
    }
    # 17 splits exactly: 7, 3, 1, 5, 1
    assert split_by_weights(TAG_WEIGHTS, 17) == {"position": 7, "color_attr": 3, "colors": 1, "counting": 5, "two_object": 1}
    # 3: floors 1, 0, 0, 0, 0; fractions .88 counting, .53 color_attr take the 2 left
    assert split_by_weights(TAG_WEIGHTS, 3) == {"position": 1, "color_attr": 1, "colors": 0, "counting": 1, "two_object": 0}


def test_geneval_set_follows_genevals_rules_and_flow_grpos_weights():
    lines = SHIPPED["geneval"].read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for line, record in zip(lines, records):
        GenevalMetadata.model_validate_json(line)  # the reward's own parser
        assert list(record) == (["tag", "include", "exclude", "prompt"] if record["tag"] == "counting" else ["tag", "include", "prompt"])
        assert caption(record) == record["prompt"]
        names = [clause["class"] for clause in record["include"]]
        assert len(set(names)) == len(names)  # two different objects
        colors = [clause["color"] for clause in record["include"] if "color" in clause]
        assert len(set(colors)) == len(colors) and ("person" not in names or not colors)
        if record["tag"] == "counting":
            (include,), (exclude,) = record["include"], record["exclude"]
            assert 2 <= include["count"] <= 4 and exclude == {"class": include["class"], "count": include["count"] + 1}
        if record["tag"] == "position":
            assert record["include"][1]["position"][1] == 0 and list(record["include"][1]) == ["class", "count", "position"]
    tags = Counter(record["tag"] for record in records)
    assert dict(tags) == split_by_weights(TAG_WEIGHTS, 5000)  # no single_object: weight 0 in Flow-GRPO
    # counting has 80 x 3 = 240 prompts, 80 of them evaluation prompts: all 160 others are used,
    # 1471 = 160 x 9 + 31, so 31 of them ten times and 129 nine times
    evaluation, _ = eval_oracle()
    every_counting = {f"a photo of {NUMBER_WORDS[n]} {plural(name)}" for name in COCO_CLASSES for n in (2, 3, 4)}
    outside = {prompt for prompt in every_counting if norm(prompt) not in evaluation}
    counting = Counter(record["prompt"] for record in records if record["tag"] == "counting")
    assert len(every_counting) == 240 and set(counting) == outside and len(outside) == 160
    assert Counter(counting.values()) == {9: 129, 10: 31}
    # every other tag: distinct prompts
    assert all(n == 1 for prompt, n in Counter(r["prompt"] for r in records if r["tag"] != "counting").items())


def test_geneval_generation_removes_evaluation_prompts_and_says_how_many():
    log: list[str] = []
    lines = geneval_lines(5000, 0, log.append)
    evaluation, _ = eval_oracle()
    assert not [line for line in lines if norm(json.loads(line)["prompt"]) in evaluation]
    counting = next(line for line in log if line.strip().startswith("counting"))
    assert "1471 lines from    160 distinct prompts (80 evaluation prompts removed" in counting


def test_same_seed_same_set_other_seed_other_set():
    assert geneval_lines(400, 7, print) == geneval_lines(400, 7, print)
    assert geneval_lines(400, 7, print) != geneval_lines(400, 8, print)
    assert ocr_lines(300, 7, print) == ocr_lines(300, 7, print)
    assert ocr_lines(300, 7, print) != ocr_lines(300, 8, print)


def test_ocr_prompts_have_a_first_quoted_target_of_one_to_six_words_none_from_the_test_set():
    prompts = SHIPPED["ocr"].read_text().splitlines()
    targets = [extract_target(prompt) for prompt in prompts]
    assert len(prompts) == 4000 and all(prompt.count('"') == 2 for prompt in prompts)  # one quoted span
    words = Counter(len(target.split()) for target in targets)
    assert set(words) == {1, 2, 3, 4, 5, 6} and min(words.values()) > 200
    assert len({norm(target) for target in targets}) == 4000  # each text once
    evaluation_prompts, evaluation_targets = eval_oracle()
    assert not [t for t in targets if norm(t) in evaluation_targets]
    assert not [p for p in prompts if norm(p) in evaluation_prompts]
    # mixed case and digits
    upper = sum(t == t.upper() and t != t.lower() for t in targets)
    lower = sum(t == t.lower() and t != t.upper() for t in targets)
    assert upper > 600 and lower > 300 and 4000 - upper - lower > 1500
    assert sum(any(c.isdigit() for c in t) for t in targets) > 1000
    # many scenes: the text between the quotes removed, at least 40 different openings
    assert len({prompt.split('"')[0][:30] for prompt in prompts}) >= 40


@pytest.mark.parametrize("kind", ["geneval", "ocr"])
def test_shipped_sets_are_what_their_recorded_command_writes(kind, tmp_path, capsys):
    """rl/prompts/data/README.md records the command of each shipped set; rerunning it writes the same bytes."""
    readme = (DATA / "README.md").read_text()
    (command,) = [line.strip() for line in readme.splitlines() if line.strip().startswith(f"blip3o-rl prompts {kind} ")]
    argv = shlex.split(command)[1:]
    out = argv.index("--out") + 1
    assert (ROOT / argv[out]).resolve() == SHIPPED[kind]
    argv[out] = str(tmp_path / "set")
    main(argv)
    assert (tmp_path / "set").read_bytes() == SHIPPED[kind].read_bytes()
    distinct = "4000 lines (4000 distinct)" if kind == "ocr" else "5000 lines (3689 distinct)"
    assert f"wrote {distinct} to {tmp_path / 'set'}" in capsys.readouterr().out


def test_cli_as_a_process_writes_the_seeded_set(tmp_path):
    """The console script in a fresh interpreter (its own hash seed) writes what the function makes."""
    script = Path(sys.executable).with_name("blip3o-rl")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "deploy.cli"]
    out = tmp_path / "sub" / "geneval.jsonl"  # the folder is made
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([*command, "prompts", "geneval", "--out", str(out), "--n", "300", "--seed", "11"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_text().splitlines() == geneval_lines(300, 11, print)
    # 300 x (0.7, 0.3, 0.1, 0.5, 0.1) / 1.7 = 123.53, 52.94, 17.65, 88.24, 17.65: the 3 left over go to
    # color_attr, colors, two_object
    shares = {tag: int(line.split()[1]) for line in done.stdout.splitlines()[1:6] for tag in [line.split()[0]]}
    assert shares == {"position": 123, "color_attr": 53, "colors": 18, "counting": 88, "two_object": 18}
    assert Counter(json.loads(line)["tag"] for line in out.read_text().splitlines()) == shares
    assert f"wrote 300 lines (300 distinct) to {out}" in done.stdout


def test_cli_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prompts", "ocr", "--out", str(tmp_path / "x.txt"), "--n", "0"])
    assert exit_.value.code == 2 and "argument --n: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["prompts", "geneval", "--out", str(tmp_path), "--n", "5"])
    assert exit_.value.code == 2 and f"blip3o-rl: error: cannot write {tmp_path}: it is a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["prompts", "ocr", "--out", str(blocker / "x.txt"), "--n", "5"])
    assert exit_.value.code == 2 and f"blip3o-rl: error: cannot write {blocker / 'x.txt'}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing half-written
