"""Shared by the reward tests and bench: text rendering, OCR targets, stub scorers, a uvicorn server
in a thread, and tiny GenEval models."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rewards.geneval_rules import Detection, evaluate
from rewards.local_server import serve_in_thread  # noqa: F401 (the tests import it from here)
from rewards.ocr import OcrResult, ocr_reward

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
# An evaluation set (Flow-GRPO OCR test): fine for scoring tests, never for training.
OCR_PROMPTS = Path(__file__).resolve().parents[1] / "rl" / "prompts" / "data" / "eval" / "flow_grpo_ocr_test.txt"


def render_text(text: str, size: tuple[int, int] = (512, 128), colour: str = "black",
                background: str = "white") -> np.ndarray:
    """DejaVu Sans Bold text (black on white by default), as large as fits: uint8 RGB [H, W, 3]."""
    width, height = size
    for points in range(56, 8, -2):
        font = ImageFont.truetype(FONT, points)
        left, top, right, bottom = font.getbbox(text)
        if right - left <= width - 32 and bottom - top <= height - 16:
            break
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).text(((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top), text,
                               fill=colour, font=font)
    return np.asarray(image)


def ocr_prompts(count: int, max_chars: int = 24) -> list[str]:
    """The first `count` prompts of the OCR test set whose quoted target is short enough for one line."""
    chosen = []
    for line in OCR_PROMPTS.read_text().splitlines():
        match = re.search(r'"([^"]*)"', line)
        if match and 3 <= len(match.group(1)) <= max_chars:
            chosen.append(line)
        if len(chosen) == count:
            break
    return chosen


class StubOcr:
    """Reads the number a test image encodes: recognised text "id-<number>"."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def score(self, images, targets):
        with self.lock:
            self.batches.append(len(images))
        time.sleep(0.002)  # a model call takes time; lets concurrent requests pile up
        texts = [f"id-{int(im[0, 0, 0]) + 256 * int(im[0, 0, 1])}" for im in images]
        return [OcrResult(ocr_reward(text, target), text, target) for text, target in zip(texts, targets)]


class StubGeneval:
    """One confident dog filling the image if the image is bright, nothing otherwise."""

    def score(self, images, metadatas):
        results = []
        for image, metadata in zip(images, metadatas):
            height, width = image.shape[:2]
            dets = [Detection("dog", (0, 0, width, height), 0.95)] if image.mean() > 128 else []
            results.append(evaluate(metadata, dets, lambda objects, cls: ["brown"] * len(objects)))
        return results
