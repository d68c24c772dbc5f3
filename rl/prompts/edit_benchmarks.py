"""Published image-editing benchmarks, read in their own file formats, as our edit records.

The user provides the files (nothing is downloaded). Each loader maps a benchmark line to an
`EditRecord` (rl/prompts/edit.py: instruction, source image, optional mask) plus what the edit
bench reports it by: the benchmark's own key, its category, and the target caption CLIP-T compares
with (`BenchEdit`).

    format    file (--data)                          read from (ImgEdit at commit 547185d, Step1X-Edit 570eba6,
                                                     PnPInversion 07f97f4)
    edit      our edit JSONL                         rl/prompts/edit.py
    imgedit   {key: {"id": image path under the      PKU-YuanGroup/ImgEdit Benchmark/Basic/basic_edit.json,
              images folder, "prompt": instruction,  basic_bench.py (origin_img_root/id), basic_bench_readme.md;
              "edit_type"?}}                         Benchmark/UGE/UGE_edit.json has no edit_type
    gedit     parquet of the HF dataset              stepfun-ai/Step1X-Edit GEdit-Bench/generate_image_example.py,
              stepfun-ai/GEdit-Bench: task_type,     test_gedit_score.py (the judge compares the edit with
              key, instruction, instruction_language, `input_image`, saved as {key}_SRCIMG.png)
              input_image, input_image_raw (images
              as {bytes, path}), Intersection_exist
    piebench  mapping_file.json: {key: {image_path,  cure-lab/PnPInversion README.md, evaluation/evaluate.py
              original_prompt, editing_prompt,       (`mask_decode`, the CLIP similarity against
              editing_instruction, editing_type_id,  editing_prompt without its brackets)
              blended_word, mask (RLE)}}

Mapping, per format:
- imgedit: instruction = `prompt`, source = IMAGES/`id` (IMAGES = the images folder, by default the
  file's folder), category = `edit_type` ("" in UGE), no mask, no target caption.
- gedit: instruction = `instruction`, source = `input_image` (the image the benchmark's judge compares
  with; written out as it is stored, under the work folder), category = `task_type`, key =
  "{instruction_language}/{key}"; only the lines of `language` (en by default: GEdit-Bench-EN is what
  papers report; None keeps both).
- piebench: instruction = `editing_instruction` (what instruction-based editors get in PnPInversion's
  run_editing_instructpix2pix.py), source = IMAGES/`image_path` (IMAGES by default
  annotation_images/ beside the file), mask = the decoded RLE written as a PNG under the work folder,
  category = `editing_type_id`, target caption = `editing_prompt` with "[" and "]" removed.

PIE-Bench's RLE (`mask_decode`): a flat list [start0, length0, start1, length1, ...] of runs of 1s
over the row-major flattened H x W mask (1 = the region to edit); a run past the end is cut there.
`mask_decode` then sets the one-pixel image border to 1 "to avoid annotation errors in boundary";
we do the same, so our background metrics cover exactly PIE-Bench's pixels.

Format detection (`detect_format`, when --format is not given): .jsonl -> edit; .parquet or a
folder of them -> gedit; a .json object whose first value has `editing_instruction` and `mask` ->
piebench, `id` and `prompt` -> imgedit; anything else is an error asking for --format.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image

from rl.prompts.edit import EditDataError, EditRecord, image_size, read_edit_file

EditFormat = Literal["edit", "imgedit", "gedit", "piebench"]
FORMATS: tuple[str, ...] = get_args(EditFormat)
GEDIT_COLUMNS = ("task_type", "key", "instruction", "instruction_language", "input_image")


@dataclass(frozen=True)
class BenchEdit:
    """One line of an edit benchmark: our record, and what the edit bench reports it by."""

    record: EditRecord
    key: str
    """The benchmark's own id of the line (our format: the line's index among the edits)."""
    category: str = ""
    """The benchmark's edit type (ImgEdit edit_type, GEdit task_type, PIE-Bench editing_type_id)."""
    caption: str = ""
    """The target caption CLIP-T compares the output with: PIE-Bench's editing_prompt, our format's
    `target.caption`; "" = none."""


