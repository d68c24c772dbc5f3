"""Object detector for GenEval: transformers Mask2Former (COCO instance), pluggable.

GenEval uses mmdet's Mask2Former Swin-S; `facebook/mask2former-swin-small-coco-instance` is the
same model family in transformers. Post-processing follows mmdet's instance head rather than
transformers' (which squeezes masks through 384x384): top-k over (query, class) scores,
mask logits resized to the image, mask > 0, score = class prob * mean mask prob inside the mask,
box = the mask's extent (mmdet `mask2bbox`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from rewards.geneval_rules import COCO_CLASSES, THRESHOLD, Detection


class Detector(Protocol):
    """Anything that finds COCO objects in RGB images."""

    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        """Detections of each uint8 RGB [H, W, 3] image, any order."""
        ...


def mask_to_box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """(x1, y1, x2 + 1, y2 + 1) of the mask's pixels, as mmdet's mask2bbox; zeros if empty."""
    cols, rows = mask.any(dim=0), mask.any(dim=1)  # [W], [H]
    if not bool(cols.any()):
        return (0.0, 0.0, 0.0, 0.0)
    xs, ys = torch.nonzero(cols)[:, 0], torch.nonzero(rows)[:, 0]
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


class Mask2FormerDetector:
    """transformers Mask2Former with mmdet-style instance post-processing."""

    def __init__(self, model, processor, device: str = "cpu", min_score: float = THRESHOLD, max_per_image: int = 100):
        if model.config.num_labels != len(COCO_CLASSES):
            raise ValueError(f"detector has {model.config.num_labels} classes; GenEval needs the 80 COCO classes")
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.min_score = min_score
        self.max_per_image = max_per_image

    @classmethod
    def from_pretrained(cls, name: str, device: str = "cpu", dtype: str = "float32") -> "Mask2FormerDetector":
        """Load a hub id or a local directory (offline machines: a local directory)."""
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil

        model = Mask2FormerForUniversalSegmentation.from_pretrained(name, dtype=getattr(torch, dtype))
        return cls(model, Mask2FormerImageProcessorPil.from_pretrained(name), device)

    @torch.no_grad()
    def detect(self, images: list[np.ndarray]) -> list[list[Detection]]:
        # Images of one size share a forward pass, so no padding enters the masks.
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(index)
        results: list[list[Detection]] = [[] for _ in images]
        for (height, width), indices in by_size.items():
            inputs = self.processor(images=[images[i] for i in indices], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.model.dtype)  # [B, 3, h, w]
            outputs = self.model(pixel_values=pixels)
            for row, index in enumerate(indices):
                results[index] = self._instances(
                    outputs.class_queries_logits[row].float(),  # [Q, C + 1]
                    outputs.masks_queries_logits[row].float(),  # [Q, h/4, w/4]
                    (height, width),
                )
        return results

    def _instances(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> list[Detection]:
        num_classes = class_logits.shape[1] - 1
        probs = class_logits.softmax(-1)[:, :-1]  # [Q, C] drop "no object"
        k = min(self.max_per_image, probs.numel())
        top_probs, flat = probs.flatten().topk(k)  # [k]
        queries, labels = flat // num_classes, flat % num_classes
        keep = top_probs > self.min_score  # the mask score only lowers it
        top_probs, queries, labels = top_probs[keep], queries[keep], labels[keep]
        if len(queries) == 0:
            return []
        logits = torch.nn.functional.interpolate(
            mask_logits[queries][None], size=size, mode="bilinear", align_corners=False
        )[0]  # [k, H, W]
        masks = logits > 0  # [k, H, W]
        mask_probs = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)  # [k]
        scores = top_probs * mask_probs  # [k]
        detections = []
        for i in range(len(queries)):
            if scores[i] > self.min_score:
                detections.append(
                    Detection(COCO_CLASSES[int(labels[i])], mask_to_box(masks[i]), float(scores[i]), masks[i].numpy())
                )
        return detections
