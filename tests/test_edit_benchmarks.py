"""The published edit benchmarks' loaders (rl/prompts/edit_benchmarks.py) on tiny hand-made files.

Each file mirrors its benchmark's published field names (ImgEdit's basic_edit.json / UGE_edit.json,
GEdit-Bench's parquet, PIE-Bench's mapping_file.json); images are written by PIL. Cheap: no model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rl.prompts.edit import EditDataError, load_pixels
from rl.prompts.edit_benchmarks import decode_rle, detect_format, load_edit_benchmark


def write_image(path: Path, width: int, height: int, value: int = 100, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path, format=fmt)
    return path


def encoded(width: int, height: int, value: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


# ---- ImgEdit ------------------------------------------------------------------------------------

def test_imgedit_basic_and_uge_files(tmp_path):
    images = tmp_path / "Benchmark" / "singleturn"
    write_image(images / "animal" / "000342021.jpg", 16, 12, fmt="JPEG")
    write_image(images / "000029784.jpg", 16, 12, fmt="JPEG")
    basic = tmp_path / "basic_edit.json"  # {key: {id, prompt, edit_type}} as in Benchmark/Basic/basic_edit.json
    basic.write_text(json.dumps({"1082": {"id": "animal/000342021.jpg",
                                          "prompt": "Change the tortoise's shell texture to a smooth surface.",
                                          "edit_type": "adjust"}}))
    uge = tmp_path / "UGE_edit.json"  # Benchmark/UGE/UGE_edit.json: no edit_type
    uge.write_text(json.dumps({"1": {"id": "000029784.jpg", "prompt": "Remove the lemon slice inside the glass."}}))

    assert detect_format(basic) == detect_format(uge) == "imgedit"
    [line] = load_edit_benchmark(basic, None, tmp_path / "work", images=images)
    assert (line.key, line.category, line.caption) == ("1082", "adjust", "")
    assert line.record.prompt == "Change the tortoise's shell texture to a smooth surface."
    assert line.record.image == images / "animal" / "000342021.jpg" and line.record.mask is None
    [line] = load_edit_benchmark(uge, "imgedit", tmp_path / "work", images=images)
    assert (line.key, line.category, line.record.image) == ("1", "", images / "000029784.jpg")

    with pytest.raises(EditDataError, match=r"basic_edit.json: line '1082': image .*000342021.jpg does not exist"):
        load_edit_benchmark(basic, None, tmp_path / "work")  # default images folder: the file's own


# ---- PIE-Bench ----------------------------------------------------------------------------------

def test_piebench_rle_decodes_to_the_hand_made_mask(tmp_path):
    # a 6 x 8 (H x W) mask, 48 pixels row-major; runs (start, length): (9, 3) (20, 2) (46, 10), the
    # last cut at the end: 46, 47. Then PIE-Bench's mask_decode sets the one-pixel border to 1.
    expected = np.zeros((6, 8), dtype=bool)
    for flat in (9, 10, 11, 20, 21, 46, 47):
        expected[divmod(flat, 8)] = True
    inside = expected.copy()
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = True
    assert np.array_equal(decode_rle([9, 3, 20, 2, 46, 10], 6, 8, border=False), inside)
    assert np.array_equal(decode_rle([9, 3, 20, 2, 46, 10], 6, 8), expected)
    # interior pixels that are edit region: (1, 1) (1, 2) (1, 3) = 9, 10, 11; (2, 4) (2, 5) = 20, 21
    assert sorted(map(tuple, np.argwhere(inside[1:-1, 1:-1]) + 1)) == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5)]

    root = tmp_path / "data"
    write_image(root / "annotation_images" / "0_random_140" / "000000000000.jpg", 8, 6, fmt="JPEG")
    write_image(root / "annotation_images" / "6_change_attribute_color_40" / "1_artificial" / "611000000000.jpg", 8, 6,
                fmt="JPEG")
    mapping = root / "mapping_file.json"
    mapping.write_text(json.dumps({
        "000000000000": {"image_path": "0_random_140/000000000000.jpg",
                         "original_prompt": "a slanted mountain bicycle on the road in front of a building",
                         "editing_prompt": "a slanted [rusty] mountain bicycle on the road in front of a building",
                         "editing_instruction": "Make the frame of the bike rusty", "editing_type_id": "0",
                         "blended_word": "bicycle bicycle", "mask": [9, 3, 20, 2, 46, 10]},
        "611000000000": {"image_path": "6_change_attribute_color_40/1_artificial/611000000000.jpg",
                         "original_prompt": "a [red] heart", "editing_prompt": "a [pink] heart",
                         "editing_instruction": "Make the heart pink", "editing_type_id": "6",
                         "blended_word": "heart heart", "mask": []},
    }))
    assert detect_format(mapping) == "piebench"
    first, second = load_edit_benchmark(mapping, None, tmp_path / "work")  # images: annotation_images/ beside it
    assert (first.key, first.category, first.record.prompt) == ("000000000000", "0", "Make the frame of the bike rusty")
    assert first.caption == "a slanted rusty mountain bicycle on the road in front of a building"
    assert first.record.image == root / "annotation_images" / "0_random_140" / "000000000000.jpg"
    source, mask = load_pixels(first.record)  # the mask PNG read back by the reward service's rule
    assert source.shape == (6, 8, 3) and np.array_equal(mask, expected)
    _, border_only = load_pixels(second.record)  # no runs: only the border (2 rows of 8, 2 columns of 4 more)
    assert border_only.sum() == 2 * 8 + 2 * 4 and (second.category, second.caption) == ("6", "a pink heart")

    broken = tmp_path / "broken" / "mapping_file.json"
    write_image(broken.parent / "annotation_images" / "a.jpg", 8, 6, fmt="JPEG")
    broken.write_text(json.dumps({"k7": {"image_path": "a.jpg", "editing_prompt": "x", "editing_instruction": "y",
                                         "mask": [1, 2, 3]}}))
    with pytest.raises(EditDataError, match=r"line 'k7': an RLE mask has an even number of values"):
        load_edit_benchmark(broken, "piebench", tmp_path / "work2")


# ---- GEdit-Bench --------------------------------------------------------------------------------

def write_gedit(path: Path, rows: list[dict]) -> None:
    """A parquet with GEdit-Bench's columns; images as datasets' Image feature stores them: {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("task_type", pa.string()), ("key", pa.string()), ("instruction", pa.string()),
                        ("instruction_language", pa.string()), ("input_image", image), ("input_image_raw", image),
                        ("Intersection_exist", pa.bool_())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_gedit_parquet_rows_become_records_with_their_images(tmp_path):
    png, jpeg, raw = encoded(12, 10, 50, "PNG"), encoded(12, 10, 200, "JPEG"), encoded(24, 20, 0, "PNG")
    rows = [
        {"task_type": "color_alter", "key": "a1", "instruction": "Make the car blue", "instruction_language": "en",
         "input_image": {"bytes": png, "path": None}, "input_image_raw": {"bytes": raw, "path": None},
         "Intersection_exist": True},
        {"task_type": "color_alter", "key": "a1", "instruction": "把车变成蓝色", "instruction_language": "cn",
         "input_image": {"bytes": png, "path": None}, "input_image_raw": {"bytes": raw, "path": None},
         "Intersection_exist": True},
        {"task_type": "text_change", "key": "b2", "instruction": "Replace the text with 'OPEN'",
         "instruction_language": "en", "input_image": {"bytes": jpeg, "path": None},
         "input_image_raw": {"bytes": raw, "path": None}, "Intersection_exist": False},
    ]
    data = tmp_path / "GEdit-Bench" / "data"
    write_gedit(data / "train-00000-of-00001.parquet", rows)
    assert detect_format(data / "train-00000-of-00001.parquet") == detect_format(data) == "gedit"

    work = tmp_path / "work"
    english = load_edit_benchmark(data, None, work)  # English by default, as GEdit-Bench-EN is reported
    assert [(e.key, e.category, e.record.prompt) for e in english] == [
        ("en/a1", "color_alter", "Make the car blue"), ("en/b2", "text_change", "Replace the text with 'OPEN'")]
    assert english[0].record.image == work / "gedit" / "color_alter" / "en" / "a1.png"
    assert english[1].record.image == work / "gedit" / "text_change" / "en" / "b2.jpg"
    assert english[0].record.image.read_bytes() == png and english[1].record.image.read_bytes() == jpeg  # as stored
    assert load_pixels(english[0].record)[0].shape == (10, 12, 3)  # input_image, not input_image_raw (20 x 24)
    both = load_edit_benchmark(data / "train-00000-of-00001.parquet", "gedit", work, language=None)
    assert [e.key for e in both] == ["en/a1", "cn/a1", "en/b2"]
    assert both[1].record.prompt == "把车变成蓝色"

    write_gedit(tmp_path / "other.parquet", [{**rows[0], "input_image": None}])
    with pytest.raises(EditDataError, match=r"key 'a1' \(en\): input_image holds no image bytes"):
        load_edit_benchmark(tmp_path / "other.parquet", None, work)


# ---- ours, and detection ------------------------------------------------------------------------

def test_our_jsonl_and_what_detection_refuses(tmp_path):
    write_image(tmp_path / "images" / "a.png", 16, 16)
    ours = tmp_path / "edits.jsonl"
    ours.write_text(json.dumps({"prompt": "make it red", "image": "images/a.png",
                                "target": {"color": "red", "caption": "a red square"}}) + "\n")
    [line] = load_edit_benchmark(ours, None, tmp_path / "work")
    assert (line.key, line.category, line.caption, line.record.target["color"]) == ("0", "", "a red square", "red")

    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"1": {"instruction": "x", "source": "y"}}))
    with pytest.raises(EditDataError, match=r"neither PIE-Bench's mapping_file.json nor ImgEdit's; give --format"):
        detect_format(odd)
    with pytest.raises(EditDataError, match="give --format"):
        detect_format(tmp_path / "images" / "a.png")
    with pytest.raises(EditDataError, match="an images folder is for the imgedit and piebench formats, not edit"):
        load_edit_benchmark(ours, None, tmp_path / "work", images=tmp_path)