def detect_format(path: Path) -> EditFormat:
    """The format of `path` from its suffix, and for .json from its first line's fields (module docstring)."""
    if path.is_dir():
        if any(path.rglob("*.parquet")):
            return "gedit"
        raise EditDataError(f"{path} is a folder without *.parquet files: give an edit file (--format to say which)")
    if path.suffix == ".jsonl":
        return "edit"
    if path.suffix == ".parquet":
        return "gedit"
    if path.suffix == ".json":
        first = next(iter(read_json_object(path).values()), None)
        fields = set(first) if isinstance(first, dict) else set()
        if {"editing_instruction", "mask"} <= fields:
            return "piebench"
        if {"id", "prompt"} <= fields:
            return "imgedit"
        raise EditDataError(f"{path}: its lines have fields {sorted(fields)}, neither PIE-Bench's mapping_file.json "
                            "nor ImgEdit's; give --format")
    raise EditDataError(f"cannot tell the format of {path} from its name: give --format ({', '.join(FORMATS)})")


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object (ImgEdit's and PIE-Bench's layout: key -> line)."""
    if not path.is_file():
        raise EditDataError(f"edit file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EditDataError(f"{path}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict) or not data:
        raise EditDataError(f"{path}: expected a non-empty JSON object of key -> edit")
    return data


def decode_rle(runs: list[int], height: int, width: int, border: bool = True) -> np.ndarray:
    """PIE-Bench's `mask_decode`: bool [H, W], True on the runs (start, length) of the row-major
    flattened mask, cut at its end; with `border`, the one-pixel image border is True too."""
    if len(runs) % 2:
        raise ValueError(f"an RLE mask has an even number of values (start, length pairs), got {len(runs)}")
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(runs[0::2], runs[1::2]):
        if start < 0 or length < 0:
            raise ValueError(f"RLE run ({start}, {length}) is negative")
        flat[start : start + length] = True  # a slice stops at the end: min(length, H*W - start)
    mask = flat.reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def _line(data: dict, key: str, fields: tuple[str, ...], path: Path) -> dict:
    """The line `key` of a JSON-object benchmark, checked to hold `fields`."""
    line = data[key]
    missing = [name for name in fields if not isinstance(line, dict) or name not in line]
    if missing:
        raise EditDataError(f"{path}: line {key!r} has no {', '.join(missing)}")
    return line


def _source(root: Path, relative: str, path: Path, key: str) -> Path:
    image = root / relative
    try:
        image_size(image, "image")
    except OSError as error:
        raise EditDataError(f"{path}: line {key!r}: {error}") from None
    return image


def load_imgedit(path: Path, images: Path | None = None) -> list[BenchEdit]:
    """ImgEdit-Bench's basic_edit.json or UGE_edit.json; sources under `images` (default: the file's folder)."""
    data = read_json_object(path)
    root = images or path.parent
    edits = []
    for key in data:
        line = _line(data, key, ("id", "prompt"), path)
        record = EditRecord(prompt=line["prompt"], image=_source(root, line["id"], path, key))
        edits.append(BenchEdit(record, str(key), str(line.get("edit_type", ""))))
    return edits


def load_piebench(path: Path, work_dir: Path, images: Path | None = None) -> list[BenchEdit]:
    """PIE-Bench's mapping_file.json; sources under `images` (default: annotation_images/ beside the
    file); each decoded mask written to work_dir/piebench_masks/KEY.png (white = edit)."""
    data = read_json_object(path)
    root = images or path.parent / "annotation_images"
    masks = work_dir / "piebench_masks"
    masks.mkdir(parents=True, exist_ok=True)
    edits = []
    for key in data:
        line = _line(data, key, ("image_path", "editing_prompt", "editing_instruction", "mask"), path)
        source = _source(root, line["image_path"], path, key)
        width, height = image_size(source, "image")
        try:
            mask = decode_rle(line["mask"], height, width)
        except (TypeError, ValueError) as error:
            raise EditDataError(f"{path}: line {key!r}: {error}") from None
        mask_path = masks / f"{key}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        record = EditRecord(prompt=line["editing_instruction"], image=source, mask=mask_path)
        caption = line["editing_prompt"].replace("[", "").replace("]", "")
        edits.append(BenchEdit(record, str(key), str(line.get("editing_type_id", "")), caption))
    return edits


def parquet_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise EditDataError(f"no parquet file at {path}")
    return files


def stored_image(data: bytes) -> tuple[str, bytes]:
    """(suffix, bytes) to write an embedded image with: a PNG or JPEG as it is stored (no re-encoding),
    any other format as PNG."""
    with Image.open(io.BytesIO(data)) as picture:
        if picture.format in ("PNG", "JPEG"):
            return (".png" if picture.format == "PNG" else ".jpg"), data
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return ".png", buffer.getvalue()


def load_gedit(path: Path, work_dir: Path, language: str | None = "en") -> list[BenchEdit]:
    """GEdit-Bench's parquet file (or a folder of its shards); each `input_image` written, bytes as
    stored, to work_dir/gedit/TASK_TYPE/LANGUAGE/KEY.png|jpg; only `language`'s lines (None: all)."""
    import pyarrow.parquet as pq

    edits = []
    for file in parquet_files(path):
        table = pq.read_table(file)
        missing = [name for name in GEDIT_COLUMNS if name not in table.column_names]
        if missing:
            raise EditDataError(f"{file}: not GEdit-Bench's parquet, no column {', '.join(missing)}")
        for row in table.select(list(GEDIT_COLUMNS)).to_pylist():
            if language is not None and row["instruction_language"] != language:
                continue
            image = row["input_image"] or {}
            data = image.get("bytes") if isinstance(image, dict) else None
            where = f"{file}: key {row['key']!r} ({row['instruction_language']})"
            if not data:
                raise EditDataError(f"{where}: input_image holds no image bytes")
            try:
                suffix, data = stored_image(data)
            except OSError as error:
                raise EditDataError(f"{where}: input_image is not an image ({error})") from None
            source = work_dir / "gedit" / row["task_type"] / row["instruction_language"] / f"{row['key']}{suffix}"
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(data)
            record = EditRecord(prompt=row["instruction"], image=source)
            edits.append(BenchEdit(record, f"{row['instruction_language']}/{row['key']}", row["task_type"]))
    if not edits:
        raise EditDataError(f"{path}: no GEdit-Bench line with instruction_language {language!r}")
    return edits


