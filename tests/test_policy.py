"""Foundation: vocabulary layout, prompt format, masked log-probs, tiny build/save/load, loader errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from policy.loading import load_ar_model, load_connector, load_tokenizer, load_vocab
from policy.logprobs import (
    ImageTokenLogits,
    Truncation,
    codebook_entropy,
    codebook_log_softmax,
    codebook_token_logprobs,
    image_log_softmax,
    image_token_entropy,
    image_token_logprobs,
    left_padded_batch,
    sequence_image_logprobs,
    sequence_logits,
    truncation_mask,
)
from policy.model_dir import CheckpointNotFoundError, ModelPaths, resolve_checkpoint, resolve_model_dir
from policy.prompt import rollout_prompt_ids, rollout_prompt_text
from policy.tiny import PRESETS
from policy.vocab import ImageVocab, image_token


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


def test_rollout_prompt_is_upstreams_system_user_and_im_start_s0(tiny_model_dir):
    """BLIP3o-NEXT's prompt (trl/trl/trainer/grpo_trainer.py): system + user turn, generation
    prompt, then `<im_start><S0>`; the ids are checked against a sequence built by hand."""
    paths = ModelPaths(tiny_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    caption = "a photo of a cat"
    text = rollout_prompt_text(tokenizer, caption)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPlease generate image based on the following caption: a photo of a cat<|im_end|>\n"
        "<|im_start|>assistant\n<im_start><S0>"
    )
    special = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<|im_start|>", "<|im_end|>")}

    def plain(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False)["input_ids"]

    by_hand = (
        [special["<|im_start|>"]] + plain("system\nYou are a helpful assistant.") + [special["<|im_end|>"]]
        + plain("\n") + [special["<|im_start|>"]]
        + plain("user\nPlease generate image based on the following caption: a photo of a cat")
        + [special["<|im_end|>"]] + plain("\n") + [special["<|im_start|>"]] + plain("assistant\n")
        + [vocab.im_start_id, vocab.scale_ids[0]]
    )
    assert rollout_prompt_ids(tokenizer, caption) == by_hand
    # no system turn when asked for none
    assert rollout_prompt_text(tokenizer, caption, system_prompt=None).startswith("<|im_start|>user\n")
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


def test_top_k_top_p_keep_vllms_set_and_renormalise():
    vocab = small_vocab()
    logits = torch.zeros(1, 1, 19)
    # image probs [0.1, 0.2, 0.3, 0.4] (ids 10..13)
    logits[0, 0, 10:14] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    tokens = torch.tensor([[12]])  # p = 0.3
    # top-k 2 keeps {0.3, 0.4}: 0.3 / 0.7
    logp = image_token_logprobs(logits, tokens, vocab, truncation=Truncation(top_k=2))
    assert logp.item() == pytest.approx(math.log(0.3 / 0.7), abs=1e-6)
    # top-p 0.6: ascending cumulative [0.1, 0.3, 0.6, 1.0]; dropped where <= 0.4 -> keeps {0.3, 0.4}
    logp = image_token_logprobs(logits, tokens, vocab, truncation=Truncation(top_p=0.6))
    assert logp.item() == pytest.approx(math.log(0.3 / 0.7), abs=1e-6)
    # top-p 0.5 keeps the same set (0.4 alone has mass < 0.5), top-p 0.4 keeps only the top token
    assert truncation_mask(logits[0, :, 10:14], Truncation(top_p=0.5)).tolist() == [[False, False, True, True]]
    assert truncation_mask(logits[0, :, 10:14], Truncation(top_p=0.4)).tolist() == [[False, False, False, True]]
    # top-k then top-p on the renormalised top-k: top-k 3 -> [0.2, 0.3, 0.4] / 0.9; top-p 0.5 -> {0.3, 0.4}
    assert truncation_mask(logits[0, :, 10:14], Truncation(top_k=3, top_p=0.5)).tolist() == [[False, False, True, True]]
    # ties at the k-th value are all kept (vLLM masks only logits < the k-th largest)
    tied = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    assert truncation_mask(tied, Truncation(top_k=2)).tolist() == [[False, True, True, True]]
    # the truncated entropy is that of the renormalised kept set: -(3/7 ln 3/7 + 4/7 ln 4/7)
    entropy = image_token_entropy(logits, vocab, truncation=Truncation(top_k=2))
    assert entropy.item() == pytest.approx(-(3 / 7 * math.log(3 / 7) + 4 / 7 * math.log(4 / 7)), abs=1e-6)
    with pytest.raises(ValueError):
        Truncation(top_k=-1)


def test_a_sampled_token_outside_the_learners_top_k_keeps_a_finite_logprob():
    """Near the top-k boundary, rounding can put the sampled token just outside the learner's
    kept set: it is kept anyway, and its log-prob is that of the kept set plus itself."""
    vocab = small_vocab()
    logits = torch.zeros(1, 1, 19)
    logits[0, 0, 10:14] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    tokens = torch.tensor([[11]])  # p = 0.2: rank 3, outside top-2
    logp = image_token_logprobs(logits, tokens, vocab, truncation=Truncation(top_k=2))
    assert torch.isfinite(logp).all()
    assert logp.item() == pytest.approx(math.log(0.2 / 0.9), abs=1e-6)
    # without the sampled token, the distribution itself gives it -inf
    assert image_log_softmax(logits, vocab, truncation=Truncation(top_k=2))[0, 0, 1].item() == float("-inf")


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (7, 0.9), (1, 1.0), (40, 0.5)])
def test_truncation_equals_vllms_own_top_k_top_p(top_k, top_p):
    """The learner's kept set and log-probs equal vLLM's pytorch sampler op on the same logits."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    generator = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    vocab = ImageVocab(image_token_start=7, codebook_size=64, tokens_per_image=4, im_start_id=71, im_end_id=72,
                       scale_ids=(73, 74, 75))
    logits = torch.randn(6, 4, 76, generator=generator) * 3  # [B, T, V]
    temperature = 0.8
    scaled = logits[..., 7:71].reshape(-1, 64) / temperature  # [B*T, K]
    k = torch.full((scaled.shape[0],), top_k) if top_k else None
    p = torch.full((scaled.shape[0],), top_p) if top_p < 1 else None
    theirs = apply_top_k_top_p_pytorch(scaled.clone(), k, p).log_softmax(-1).reshape(6, 4, 64)
    ours = image_log_softmax(logits, vocab, temperature, Truncation(top_k, top_p))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    kept = torch.isfinite(ours)
    assert float((ours[kept] - theirs[kept]).abs().max()) < 1e-5


