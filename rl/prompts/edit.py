"""Edit data: a source image, an instruction, and what the edit should produce.

One JSON object a line (Edit-R1's fields, then ours):

    {"prompt": "change the word cat to dog",     the instruction (the AR model's prompt)
     "image": "images/cat_sun.png",              the source image
     "requirement": "...",                       optional: what a judge checks (Edit-R1)
     "mask": "masks/tiles_0_3.png",              optional: the region to edit, white = edit
     "target": {"text": "dog"}}                  optional: what a programmatic check wants
                                                 (edit_ocr reads target.text)

Paths are relative to the file's directory (absolute ones are kept). Every line is checked when the
file loads: a malformed line, a missing or unreadable image or mask, a mask whose size differs from
its image's are errors naming the file and the line. Images are checked from their headers and
PIL's `verify` (no pixels decoded), so loading a large set stays fast; `load_pixels` decodes one
record's source and mask when a rollout needs them.

The synthetic sets of the CPU demos (`blip3o-rl prompts edit`, rl/prompts/edit_synthetic.py)
draw training words from TRAIN_WORDS and evaluation words from EVAL_WORDS; a training source whose
target text is an evaluation word is refused (rl/prompts/sources.py `eval_overlap`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rewards.scorer import EditSource, mask_of

TRAIN_WORDS = ("cat", "dog", "sun", "red", "box", "cup", "hat", "pen", "map", "key", "bus", "car",
               "fox", "owl", "bee", "ant", "egg", "ice", "jam", "kit", "log", "mud", "net", "oak")
"""Words of the synthetic training edits (3 letters: every one fits the glyph demo's 8-tile row twice)."""
EVAL_WORDS = ("pig", "cow", "sky", "toy", "bag", "bat", "bed", "fan", "gum", "hen", "ink", "jar")
"""Words of the synthetic evaluation edits: no training edit changes a word into one of them."""


class SyntheticEdits(BaseModel):
    """A synthetic edit set (rl/prompts/edit_synthetic.py) a run writes at its source's `path` when the
    file does not exist yet; `blip3o-rl prompts edit` with the same arguments writes the same files."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    n: int = Field(ge=1)
    """Edits to write."""
    seed: int = 0
    """The same seed writes the same set."""
    words: list[str] = []
    """Words of the source rows (the word to change and the kept one); empty: TRAIN_WORDS."""
    targets: list[str] = []
    """Words an edit changes to; empty: the source words. A target of the evaluation set is refused."""

    def overlap(self) -> str | None:
        """Why this set would hold words of the evaluation set (None: it does not)."""
        evaluated = sorted((set(self.words) | set(self.targets)) & set(EVAL_WORDS))
        return f"{evaluated} are words of the synthetic edit evaluation set" if evaluated else None


class EditDataError(ValueError):
    """An edit file that cannot be used; the message names the file and the line."""


class EditLine(BaseModel):
    """One line of an edit file as written (paths still relative)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    prompt: str = Field(min_length=1)
    """The edit instruction."""
    image: str = Field(min_length=1)
    """Path of the source image."""
    requirement: str = ""
    """What a judge checks the edit against (Edit-R1's field)."""
    mask: str | None = None
    """Path of the mask, white = the region to edit."""
    target: dict[str, Any] = {}
    """What a programmatic check wants, e.g. {"text": "dog"}."""


@dataclass(frozen=True)
class EditRecord:
    """One edit to train or evaluate on, its files resolved and checked."""

    prompt: str
    image: Path
    """The source image (absolute)."""
    requirement: str = ""
    mask: Path | None = None
    """The mask (absolute), white = edit; None = no region given."""
    target_json: str = "{}"
    """`target` as JSON text (a frozen record stays hashable); read it with `target`."""

    @property
    def target(self) -> dict[str, Any]:
        return json.loads(self.target_json)


def image_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) of a PNG or JPEG file from its header, checked with PIL's `verify`; OSError
    with the reason when it is missing or unreadable."""
    if not path.is_file():
        raise OSError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as picture:
            size = picture.size
            picture.verify()
    except (OSError, SyntaxError, ValueError) as error:  # PIL's verify raises SyntaxError on bad chunks
        raise OSError(f"{what} {path} is not a readable image ({error})") from None
    return size


def parse_line(text: str, directory: Path) -> EditRecord:
    """One line -> its record (paths resolved against `directory`, files checked); ValueError / OSError."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg} at column {error.colno})") from None
    try:
        line = EditLine.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "line"
        raise ValueError(f"not an edit line: {where}: {first['msg']}") from None
    image = directory / line.image
    size = image_size(image, "image")
    mask = None
    if line.mask is not None:
        mask = directory / line.mask
        mask_size = image_size(mask, "mask")
        if mask_size != size:
            raise ValueError(f"mask {mask} is {mask_size[0]}x{mask_size[1]} but image {image} is {size[0]}x{size[1]}")
    return EditRecord(line.prompt, image, line.requirement, mask, json.dumps(line.target, sort_keys=True))


def read_edit_file(path: Path) -> list[EditRecord]:
    """Every edit of a JSONL file, in order (blank lines skipped); EditDataError naming the file and
    line of the first problem."""
    if not path.is_file():
        raise EditDataError(f"edit file {path} does not exist")
    records = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            records.append(parse_line(text, path.parent))
        except (ValueError, OSError) as error:
            raise EditDataError(f"{path}:{number}: {error}") from None
    if not records:
        raise EditDataError(f"edit file {path} holds no edits")
    return records


def edit_source(record: EditRecord) -> EditSource:
    """The record's pixels as the reward client sends them (`load_pixels`)."""
    return EditSource(*load_pixels(record))


def load_pixels(record: EditRecord) -> tuple[np.ndarray, np.ndarray | None]:
    """The record's source, uint8 RGB [H, W, 3], and its mask, bool [H, W] True = edit (None if none);
    masks read by the reward service's rule (rewards/scorer.py `mask_of`)."""
    with Image.open(record.image) as picture:
        source = np.asarray(picture.convert("RGB"))
    if record.mask is None:
        return source, None
    with Image.open(record.mask) as picture:
        return source, mask_of(np.asarray(picture.convert("L")))
