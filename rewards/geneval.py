"""GenEval scorer: detector + CLIP colours + the official rules (rewards/geneval_rules.py)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from rewards.colour import ClipColourClassifier
from rewards.detector import Detector, Mask2FormerDetector
from rewards.errors import RewardInputError
from rewards.geneval_rules import GenevalMetadata, GenevalResult, evaluate
from rewards.ocr import check_image


class GenevalConfig(BaseModel):
    """Which detector and CLIP model the GenEval scorer loads."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    detector: str = "facebook/mask2former-swin-small-coco-instance"
    """Mask2Former COCO-instance checkpoint (hub id or local directory)."""
    clip: str = "openai/clip-vit-large-patch14"
    """CLIP checkpoint for the colour check (GenEval uses ViT-L/14)."""
    device: str = "cpu"
    """Torch device of both models."""
    dtype: str = "float32"
    """Torch dtype of both models (float32 on CPU, bfloat16 on GPU)."""


class ColourClassifier(Protocol):
    """Colour names of objects in an image."""

    def classify(self, image: np.ndarray, objects: list, cls: str) -> list[str]: ...


class GenevalScorer:
    """Scores images against GenEval metadata lines; one detector call per batch. Any `Detector`
    (e.g. an mmdet wrapper) and colour classifier can be plugged in."""

    def __init__(self, detector: Detector, colours: ColourClassifier, version: str = "custom"):
        self.detector = detector
        self.colours = colours
        self.version = version
        """The detector and CLIP checkpoints behind the numbers: on /readyz and every answer."""

    @classmethod
    def from_config(cls, config: GenevalConfig) -> "GenevalScorer":
        from rewards.clip_score import checkpoint_version

        detector = Mask2FormerDetector.from_pretrained(config.detector, config.device, config.dtype)
        colours = ClipColourClassifier.from_pretrained(config.clip, config.device, config.dtype)
        version = (f"{checkpoint_version(config.detector, None, 'config.json')} + "
                   f"{checkpoint_version(config.clip, None, 'config.json')}")
        return cls(detector, colours, version)

    def score(self, images: list[np.ndarray], metadatas: list[GenevalMetadata]) -> list[GenevalResult]:
        """Correctness, graded reward and details of each uint8 RGB image for its metadata line."""
        if len(images) != len(metadatas):
            raise ValueError(f"{len(images)} images but {len(metadatas)} metadata lines")
        for index, image in enumerate(images):
            try:
                check_image(image)
            except RewardInputError as error:
                raise error.at(index) from None
        detections = self.detector.detect(images)
        return [
            evaluate(metadata, found, lambda objects, name, image=image: self.colours.classify(image, objects, name))
            for image, metadata, found in zip(images, metadatas, detections, strict=True)
        ]
