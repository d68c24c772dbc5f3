"""GenEval with real transformers models: tiny random Mask2Former + CLIP built from small configs
(80 COCO labels, no downloads), loaded through the same from_pretrained path as the real ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.colour import GREY, TEMPLATES, grey_composite_crop
from rewards.detector import mask_to_box
from rewards.geneval import GenevalConfig, GenevalScorer
from rewards.geneval_rules import COLORS, Detection, GenevalMetadata


def test_mask_to_box_is_the_mask_extent():
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:5, 3:9] = True  # rows 2..4, cols 3..8
    assert mask_to_box(mask) == (3.0, 2.0, 9.0, 5.0)
    assert mask_to_box(torch.zeros(4, 4, dtype=torch.bool)) == (0.0, 0.0, 0.0, 0.0)


def test_grey_composite_crop():
    image = np.zeros((6, 8, 3), np.uint8)
    image[..., 0] = 200  # red everywhere
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:4] = True
    crop = np.asarray(grey_composite_crop(image, Detection("dog", (1.6, 0.4, 4.4, 3.49), 0.9, mask)))
    # Box rounds to (2, 0, 4, 3): 3 rows x 2 cols; row 0 is outside the mask -> grey #999.
    assert crop.shape == (3, 2, 3)
    assert (crop[0] == GREY).all() and (crop[1:] == (200, 0, 0)).all()
    # A sub-pixel box still yields one pixel (CLIP needs one).
    assert np.asarray(grey_composite_crop(image, Detection("dog", (2.2, 2.2, 2.3, 2.3), 0.9))).shape == (1, 1, 3)


@pytest.fixture(scope="module")
def scorer(tiny_geneval_dirs) -> GenevalScorer:
    detector_dir, clip_dir = tiny_geneval_dirs
    return GenevalScorer.from_config(GenevalConfig(detector=str(detector_dir), clip=str(clip_dir)))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)


def test_text_classifier_is_normalised_mean_of_templates(scorer):
    clip = scorer.colours
    weights = clip.text_classifier("fire hydrant")  # [D, 10]
    prompts = [t.format(c="green", cls="fire hydrant") for t in TEMPLATES]
    assert prompts[1] == "a photo of a green-colored fire hydrant"
    with torch.no_grad():
        tokens = clip.tokenizer(prompts, padding=True, return_tensors="pt")
        embeddings = torch.nn.functional.normalize(clip.model.get_text_features(**tokens).pooler_output, dim=-1)
    expected = torch.nn.functional.normalize(embeddings.mean(0), dim=0)
    torch.testing.assert_close(weights[:, COLORS.index("green")], expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(weights.norm(dim=0), torch.ones(10), atol=1e-5)


def test_detector_agrees_with_transformers_post_processing(scorer, image):
    detector = scorer.detector
    ours = detector.detect([image])[0]
    inputs = detector.processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = detector.model(pixel_values=inputs["pixel_values"])
    theirs = detector.processor.post_process_instance_segmentation(
        outputs, threshold=0.3, target_sizes=[image.shape[:2]], return_binary_maps=True
    )[0]["segments_info"]
    # Same instances (4 queries, all pushed to "dog"); mask scores differ a little because
    # transformers squeezes masks through 384x384 first.
    assert len(ours) == len(theirs) == 4
    assert {d.label for d in ours} == {"dog"} and {s["label_id"] for s in theirs} == {16}
    assert sorted(d.score for d in ours) == pytest.approx(sorted(s["score"] for s in theirs), abs=0.02)
    for d in ours:
        assert d.mask.shape == image.shape[:2] and d.box == mask_to_box(torch.from_numpy(d.mask))


@pytest.mark.slow
def test_end_to_end_tiny_pipeline(scorer, image):
    lines = [
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        {"tag": "counting", "include": [{"class": "dog", "count": 4}], "exclude": [{"class": "dog", "count": 5}]},
        {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]},
    ] + [{"tag": "colors", "include": [{"class": "dog", "count": 1, "color": c}]} for c in COLORS]
    metadatas = [GenevalMetadata.model_validate(line) for line in lines]
    results = scorer.score([image] * len(metadatas), metadatas)
    dog, cat, four, three = results[:4]
    assert [d.label for d in dog.objects["dog"]] == ["dog"] * 4 and all(d.score > 0.9 for d in dog.objects["dog"])
    assert dog.correct and dog.reward == -2.0  # 4 dogs for 1 asked: 1 - |1 - 4| / 1
    assert not cat.correct and cat.reward == 0.0
    assert four.correct and four.reward == 1.0
    assert not three.correct and three.exclude_violated == [0] and three.reward == pytest.approx(2 / 3)
    colour_results = results[4:]
    seen = colour_results[0].include[0].colors
    assert seen is not None and len(seen) == 1 and seen[0] in COLORS
    assert [r.correct for r in colour_results] == [c == seen[0] for c in COLORS]  # exactly one colour holds
    assert all(r.include[0].colors == seen for r in colour_results)
