"""Edit data: the JSONL loader (paths, every error naming file and line), the `edit` prompt source,
and `blip3o-rl prompts edit` (files, masks over the changed word's tiles, train/eval disjoint)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.cli import main as cli
from rl.prompts.edit import EVAL_WORDS, TRAIN_WORDS, EditDataError, load_pixels, read_edit_file
from rl.prompts.sources import EvalPromptOverlapError, PromptSourceConfig, load_source


def write_png(path: Path, size: tuple[int, int], value: int = 255, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    write_png(tmp_path / "img" / "a.png", (20, 10), 40)
    mask = np.zeros((10, 20), np.uint8)
    mask[:, 5:10] = 255
    Image.fromarray(mask).save(tmp_path / "img" / "a_mask.png")
    write_png(tmp_path / "img" / "small_mask.png", (10, 10), 255, "L")
    (tmp_path / "img" / "garbage.png").write_bytes(b"not an image at all")
    return tmp_path


def test_read_edit_file_resolves_paths_and_fields(folder):
    absolute = str(folder / "img" / "a.png")
    path = write_lines(folder / "edits.jsonl", [
        {"prompt": "make it red", "image": "img/a.png"},
        "",
        {"prompt": "change the word a to b", "image": absolute, "requirement": "only the word changes",
         "mask": "img/a_mask.png", "target": {"text": "b"}},
    ])
    first, second = read_edit_file(path)
    assert (first.prompt, first.image, first.mask, first.target, first.requirement) == (
        "make it red", folder / "img" / "a.png", None, {}, "")
    assert (second.image, second.mask, second.target) == (Path(absolute), folder / "img" / "a_mask.png", {"text": "b"})
    assert second.requirement == "only the word changes"
    source, mask = load_pixels(second)
    assert source.shape == (10, 20, 3) and source.dtype == np.uint8 and int(source[0, 0, 0]) == 40
    assert mask.shape == (10, 20) and mask[:, 5:10].all() and not mask[:, :5].any() and not mask[:, 10:].any()
    assert load_pixels(first)[1] is None


@pytest.mark.parametrize("line, words", [
    ("{not json", "edits.jsonl:2: not JSON"),
    ('["a list"]', "edits.jsonl:2: not an edit line"),
    ({"image": "img/a.png"}, "edits.jsonl:2: not an edit line: prompt: Field required"),
    ({"prompt": "x", "image": "img/a.png", "colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"prompt": "x", "image": "img/missing.png"}, "missing.png does not exist"),
    ({"prompt": "x", "image": "img/garbage.png"}, "garbage.png is not a readable image"),
    ({"prompt": "x", "image": "img/a.png", "mask": "img/none.png"}, "none.png does not exist"),
    ({"prompt": "x", "image": "img/a.png", "mask": "img/small_mask.png"}, "is 10x10 but image"),
])
def test_read_edit_file_errors_name_file_and_line(folder, line, words):
    path = write_lines(folder / "edits.jsonl", [{"prompt": "fine", "image": "img/a.png"}, line])
    with pytest.raises(EditDataError) as error:
        read_edit_file(path)
    assert str(error.value).startswith(f"{path}:2: "), error.value
    assert words in str(error.value), error.value


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(EditDataError, match="does not exist"):
        read_edit_file(tmp_path / "nope.jsonl")
    with pytest.raises(EditDataError, match="holds no edits"):
        read_edit_file(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(ValueError, match="needs a 'path'"):
        PromptSourceConfig(kind="edit")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """A training set (seed 0) and an evaluation set (seed 1) written by the CLI into one folder."""
    root = tmp_path_factory.mktemp("edit-sets")
    cli(["prompts", "edit", "--out", str(root / "train.jsonl"), "--n", "40"])
    cli(["prompts", "edit", "--out", str(root / "eval.jsonl"), "--n", "12", "--split", "eval", "--seed", "1"])
    return root / "train.jsonl", root / "eval.jsonl"


def test_cli_writes_images_and_masks_over_the_changed_word(synthetic):
    train, evaluation = synthetic
    for path, count in ((train, 40), (evaluation, 12)):
        records = read_edit_file(path)  # every image and mask exists, reads, and sizes match
        assert len(records) == count and len({r.prompt + r.image.name for r in records}) == count
        for record in records:
            word, new = record.prompt.removeprefix("change the word ").split(" to ")
            left, right = record.image.stem.split("_")
            assert record.target == {"text": new} and word in (left, right) and new not in (left, right)
            source, mask = load_pixels(record)
            assert source.shape == (64, 256, 3) and mask.shape == (64, 256)
            start = 0 if left == word else 4  # tiles of 32 px: "cat sun" has sun at tiles 4-6
            assert mask[:, start * 32 : (start + 3) * 32].all() and mask.sum() == 64 * 96
            inked = (source < 128).any(axis=(0, 2))  # [256] columns with dark pixels
            assert inked[mask[0]].any() and inked[~mask[0]].any()  # the word inside, the kept word outside


def test_cli_sets_are_deterministic_and_train_eval_disjoint(synthetic, tmp_path):
    train, evaluation = synthetic
    again = tmp_path / "again.jsonl"
    cli(["prompts", "edit", "--out", str(again), "--n", "40"])
    assert again.read_text() == train.read_text()
    train_records, eval_records = read_edit_file(train), read_edit_file(evaluation)
    train_words = {w for r in train_records for w in (*r.image.stem.split("_"), r.target["text"])}
    eval_words = {w for r in eval_records for w in (*r.image.stem.split("_"), r.target["text"])}
    assert train_words <= set(TRAIN_WORDS) and eval_words <= set(EVAL_WORDS) and not train_words & eval_words
    assert not {r.prompt for r in train_records} & {r.prompt for r in eval_records}
    # as prompt sources: the training set loads, the evaluation set is refused for training
    items = load_source(PromptSourceConfig(kind="edit", path=train))
    assert len(items) == 40 and all(i.task == "edit" and i.edit is not None and i.caption == i.edit.prompt
                                    for i in items)
    with pytest.raises(EvalPromptOverlapError, match="synthetic edit evaluation set"):
        load_source(PromptSourceConfig(kind="edit", path=evaluation))
    assert len(load_source(PromptSourceConfig(kind="edit", path=evaluation, allow_eval_prompts=True))) == 12


def test_a_run_configs_data_takes_edit_sources_alone(synthetic):
    """The edit rollout puts the source in the prompt, so edit sources train; beside text-to-image sources
    they are refused (the mix's edit rewards would score rows without a source)."""
    from rl.run.config import DataSection

    train, _ = synthetic
    assert DataSection(sources=[PromptSourceConfig(kind="edit", path=train)]).edits
    with pytest.raises(ValueError, match="edit sources cannot share a run with text-to-image sources"):
        DataSection(sources=[PromptSourceConfig(kind="edit", path=train), PromptSourceConfig(kind="words", words=["we"])])


def test_cli_refuses_more_edits_than_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_code:
        cli(["prompts", "edit", "--out", str(tmp_path / "big.jsonl"), "--n", "5000", "--split", "eval"])
    assert exit_code.value.code == 2
    assert "between 1 and 2640" in capsys.readouterr().err  # 12 * 11 * 10 word triples, 2 orders
