"""GenEval scorer: detector + CLIP colours + the official rules (rewards/geneval_rules.py).

Regions (spatial credit, rewards/scorer.py): one per object GenEval counted for the prompt, its
detection box, reward 1 if the object does what the prompt asks of it, else 0 (`object_regions`).
A missing object gets no region: it has no place in the image, and a region over the whole image
with reward 0 would only repeat, on every token alike, what the scalar reward already says.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from rewards.colour import ClipColourClassifier
from rewards.detector import Detector, Mask2FormerDetector
from rewards.errors import RewardInputError
from rewards.geneval_rules import (
    Detection,
    GenevalMetadata,
    GenevalResult,
    evaluate,
    relative_position,
)
from rewards.ocr import check_image
from rewards.scorer import Region, pixel_region


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
        results = []
        for image, metadata, found in zip(images, metadatas, detections, strict=True):
            def colours_of(objects, name, image=image):
                return self.colours.classify(image, objects, name)

            result = evaluate(metadata, found, colours_of)
            regions = object_regions(metadata, result, image.shape[1], image.shape[0], colours_of)
            results.append(replace(result, regions=regions))
        return results


def object_regions(metadata: GenevalMetadata, result: GenevalResult, width: int, height: int,
                   colours_of) -> tuple[Region, ...]:
    """The objects of `result` GenEval counted, each with reward 1 if it passes, else 0.

    An object of an include clause's class passes if it is among the clause's top `count` (one
    more than asked is the over-count the graded reward punishes), has the clause's colour (CLIP,
    asked again when GenEval skipped it because the count was not met) and stands in the clause's
    relation to every counted object of the referenced clause (not judged when that clause found
    none: its absence is not this object's fault). Every object of a violated exclude clause
    fails. An object judged by several clauses passes only if it passes all. Objects of classes no
    clause names get no region."""
    verdict: dict[int, tuple[Detection, bool]] = {}

    def judge(obj: Detection, ok: bool) -> None:
        previous = verdict.get(id(obj), (obj, True))[1]
        verdict[id(obj)] = (obj, previous and ok)

    for clause, report in zip(metadata.include, result.include):
        found = result.objects.get(clause.cls, [])
        top = found[: clause.count]
        colours = report.colors
        if clause.color and top and (colours is None or len(colours) != len(top)):
            colours = colours_of(top, clause.cls)
        targets: list[Detection] = []
        if clause.position is not None:
            target = metadata.include[clause.position[1]]
            targets = result.objects.get(target.cls, [])[: target.count]
        for k, obj in enumerate(found):
            ok = k < clause.count
            if ok and clause.color:
                ok = colours[k] == clause.color
            if ok and targets:
                ok = all(clause.position[0] in relative_position(obj.box, t.box) for t in targets)
            judge(obj, ok)
    for index in result.exclude_violated:
        for obj in result.objects.get(metadata.exclude[index].cls, []):
            judge(obj, False)
    return tuple(pixel_region(obj.box, width, height, float(ok)) for obj, ok in verdict.values())
