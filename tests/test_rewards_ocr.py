"""OCR reward: Flow-GRPO's formula by hand, then the real PaddleOCR (PP-OCRv6 ONNX) on rendered text."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rewards.errors import RewardInputError
from rewards.ocr import OcrConfig, OcrScorer, extract_target, levenshtein, ocr_reward
from tests.rewards_support import ocr_prompts, render_text


def test_levenshtein_hand_values():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_ocr_reward_formula():
    assert ocr_reward("Grand Opening Sale", "grand opening") == 1.0  # substring after normalising
    assert ocr_reward("GRANDOPENING", "Grand Opening") == 1.0  # case and spaces ignored
    assert ocr_reward("cot", "cat") == pytest.approx(1 - 1 / 3)
    assert ocr_reward("", "cat") == 0.0  # distance 3 = len(target)
    assert ocr_reward("a much longer unrelated text", "cat") == 0.0  # distance capped at len(target)
    assert ocr_reward("opne", "open") == pytest.approx(0.5)  # two substitutions


def test_extract_target_and_errors():
    assert extract_target('a sign saying "Hello World" and "other"') == "Hello World"
    with pytest.raises(RewardInputError, match="double-quoted"):
        extract_target("a sign with no quotes")
    with pytest.raises(RewardInputError, match="double-quoted"):
        extract_target('an unclosed "quote')
    with pytest.raises(RewardInputError, match="empty"):
        ocr_reward("anything", "   ")


@pytest.fixture(scope="module")
def scorer() -> OcrScorer:
    return OcrScorer(OcrConfig(size="small", cache_size=4))


@pytest.mark.slow
def test_real_ocr_reads_rendered_phrases(scorer):
    prompts = ocr_prompts(24)
    targets = [extract_target(p) for p in prompts]
    results = scorer.score([render_text(t) for t in targets], targets)
    rewards = [r.reward for r in results]
    assert len(rewards) == 24 and np.mean(rewards) >= 0.95, list(zip(targets, [r.recognized for r in results]))
    assert all(r.target == t for r, t in zip(results, targets))


@pytest.mark.slow
def test_real_ocr_blank_and_noise_score_zero(scorer):
    rng = np.random.default_rng(0)
    blank = np.full((128, 512, 3), 255, np.uint8)
    noise = rng.integers(0, 256, (128, 512, 3), dtype=np.uint8)
    results = scorer.score([blank, noise], ["OPEN", "Grand Opening"])
    assert [r.reward for r in results] == [0.0, 0.0]
    assert [r.recognized for r in results] == ["", ""]


@pytest.mark.slow
def test_cache_skips_the_model_for_identical_pixels(scorer, monkeypatch):
    calls = []
    predict = scorer._ocr.predict
    monkeypatch.setattr(scorer._ocr, "predict", lambda images, **options: calls.append(len(images)) or predict(images, **options))
    hits = scorer.cache_hits
    image = render_text("STOP")
    first = scorer.score([image], ["stop"])[0]
    again = scorer.score([image.copy(), image], ["stop", "STOP"])  # same pixels, new arrays
    assert calls == [1] and scorer.cache_hits - hits == 2
    assert first.reward == 1.0 and [r.reward for r in again] == [1.0, 1.0]
    # LRU of 4: four new images push "STOP" out, so it is read again.
    scorer.score([render_text(w) for w in ("ONE", "TWO", "SIX", "TEN")], ["one", "two", "six", "ten"])
    scorer.score([image], ["stop"])
    assert calls == [1, 4, 1]


@pytest.mark.slow
def test_ocr_reads_in_paddles_bgr_order_as_upstream_does(scorer, monkeypatch):
    """Red text on blue: PaddleOCR gets the BGR array (upstream BLIP3o-NEXT flips RGB with
    `[:, :, ::-1]` before `predict`), and the reward equals upstream's reading of that array."""
    image = render_text("Fresh Bread 24", colour="#d01818", background="#1830c0")  # RGB
    seen = []
    predict = scorer._ocr.predict
    monkeypatch.setattr(scorer._ocr, "predict", lambda images, **options: seen.extend(images) or predict(images, **options))
    ours = scorer.score([image], ["Fresh Bread 24"])[0]
    assert len(seen) == 1 and np.array_equal(seen[0], image[:, :, ::-1])
    assert tuple(seen[0][0, 0]) == (0xc0, 0x30, 0x18)  # the blue background as B, G, R
    upstream = "".join(predict([np.array(image)[:, :, ::-1]])[0]["rec_texts"])
    assert ours.recognized == upstream
    assert ours.reward == ocr_reward(upstream, "Fresh Bread 24") == 1.0


@pytest.mark.slow
def test_tiny_models_read_too():
    tiny = OcrScorer(OcrConfig(size="tiny"))
    result = tiny.score([render_text("Open Late Tonight")], ["Open Late Tonight"])[0]
    assert result.reward == 1.0 and re.sub(r"\s", "", result.recognized).lower() == "openlatetonight"


def test_bad_images_and_targets_name_the_item(scorer):
    with pytest.raises(RewardInputError) as error:
        scorer.score([render_text("A"), np.zeros((0, 5, 3), np.uint8)], ["a", "b"])
    assert error.value.item == 1
    with pytest.raises(RewardInputError) as error:
        scorer.score([render_text("A"), render_text("B")], ["a", " "])
    assert error.value.item == 1 and error.value.code == "empty_target"
