"""GenEval's colour check: CLIP zero-shot over 10 colours on the object alone.

Each object is composited over grey #999 with its mask and cropped to its box (PIL rounds the
box), then classified by CLIP against, per colour, the normalised mean of the normalised text
embeddings of three templates (clip_benchmark's `zero_shot_classifier`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from rewards.geneval_rules import COLORS, Detection

GREY = (153, 153, 153)  # "#999"
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


def grey_composite_crop(image: np.ndarray, detection: Detection) -> Image.Image:
    """The object over grey #999 (where its mask is), cropped to its box."""
    picture = Image.fromarray(image)
    if detection.mask is not None:
        blank = Image.new("RGB", picture.size, GREY)
        picture = Image.composite(picture, blank, Image.fromarray(detection.mask.astype(np.uint8) * 255))
    x1, y1, x2, y2 = (round(v) for v in detection.box)
    # A box thinner than a pixel would give an empty crop; CLIP needs at least one pixel.
    return picture.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


class ClipColourClassifier:
    """CLIP zero-shot colour of objects; the text side is computed once per class."""

    def __init__(self, model, processor, tokenizer, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.device = device
        self._classifiers: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, name: str, device: str = "cpu", dtype: str = "float32") -> "ClipColourClassifier":
        """Load a hub id or a local directory."""
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        model = CLIPModel.from_pretrained(name, dtype=getattr(torch, dtype))
        return cls(model, CLIPImageProcessorPil.from_pretrained(name), CLIPTokenizer.from_pretrained(name), device)

    @torch.no_grad()
    def text_classifier(self, cls: str) -> torch.Tensor:
        """[D, 10]: per colour, normalise(mean of normalised template embeddings)."""
        if cls not in self._classifiers:
            prompts = [t.format(c=c, cls=cls) for c in COLORS for t in TEMPLATES]
            tokens = self.tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
            embeddings = self.model.get_text_features(**tokens).pooler_output.float()  # [10 * 3, D]
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1).view(len(COLORS), len(TEMPLATES), -1)
            weights = torch.nn.functional.normalize(embeddings.mean(1), dim=-1)  # [10, D]
            self._classifiers[cls] = weights.T
        return self._classifiers[cls]

    @torch.no_grad()
    def classify(self, image: np.ndarray, objects: list[Detection], cls: str) -> list[str]:
        """Colour name of each object."""
        if not objects:
            return []
        crops = [grey_composite_crop(image, obj) for obj in objects]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"]  # [N, 3, S, S]
        features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        features = torch.nn.functional.normalize(features.pooler_output.float(), dim=-1)  # [N, D]
        logits = 100.0 * features @ self.text_classifier(cls)  # [N, 10]
        return [COLORS[int(i)] for i in logits.argmax(1)]
