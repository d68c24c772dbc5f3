"""Foundation: vocabulary layout, prompt format, masked log-probs, tiny build/save/load, loader errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from policy.loading import load_ar_model, load_connector, load_tokenizer, load_vocab
from policy.logprobs import (
    image_log_softmax,
    image_token_entropy,
    image_token_logprobs,
    left_padded_batch,
    sequence_image_logprobs,
)
from policy.model_dir import CheckpointNotFoundError, ModelPaths, resolve_checkpoint, resolve_model_dir
from policy.prompt import rollout_prompt_ids, rollout_prompt_text
from policy.tiny import PRESETS
from policy.vocab import IM_START, ImageVocab, image_token


def small_vocab() -> ImageVocab:
    # text ids 0..9, image tokens 10..13, markers 14..18
    return ImageVocab(image_token_start=10, codebook_size=4, tokens_per_image=3, im_start_id=14, im_end_id=15, scale_ids=(16, 17, 18))


def test_vocab_round_trip_and_range_checks():
    vocab = small_vocab()
    codes = torch.tensor([[0, 3, 1], [2, 2, 0]])
    ids = vocab.to_token_ids(codes)
    assert ids.tolist() == [[10, 13, 11], [12, 12, 10]]
    assert torch.equal(vocab.to_codebook(ids), codes)
    assert vocab.image_token_ids() == [10, 11, 12, 13]
    assert vocab.is_image_token(torch.tensor([9, 10, 13, 14])).tolist() == [False, True, True, False]
    with pytest.raises(ValueError):
        vocab.to_codebook(torch.tensor([9]))
    with pytest.raises(ValueError):
        vocab.to_token_ids(torch.tensor([4]))


def test_tiny_tokenizer_layout(tiny_model_dir):
    paths = ModelPaths(tiny_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    spec = PRESETS["sana"]
    assert vocab.codebook_size == spec.codebook_size
    assert vocab.tokens_per_image == spec.tokens_per_image
    # the image block is contiguous and each <In> maps to codebook index n
    for n in (0, 1, spec.codebook_size - 1):
        token_id = tokenizer.convert_tokens_to_ids(image_token(n))
        assert vocab.to_codebook(torch.tensor([token_id])).item() == n
    # image tokens round-trip through text as single tokens
    text = "".join(image_token(n) for n in (5, 7, 1023))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert vocab.to_codebook(torch.tensor(ids)).tolist() == [5, 7, 1023]


def test_rollout_prompt_ends_with_im_start_s0(tiny_model_dir):
    paths = ModelPaths(tiny_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    text = rollout_prompt_text(tokenizer, "a photo of a cat")
    assert text.startswith("<|im_start|>user\nPlease generate image based on the following caption: a photo of a cat<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n" + IM_START + "<S0>")
    ids = rollout_prompt_ids(tokenizer, "a photo of a cat")
    assert ids[-2:] == [vocab.im_start_id, vocab.scale_ids[0]]
    assert tokenizer.decode(ids) == text
    with pytest.raises(ValueError):
        rollout_prompt_text(tokenizer, "x", instruction="no placeholder")


def test_masked_logprobs_match_hand_computation():
    vocab = small_vocab()
    logits = torch.zeros(1, 2, 19)
    # position 0: image logits [0, ln2, ln3, ln4] -> probs [1, 2, 3, 4] / 10
    logits[0, 0, 10:14] = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    logits[0, 0, 0] = 50.0  # a huge text logit must not matter: it is masked out
    # position 1: uniform over image tokens at T=1; at T=2 as well
    tokens = torch.tensor([[13, 11]])
    logp = image_token_logprobs(logits, tokens, vocab, temperature=1.0)
    assert logp[0, 0].item() == pytest.approx(math.log(0.4), abs=1e-6)
    assert logp[0, 1].item() == pytest.approx(math.log(0.25), abs=1e-6)
    # temperature 2: probs proportional to sqrt([1,2,3,4])
    root = torch.sqrt(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    logp_t2 = image_token_logprobs(logits, tokens, vocab, temperature=2.0)
    assert logp_t2[0, 0].item() == pytest.approx(math.log(root[3] / root.sum()), abs=1e-6)
    # the masked distribution sums to 1 over image tokens, for random logits too
    random_logits = torch.randn(3, 5, 19) * 4
    assert torch.allclose(image_log_softmax(random_logits, vocab, 0.7).exp().sum(-1), torch.ones(3, 5), atol=1e-6)
    # entropy: uniform over 4 -> ln 4
    assert image_token_entropy(logits, vocab)[0, 1].item() == pytest.approx(math.log(4), abs=1e-6)
    with pytest.raises(ValueError):
        image_log_softmax(logits, vocab, temperature=0.0)


def test_left_padding_gives_each_row_its_unpadded_positions():
    input_ids, mask, positions = left_padded_batch([[1, 2, 3], [4]], torch.tensor([[7, 8], [9, 9]]), pad_id=0)
    assert input_ids.tolist() == [[1, 2, 3, 7, 8], [0, 0, 4, 9, 9]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]


def test_batched_logprobs_equal_single_row_logprobs(tiny_model_dir):
    paths = ModelPaths(tiny_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    model = load_ar_model(paths)
    prompts = [rollout_prompt_ids(tokenizer, c) for c in ("a cat", "a photo of two red buses on a road")]
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, vocab.codebook_size, (2, vocab.tokens_per_image), generator=generator)
    tokens = vocab.to_token_ids(codes)
    with torch.no_grad():
        batched = sequence_image_logprobs(model, prompts, tokens, vocab, tokenizer.pad_token_id)
        single = torch.cat(
            [sequence_image_logprobs(model, [p], tokens[i : i + 1], vocab, tokenizer.pad_token_id) for i, p in enumerate(prompts)]
        )
    assert batched.shape == (2, vocab.tokens_per_image)
    assert torch.allclose(batched, single, atol=1e-5)
    assert bool((batched < 0).all())


def test_tiny_save_load_gives_identical_outputs(tiny_model_dir, tmp_path):
    from policy.tiny import make_tiny

    # building twice with the same seed gives the same weights; loading gives the same outputs
    second = make_tiny(tmp_path / "again", PRESETS["sana"])
    a = load_ar_model(ModelPaths(tiny_model_dir))
    b = load_ar_model(second)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        out_a = a(input_ids=ids, output_hidden_states=True)
        out_b = b(input_ids=ids, output_hidden_states=True)
    assert torch.equal(out_a.logits, out_b.logits)
    connector = load_connector(ModelPaths(tiny_model_dir))
    hidden = out_a.hidden_states[-1]
    assert torch.equal(connector(hidden), load_connector(second)(hidden))
    assert connector(hidden).shape == (1, 5, PRESETS["sana"].connector_dim)


def test_tiny_sana_parts_load(tiny_model_dir):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

    paths = ModelPaths(tiny_model_dir)
    spec = PRESETS["sana"]
    transformer = SanaTransformer2DModel.from_pretrained(paths.sana_transformer)
    vae = AutoencoderDC.from_pretrained(paths.sana_vae)
    FlowMatchEulerDiscreteScheduler.from_pretrained(paths.sana_scheduler)
    latent = torch.randn(1, transformer.config.in_channels, spec.image_size // 8, spec.image_size // 8)
    condition = torch.randn(1, spec.tokens_per_image, spec.connector_dim)
    with torch.no_grad():
        out = transformer(latent, encoder_hidden_states=condition, timestep=torch.tensor([500])).sample
        image = vae.decode(out).sample
    assert out.shape == latent.shape
    assert image.shape == (1, 3, spec.image_size, spec.image_size)


def test_missing_local_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such directory"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointNotFoundError, match="not a blip3o-rl model directory"):
        resolve_model_dir(str(tmp_path))


def test_missing_hub_checkpoint_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint("BLIP3o/BLIP3o-NEXT-SFT", local_files_only=True)
    message = str(info.value)
    assert "BLIP3o/BLIP3o-NEXT-SFT" in message and "huggingface-cli download" in message


def test_cli_make_tiny_and_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "make-tiny", str(tmp_path / "m"), "--preset", "glyph"],
        capture_output=True, text=True, check=True,
    )
    assert "wrote tiny 'glyph' model" in out.stdout
    vocab = load_vocab(ModelPaths(tmp_path / "m"))
    assert (vocab.codebook_size, vocab.tokens_per_image) == (64, 8)
