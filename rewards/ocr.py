"""OCR reward: PaddleOCR (PP-OCRv6, ONNX) reads the image; Flow-GRPO's edit-distance formula scores it.

Formula (Flow-GRPO `flow_grpo/ocr.py`): target = first double-quoted span of the prompt;
recognised = the recognised lines concatenated; both lower-cased with spaces removed;
distance = 0 if target is a substring of recognised, else min(Levenshtein(recognised, target),
len(target)); reward = 1 - distance / len(target).
Deviation: Flow-GRPO crashes on a prompt without quotes and on an empty target; we raise
`RewardInputError` (a 4xx on the API) instead.

Regions (spatial credit, rewards/scorer.py): one per recognised character, reward 1 if the
character is aligned to an equal target character, else 0 (a substitution, or an extra character:
with the target found as a substring, every character outside that occurrence), plus a region of
reward 0 for each target character the reading lacks (a deletion), placed where it should have
been: evenly in the gap between its aligned neighbours, or one mean character width before the first
/ after the last character. The alignment is an optimal Levenshtein alignment of the normalised
texts (ties: substitution, then deletion, then insertion).

Character boxes come from the recogniser's CTC columns: PaddleOCR 3.7 with `return_word_box` decodes
the column of every character (PaddleX `CTCLabelDecode.get_word_info`) and hands them to PaddleX's
`cal_ocr_word_box`, which merges them into per-word boxes. We put `ctc_character_boxes` in its place
(the pipeline module's name, `PADDLEX_WORD_BOX_HOOK`) so each character keeps its own box: centred
on its column, half as wide as the distance to its nearest neighbour, at most 0.6 line heights
wide. Without that seam (another PaddleX) the word boxes are split evenly among their characters,
which misplaces letters of a word with gaps ("c t" read as "ct"). The seam is process-wide and only
changes what `return_word_box` returns; the texts are the same.

Colour order: PaddleOCR (PaddleX) reads an array as BGR, as OpenCV does; our images are RGB, so
they are flipped before `predict`, as BLIP3o-NEXT does (`trl/trl/trainer/grpo_trainer.py`:
`np.array(img)[:, :, ::-1]` before `ocr_model.predict`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from rewards.errors import RewardInputError
from rewards.ocr_models import default_ocr_models_dir
from rewards.scorer import Region, pixel_region

_QUOTED = re.compile(r'"([^"]*)"')


class OcrConfig(BaseModel):
    """How the OCR scorer is built."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    size: Literal["small", "tiny"] = "small"
    """PP-OCRv6 model size: small reads hard images better, tiny is ~3x faster."""
    models_dir: Path | None = None
    """Folder holding PP-OCRv6_{size}_{det,rec}; `default_ocr_models_dir()` when unset."""
    cache_size: int = 0
    """Remember this many results keyed by the image's pixels (0 = no cache); useful when a
    deterministic renderer produces the same image again and again."""


@dataclass(frozen=True)
class OcrResult:
    """The reward of one image and what it was computed from."""

    reward: float
    recognized: str
    target: str
    regions: tuple[Region, ...] = ()
    """Per-character regions (module docstring); empty when nothing was read."""


@dataclass(frozen=True)
class Reading:
    """What PaddleOCR read in one image: the text and each non-space character's pixel box."""

    text: str
    characters: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()


def extract_target(prompt: str) -> str:
    """The first double-quoted span of `prompt` (Flow-GRPO's target); a clear error if none."""
    match = _QUOTED.search(prompt)
    if match is None:
        raise RewardInputError(
            "prompt has no double-quoted target text (expected e.g. 'a sign that says \"OPEN\"')",
            code="missing_quotes",
        )
    return match.group(1)


def normalise(text: str) -> str:
    """Lower-case and drop spaces, as Flow-GRPO does on both sides."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute all cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_reward(recognized: str, target: str) -> float:
    """Flow-GRPO's OCR reward in [0, 1] of `recognized` text against `target`."""
    want, got = normalise(target), normalise(recognized)
    if not want:
        raise RewardInputError("target text is empty (after removing spaces)", code="empty_target")
    distance = 0 if want in got else min(levenshtein(got, want), len(want))
    return 1.0 - distance / len(want)


