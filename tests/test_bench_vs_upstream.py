"""The pure helpers of bench/bench_vs_upstream.py: the reward function the TRL runner trains on draws
exactly what our glyph decoder draws and scores the caption's quoted target; the BLIP3o-NEXT
checkpoint's config keeps the model's numbers in transformers 4.x keys; a sampler mask leaves only
the image tokens; the step figures follow their stated formulas."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.bench_vs_upstream import Launch, StepRecord, summarise
from bench.upstream.checkpoint import blip3o_config, tokenizer_config_4x
from bench.upstream.job import GlyphImages, StageClock, non_image_ids
from bench.upstream.trl_job import GlyphOcrReward
from policy.tiny import PRESETS, build_tokenizer
from rewards.ocr import OcrResult
from rollout.decoder_config import GlyphConfig
from rollout.glyph import GlyphDecoder


class RecordingScorer:
    """Stands in for OcrScorer: keeps what it was asked and answers fixed rewards."""

    def __init__(self, rewards):
        self.rewards, self.images, self.targets = rewards, None, None

    def score(self, images, targets):
        self.images, self.targets = images, targets
        return [OcrResult(reward, "", target) for reward, target in zip(self.rewards, targets)]


@pytest.fixture(scope="module")
def glyph_images() -> GlyphImages:
    tokenizer = build_tokenizer(PRESETS["glyph"])  # 64 image tokens, 8 per image
    return GlyphImages(tokenizer, SimpleNamespace(tokens_per_image=8, glyph={}))


def test_reward_function_draws_our_glyphs_and_scores_the_quoted_target(glyph_images):
    decoder = GlyphDecoder(GlyphConfig(), codebook_size=64, tokens_per_image=8)
    rows = ["cat", "c a t"]
    ids = [glyph_images.vocab.to_token_ids(torch.tensor(decoder.text_to_codes(text))).tolist() for text in rows]
    scorer = RecordingScorer([1.0, 0.25])
    clock = StageClock()
    reward = GlyphOcrReward(glyph_images, scorer, clock)
    captions = ['an image with the text "cat"', 'a sign that says "cat" twice']
    got = reward(prompts=["p", "p"], completions=["", ""], completion_ids=ids, caption=captions)
    assert got == [1.0, 0.25]
    assert scorer.targets == ["cat", "cat"]
    for image, text in zip(scorer.images, rows):
        np.testing.assert_array_equal(image, decoder.render_text(text))  # pixel for pixel
    assert set(clock.take()) == {"decode"}


def test_a_non_image_token_is_refused(glyph_images):
    text_id = glyph_images.vocab.image_token_start - 1
    with pytest.raises(ValueError, match="outside the image-token range"):
        glyph_images([[text_id] * 8])


def test_non_image_ids_leave_exactly_the_image_block(glyph_images):
    vocab = glyph_images.vocab
    rows = vocab.image_token_end + 5  # the 5 markers after the image block (glyph preset order)
    banned = non_image_ids(vocab, rows)
    assert len(banned) == rows - 64
    assert sorted(set(range(rows)) - set(banned)) == vocab.image_token_ids()


def test_blip3o_config_keeps_the_numbers_in_transformers_4_keys():
    ours = {"hidden_size": 128, "vocab_size": 581, "dtype": "float32", "transformers_version": "5.19.0",
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "model_type": "qwen3"}
    config = blip3o_config(ours, {"image_start_tag_id": 576})
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32" and config["model_type"] == "blip3o_qwen"
    assert config["hidden_size"] == 128 and config["vocab_size"] == 581 and config["image_start_tag_id"] == 576
    assert not {"rope_parameters", "dtype", "transformers_version"} & set(config)
    with pytest.raises(ValueError, match="default RoPE"):
        blip3o_config({**ours, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn"}}, {})
    tokenizer = tokenizer_config_4x({"backend": "tokenizers", "extra_special_tokens": ["<|im_start|>"],
                                     "tokenizer_class": "TokenizersBackend", "eos_token": "<|im_end|>"})
    assert tokenizer == {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<|im_start|>"],
                         "eos_token": "<|im_end|>"}


def test_summary_figures_follow_their_formulas():
    # steps recorded at t = 100, 110, 130, 140 s after a start at t = 50 s: gaps 10, 20, 10 s
    records = [StepRecord(step, at, reward, {"generate": 2.0 * step, "update": 1.0})
               for step, at, reward in ((1, 100.0, 0.0), (2, 110.0, 0.1), (3, 130.0, 0.2), (4, 140.0, 0.3))]
    out = summarise(records, Launch(50.0, 150.0, 0, 1.5, [0.5, 0.4, 0.3], "log"), steps=4)
    assert out["time_to_first_step_s"] == 50.0
    assert out["step_s"] == {"median": 10.0, "p25": 10.0, "p75": 15.0, "min": 10.0, "max": 20.0}
    assert out["steps_per_hour"] == pytest.approx(360.0)  # 3600 / the median gap
    assert out["last10_reward"] is None  # fewer than 10 steps: no last-10 figure ...
    assert out["last_steps_reward"]["mean"] == pytest.approx(0.15)  # ... but the mean of those there
    # stage medians over steps 2-4 (step 1 carries the start-up): generate 6 s, update 1 s; shares of the 10 s step
    assert out["stages_s"] == {"generate": 6.0, "update": 1.0}
    assert out["stage_shares"] == {"generate": pytest.approx(0.6), "update": pytest.approx(0.1)}
