"""OCR reward: PaddleOCR (PP-OCRv6, ONNX) reads the image; Flow-GRPO's edit-distance formula scores it.

Formula (Flow-GRPO `flow_grpo/ocr.py`): target = first double-quoted span of the prompt;
recognised = the recognised lines concatenated; both lower-cased with spaces removed;
distance = 0 if target is a substring of recognised, else min(Levenshtein(recognised, target),
len(target)); reward = 1 - distance / len(target).
Deviation: Flow-GRPO crashes on a prompt without quotes and on an empty target; we raise
`RewardInputError` (a 4xx on the API) instead.

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
        self.version = f"{det}+{rec}#{_files_digest([root / det / 'inference.onnx', root / rec / 'inference.onnx'])}"
        """The models behind the numbers (names + a hash of their weights): on /readyz and every answer."""
        self._cache: OrderedDict[bytes, str] = OrderedDict()
        self._cache_size = config.cache_size
        self.cache_hits = 0

    def read(self, images: list[np.ndarray]) -> list[str]:
        """The recognised lines of each image, concatenated (cached by pixels when enabled)."""
        for index, image in enumerate(images):
            try:
                check_image(image)
            except RewardInputError as error:
                raise error.at(index) from None
        keys = [pixel_key(image) for image in images] if self._cache_size else [b""] * len(images)
        texts: list[str | None] = [self._cache.get(key) if self._cache_size else None for key in keys]
        self.cache_hits += sum(text is not None for text in texts)
        todo = [i for i, text in enumerate(texts) if text is None]
        if todo:
            results = self._ocr.predict([to_bgr(images[i]) for i in todo])
            for i, result in zip(todo, results, strict=True):
                texts[i] = "".join(result["rec_texts"])
                self._remember(keys[i], texts[i])
        return [text or "" for text in texts]

    def score(self, images: list[np.ndarray], targets: list[str]) -> list[OcrResult]:
        """Reward of each image for its target text (not a prompt: see `extract_target`)."""
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        for index, target in enumerate(targets):
            if not normalise(target):
                raise RewardInputError("target text is empty (after removing spaces)", index, "empty_target")
        texts = self.read(images)
        return [OcrResult(ocr_reward(text, target), text, target) for text, target in zip(texts, targets)]

    def _remember(self, key: bytes, text: str) -> None:
        if not self._cache_size:
            return
        self._cache[key] = text
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