def load_ours(path: Path) -> list[BenchEdit]:
    """Our edit JSONL (rl/prompts/edit.py); `target.caption`, if a line has one, is its CLIP-T caption."""
    return [BenchEdit(record, str(index), caption=str(record.target.get("caption", "")))
            for index, record in enumerate(read_edit_file(path))]


def load_edit_benchmark(path: Path, fmt: EditFormat | None, work_dir: Path, images: Path | None = None,
                        language: str | None = "en") -> list[BenchEdit]:
    """The lines of an edit benchmark file, in the file's order. `fmt` None: `detect_format`.
    `work_dir` receives what the file embeds or encodes (GEdit's images, PIE-Bench's masks);
    `images` is where ImgEdit's and PIE-Bench's source images are; `language` filters GEdit-Bench
    (other formats ignore it). EditDataError naming the file (and line) of the first problem."""
    fmt = fmt or detect_format(path)
    if images is not None and fmt not in ("imgedit", "piebench"):
        raise EditDataError(f"an images folder is for the imgedit and piebench formats, not {fmt}")
    if fmt == "edit":
        return load_ours(path)
    if fmt == "imgedit":
        return load_imgedit(path, images)
    if fmt == "piebench":
        return load_piebench(path, work_dir, images)
    return load_gedit(path, work_dir, language)