def test_image_head_slice_equals_the_full_vocabulary_computation(tiny_model_dir):
    """The learner's image-rows-only head at the image positions gives the masked full-vocabulary
    log-probs (and their gradient) of today's path."""
    paths = ModelPaths(tiny_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    model = load_ar_model(paths)
    prompts = [rollout_prompt_ids(tokenizer, c) for c in ("a cat", "a photo of two red buses on a road", "x")]
    tokens = vocab.to_token_ids(torch.randint(0, vocab.codebook_size, (3, vocab.tokens_per_image),
                                              generator=torch.Generator().manual_seed(3)))
    full, _ = sequence_logits(model, prompts, tokens, tokenizer.pad_token_id)  # [3, N, V]
    head = ImageTokenLogits(model, vocab)
    sliced = head.image_logits(prompts, tokens, tokenizer.pad_token_id)  # [3, N, K]
    assert sliced.shape == (3, vocab.tokens_per_image, vocab.codebook_size)
    assert float((sliced - full[..., vocab.image_token_start : vocab.image_token_end]).abs().max()) < 1e-6
    codes = vocab.to_codebook(tokens)
    for temperature, truncation in ((1.0, Truncation()), (0.7, Truncation(top_k=50, top_p=0.9))):
        ours = codebook_token_logprobs(sliced, codes, temperature, truncation)  # logit - logsumexp
        reference = image_token_logprobs(full, tokens, vocab, temperature, truncation)
        assert float((ours - reference).abs().max()) < 1e-6
        # the chunked, grad-free entropy equals the one of the whole log-softmax
        log_probs = codebook_log_softmax(sliced, temperature, truncation, codes)
        whole = -(log_probs.exp() * log_probs).nan_to_num(nan=0.0).sum(-1)
        chunked = codebook_entropy(sliced, codes, temperature, truncation, positions_per_chunk=5)
        assert float((chunked - whole).abs().max()) < 1e-5
    # the parameters are the causal LM's: the learner publishes them under their HF names
    assert {name.removeprefix("lm.") for name, _ in head.named_parameters()} == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("temperature,truncation", [(1.0, Truncation()), (0.7, Truncation(top_k=5, top_p=0.9))])
def test_picked_log_softmax_has_autograds_values_and_gradients(temperature, truncation):
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 4, 12, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    codes = torch.randint(0, 12, (3, 4), generator=generator)
    weights = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    ours = codebook_token_logprobs(logits, codes, temperature, truncation)
    (ours * weights).sum().backward()
    ours_grad, logits.grad = logits.grad.clone(), None
    theirs = codebook_log_softmax(logits, temperature, truncation, codes).gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    (theirs * weights).sum().backward()
    # both compute in float32 (the learner's dtype for log-probs): equal to its rounding
    assert float((ours - theirs).abs().max()) < 1e-6
    assert float((ours_grad - logits.grad).abs().max()) < 1e-6
    assert float(ours_grad.abs().max()) > 0.01  # a real gradient reached the logits


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


def test_tiny_save_load_gives_identical_weights_and_outputs(tiny_model_dir, tmp_path):
    from policy.tiny import make_tiny

    # building twice with the same seed gives the same weights, bit for bit...
    second = make_tiny(tmp_path / "again", PRESETS["sana"])
    a = load_ar_model(ModelPaths(tiny_model_dir))
    b = load_ar_model(second)
    connector, connector_b = load_connector(ModelPaths(tiny_model_dir)), load_connector(second)
    for one, other in ((a.state_dict(), b.state_dict()), (connector.state_dict(), connector_b.state_dict())):
        assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)
    # ...and the two loads give the same outputs up to float rounding: two models at other addresses
    # may get other CPU kernel paths (summation orders, ~1e-7 relative); another weight moves them by far more
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        out_a = a(input_ids=ids, output_hidden_states=True)
        out_b = b(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out_b.logits, out_a.logits, rtol=1e-5, atol=1e-5)
    hidden = out_a.hidden_states[-1]
    torch.testing.assert_close(connector_b(hidden), connector(hidden), rtol=1e-5, atol=1e-5)
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