def alignment(got: str, want: str) -> tuple[list[bool], list[int]]:
    """Which characters of `got` match `want`, and where `want`'s missing characters go.

    Returns (matched [len(got)], deletions): each deletion is the number of `got` characters before
    the spot where a target character is missing. With `want` a substring of `got` (distance 0 in
    Flow-GRPO's formula) the first occurrence matches and nothing is missing; otherwise an optimal
    Levenshtein alignment (backtrace ties: substitution/match, then deletion, then insertion)."""
    start = got.find(want)
    if start >= 0:
        return [start <= i < start + len(want) for i in range(len(got))], []
    rows, cols = len(got) + 1, len(want) + 1
    cost = [[0] * cols for _ in range(rows)]  # cost[i][j]: got[:i] -> want[:j]
    for i in range(rows):
        for j in range(cols):
            if i == 0 or j == 0:
                cost[i][j] = i + j
            else:
                cost[i][j] = min(cost[i - 1][j - 1] + (got[i - 1] != want[j - 1]), cost[i][j - 1] + 1, cost[i - 1][j] + 1)
    matched, deletions = [False] * len(got), []
    i, j = len(got), len(want)
    while i > 0 or j > 0:
        if i > 0 and j > 0 and cost[i][j] == cost[i - 1][j - 1] + (got[i - 1] != want[j - 1]):
            matched[i - 1] = got[i - 1] == want[j - 1]
            i, j = i - 1, j - 1
        elif j > 0 and cost[i][j] == cost[i][j - 1] + 1:  # want[j-1] missing after got[:i]
            deletions.append(i)
            j -= 1
        else:  # got[i-1] is extra
            i -= 1
    return matched, sorted(deletions)


def character_regions(reading: Reading, target: str, width: int, height: int) -> tuple[Region, ...]:
    """The regions of one reading against `target` (module docstring), boxes as image fractions."""
    chars = [(c.lower(), box) for c, box in reading.characters]
    got = "".join(c for c, _ in chars)
    if not chars or got != normalise(reading.text):  # no boxes, or boxes that do not spell the text
        return ()
    matched, deletions = alignment(got, normalise(target))
    regions = [pixel_region(box, width, height, float(ok)) for (_, box), ok in zip(chars, matched)]
    boxes = np.array([box for _, box in chars], dtype=np.float64)  # [n, 4]
    char_width = float((boxes[:, 2] - boxes[:, 0]).mean())
    for before in sorted(set(deletions)):
        count = deletions.count(before)
        left = boxes[before - 1, 2] if before > 0 else boxes[0, 0] - count * char_width
        right = boxes[before, 0] if before < len(boxes) else boxes[-1, 2] + count * char_width
        if right - left < 0.5 * count * char_width:  # no room: centre them on the spot
            middle = (left + right) / 2
            left, right = middle - count * char_width / 2, middle + count * char_width / 2
        near = boxes[max(before - 1, 0):before + 1]  # [<=2, 4] the neighbours' rows
        top, bottom = near[:, 1].min(), near[:, 3].max()
        step = (right - left) / count
        regions += [pixel_region((left + k * step, top, left + (k + 1) * step, bottom), width, height, 0.0)
                    for k in range(count)]
    return tuple(regions)


def split_words(words: list[str], boxes: list) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Each word's box (4 corner points) split evenly among its characters; spaces dropped."""
    characters = []
    for word, corners in zip(words, boxes, strict=True):
        points = np.asarray(corners, dtype=np.float64)  # [4, 2]
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        step = (x1 - x0) / max(len(word), 1)
        characters += [(c, (x0 + k * step, y0, x0 + (k + 1) * step, y1)) for k, c in enumerate(word) if c != " "]
    return characters


PADDLEX_WORD_BOX_HOOK = ("paddlex.inference.pipelines.ocr.pipeline", "cal_ocr_word_box")
"""Where PaddleX 3.x's OCR pipeline looks up the function that turns CTC columns into word boxes."""
CHARACTER_WIDTH_PER_LINE_HEIGHT = 0.6
"""Widest character box, in line heights (a bold Latin letter is about 0.5-0.7 of its line)."""


def ctc_character_boxes(rec_str: str, box, rec_word_info) -> tuple[list[str], list]:
    """Drop-in for PaddleX's `cal_ocr_word_box(rec_str, box, rec_word_info)`: every character its own
    "word", its box (4 corner points) centred on its CTC column. `rec_word_info` = (columns of the
    recogniser's output, word_list, word_col_list, state_list); `box` the line's detection quad."""
    col_num, word_list, word_col_list, _ = rec_word_info
    points = np.asarray(box, dtype=np.float64)  # [4, 2]
    x0, x1 = points[0][0], points[1][0]
    y0, y1 = points[0][1], points[2][1]
    chars = [c for word in word_list for c in word]
    columns = np.array([c for cols in word_col_list for c in cols], dtype=np.float64)  # [n]
    centres = x0 + (columns + 0.5) * (x1 - x0) / max(col_num, 1)  # [n] pixels
    half = np.full(len(centres), CHARACTER_WIDTH_PER_LINE_HEIGHT * (y1 - y0) / 2)  # [n]
    if len(centres) > 1:
        gaps = np.diff(centres)  # [n - 1]
        nearest = np.minimum(np.append(gaps, np.inf), np.insert(gaps, 0, np.inf))  # [n]
        half = np.minimum(half, nearest / 2)
    boxes = [((c - h, y0), (c + h, y0), (c + h, y1), (c - h, y1)) for c, h in zip(centres, half)]
    return chars, boxes


def install_character_boxes() -> bool:
    """Point PaddleX's OCR pipeline at `ctc_character_boxes`; False if this PaddleX has no such seam."""
    import importlib

    module_name, attribute = PADDLEX_WORD_BOX_HOOK
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    if not hasattr(module, attribute):
        return False
    setattr(module, attribute, ctc_character_boxes)
    return True


def reading_of(result) -> Reading:
    """A PaddleOCR result (predicted with `return_word_box=True`) as a Reading; characters are left out
    when the word boxes do not line up with the words (PaddleX sorts its boxes by position)."""
    text = "".join(result["rec_texts"])
    characters = []
    for words, boxes in zip(result.get("text_word", []), result.get("text_word_region", [])):
        if len(words) != len(boxes):
            return Reading(text)
        characters += split_words(list(words), list(boxes))
    return Reading(text, tuple(characters))


def check_image(image: np.ndarray) -> None:
    """Images are uint8 RGB [H, W, 3] with H, W > 0."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise RewardInputError(
            f"image must be a non-empty uint8 RGB array [H, W, 3], got {image.dtype} {image.shape}",
            code="bad_image",
        )


def to_bgr(image: np.ndarray) -> np.ndarray:
    """RGB [H, W, 3] -> the BGR array PaddleOCR expects (a contiguous copy)."""
    return np.ascontiguousarray(image[..., ::-1])


def pixel_key(image: np.ndarray) -> bytes:
    """Cache key: a hash of the shape and the pixels (identical renders share a result)."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


def _files_digest(paths: list[Path]) -> str:
    digest = hashlib.blake2b(digest_size=6)
    for path in paths:
        with path.open("rb") as file:
            digest.update(hashlib.file_digest(file, "blake2b").digest())
    return digest.hexdigest()


class OcrScorer:
    """PaddleOCR reader + Flow-GRPO reward; a plain class used in-process and behind the API."""

    def __init__(self, config: OcrConfig = OcrConfig()) -> None:
        # Local model folders only: never reach for a model hoster.
        os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
        from paddleocr import PaddleOCR

        root = config.models_dir or default_ocr_models_dir()
        det, rec = f"PP-OCRv6_{config.size}_det", f"PP-OCRv6_{config.size}_rec"
        for name in (det, rec):
            if not (root / name / "inference.onnx").is_file():
                raise FileNotFoundError(f"OCR model folder {root / name} missing (run scripts/setup.sh)")
        self._ocr = PaddleOCR(
            engine="onnxruntime",
            text_detection_model_dir=str(root / det),
            text_detection_model_name=det,
            text_recognition_model_dir=str(root / rec),
            text_recognition_model_name=rec,
            use_doc_orientation_classify=False,
            use_doc_unwarping=False,
            use_textline_orientation=False,
        )
        self.character_boxes = install_character_boxes()
        """Per-character CTC boxes (True) or word boxes split evenly (False: see the module docstring)."""
        self.version = f"{det}+{rec}#{_files_digest([root / det / 'inference.onnx', root / rec / 'inference.onnx'])}"
        """The models behind the numbers (names + a hash of their weights): on /readyz and every answer."""
        self._cache: OrderedDict[bytes, Reading] = OrderedDict()
        self._cache_size = config.cache_size
        self.cache_hits = 0

    def read(self, images: list[np.ndarray]) -> list[str]:
        """The recognised lines of each image, concatenated (cached by pixels when enabled)."""
        return [reading.text for reading in self.readings(images)]

    def readings(self, images: list[np.ndarray]) -> list[Reading]:
        """What each image reads and where its characters are (cached by pixels when enabled)."""
        for index, image in enumerate(images):
            try:
                check_image(image)
            except RewardInputError as error:
                raise error.at(index) from None
        keys = [pixel_key(image) for image in images] if self._cache_size else [b""] * len(images)
        found: list[Reading | None] = [self._cache.get(key) if self._cache_size else None for key in keys]
        self.cache_hits += sum(reading is not None for reading in found)
        todo = [i for i, reading in enumerate(found) if reading is None]
        if todo:
            results = self._ocr.predict([to_bgr(images[i]) for i in todo], return_word_box=True)
            for i, result in zip(todo, results, strict=True):
                found[i] = reading_of(result)
                self._remember(keys[i], found[i])
        return [reading or Reading("") for reading in found]

    def score(self, images: list[np.ndarray], targets: list[str]) -> list[OcrResult]:
        """Reward and regions of each image for its target text (not a prompt: see `extract_target`)."""
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        for index, target in enumerate(targets):
            if not normalise(target):
                raise RewardInputError("target text is empty (after removing spaces)", index, "empty_target")
        readings = self.readings(images)
        return [OcrResult(ocr_reward(r.text, target), r.text, target,
                          character_regions(r, target, image.shape[1], image.shape[0]))
                for r, target, image in zip(readings, targets, images)]

    def _remember(self, key: bytes, reading: Reading) -> None:
        if not self._cache_size:
            return
        self._cache[key] = reading
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
