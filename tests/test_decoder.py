"""Decoder workers: the tiny SANA path (seeded, batched, weight-versioned, as a Ray actor) and the
glyph decoder (token rows <-> text, read back by the real PaddleOCR through the OCR reward)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from policy.image_tokenizer import ImageToIds
from policy.loading import load_ar_model, load_tokenizer, load_vocab
from policy.model_dir import CheckpointNotFoundError, ModelPaths
from policy.prompt import rollout_prompt_ids
from policy.weights import WeightUpdateError
from rollout.decoder_config import DecoderConfig, GlyphConfig
from rollout.decoder_worker import DecoderVersionError, DiffusionDecoderWorker, decoder_actor
from rollout.glyph import GlyphDecoder, GlyphImageEncoder
from rollout.records import RolloutBatch
from rollout.sana_decoder import latents_to_uint8

CAPTIONS = ["a cat", "two red buses on a road", "a blue clock"]
# Few steps keep the suite fast; the sampler is the same at 30 (the benchmark runs 30).
STEPS = 4


def sana_config(model_dir) -> DecoderConfig:
    return DecoderConfig(model=str(model_dir), num_inference_steps=STEPS, guidance_scale=2.0)


def rollout_batch(model_dir, captions: list[str], codes: torch.Tensor) -> RolloutBatch:
    paths = ModelPaths(model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    return RolloutBatch(
        prompt_ids=[rollout_prompt_ids(tokenizer, c) for c in captions],
        group_index=list(range(len(captions))),
        image_tokens=vocab.to_token_ids(codes),
        logprobs=torch.zeros(codes.shape),
        policy_version=0,
        seed=0,
    )


def random_codes(model_dir, rows: int, seed: int = 0) -> torch.Tensor:
    vocab = load_vocab(ModelPaths(model_dir))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab.codebook_size, (rows, vocab.tokens_per_image), generator=generator)  # [B, N]


def row(batch: RolloutBatch, r: int) -> RolloutBatch:
    return RolloutBatch([batch.prompt_ids[r]], [0], batch.image_tokens[r : r + 1], batch.logprobs[r : r + 1], 0, 0)


def assert_images_close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float reassociation: batched vs single matmuls (or 1 vs 2 threads, or two loads
    of the same weights at other addresses) differ by ~1e-6 relative, which after STEPS Euler steps
    flips a uint8 value by at most 1, and only for a value within ~1e-4 of a rounding boundary (well
    under 1% of the pixels)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01


@pytest.fixture(scope="module")
def sana_worker(tiny_model_dir) -> DiffusionDecoderWorker:
    return DiffusionDecoderWorker(sana_config(tiny_model_dir))


@pytest.fixture(scope="module")
def sana_batch(tiny_model_dir) -> RolloutBatch:
    return rollout_batch(tiny_model_dir, CAPTIONS, random_codes(tiny_model_dir, len(CAPTIONS)))


def test_pixels_map_from_minus_one_one_to_uint8():
    # (x / 2 + 0.5) * 255, rounded half to even, clamped: -1 -> 0, 0 -> 127.5 -> 128, 1 -> 255
    pixels = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert latents_to_uint8(pixels)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]


def test_sana_decode_is_seeded_and_shaped(sana_worker, sana_batch):
    first = sana_worker.decode(sana_batch, seed=5)
    again = sana_worker.decode(sana_batch, seed=5)
    other = sana_worker.decode(sana_batch, seed=6)
    assert first.images.shape == (3, 64, 64, 3) and first.images.dtype == np.uint8
    assert first.policy_version == 0
    np.testing.assert_array_equal(first.images, again.images)
    assert np.abs(first.images.astype(int) - other.images.astype(int)).mean() > 5
    # a real image, not a saturated or flat one: random SANA weights give mid-grey noise
    for image in first.images:
        assert 5 < image.std() and 20 < image.mean() < 235
    # rows with different prompts and tokens differ
    assert np.abs(first.images[0].astype(int) - first.images[1].astype(int)).mean() > 5
    assert set(first.timings) == {"ar_forward", "diffusion", "vae_decode", "decode_total"}


def test_batch_equals_single_decodes(sana_worker, sana_batch):
    batched = sana_worker.decode(sana_batch, seed=11).images
    # row r of a batch decoded with seed s uses noise seed s + r
    singles = np.concatenate([sana_worker.decode(row(sana_batch, r), seed=11 + r).images for r in range(len(sana_batch))])
    assert_images_close(batched, singles)


def test_micro_batches_keep_each_rows_seed_and_image(tiny_model_dir, sana_worker, sana_batch):
    """3 rows in micro-batches of 2: two SANA calls (rows 0-1 with seed s, row 2 with seed s + 2),
    the same images as one call of 3."""
    worker = DiffusionDecoderWorker(sana_config(tiny_model_dir).model_copy(update={"micro_batch_size": 2}))
    calls = []
    decode = worker.decoder.decode
    worker.decoder.decode = lambda prompts, tokens, seed: calls.append((len(prompts), seed)) or decode(prompts, tokens, seed)
    micro = worker.decode(sana_batch, seed=11)
    assert calls == [(2, 11), (1, 13)]
    assert_images_close(micro.images, sana_worker.decode(sana_batch, seed=11).images)
    assert set(micro.timings) == {"ar_forward", "diffusion", "vae_decode", "decode_total"}
    assert micro.timings["decode_total"] >= micro.timings["diffusion"] > 0


def test_condition_is_the_s0_and_image_positions(sana_worker, sana_batch, tiny_model_dir):
    # hidden states at <S0> + N image tokens equal the last N+1 states of an unpadded forward
    decoder = sana_worker.decoder
    states = decoder.ar_hidden_states(sana_batch.prompt_ids, sana_batch.image_tokens)
    n = sana_batch.image_tokens.shape[1]
    assert states.shape == (3, n + 1, 128)
    model = load_ar_model(ModelPaths(tiny_model_dir))
    ids = torch.tensor([sana_batch.prompt_ids[1] + sana_batch.image_tokens[1].tolist()])
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -(n + 1) :]
    torch.testing.assert_close(states[1], reference, atol=1e-5, rtol=1e-5)
    bad = RolloutBatch([sana_batch.prompt_ids[0][:-1]], [0], sana_batch.image_tokens[:1], sana_batch.logprobs[:1], 0, 0)
    with pytest.raises(ValueError, match=r"must end with <im_start><S0>"):
        sana_worker.decode(bad, seed=0)


def test_guidance_zero_samples_the_null_condition_only(tiny_model_dir, sana_batch):
    # guided = v_null + w (v_cond - v_null): at w = 0 the tokens cannot matter, so two different
    # rows with the same noise seed give the same image; at w = 2 they do not
    unguided = DiffusionDecoderWorker(sana_config(tiny_model_dir).model_copy(update={"guidance_scale": 0.0}))
    a, b = (unguided.decode(row(sana_batch, r), seed=9).images for r in (0, 1))
    np.testing.assert_array_equal(a, b)
    guided = DiffusionDecoderWorker(sana_config(tiny_model_dir))
    a, b = (guided.decode(row(sana_batch, r), seed=9).images for r in (0, 1))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5


def test_malformed_batches_are_clear_errors(sana_worker, sana_batch):
    tokens, prompts = sana_batch.image_tokens, sana_batch.prompt_ids
    cases = [
        (RolloutBatch(prompts, [0, 1, 2], tokens[:, :5], tokens[:, :5].float(), 0, 0), r"must be \[rows > 0, 16\], got \(3, 5\)"),
        (RolloutBatch([], [], tokens[:0], tokens[:0].float(), 0, 0), r"got \(0, 16\)"),
        (RolloutBatch(prompts[:2], [0, 1, 2], tokens, tokens.float(), 0, 0), "2 prompts for 3 token rows"),
        (RolloutBatch(prompts, [0, 1, 2], tokens - tokens.min(), tokens.float(), 0, 0), "outside the image-token range"),
    ]
    for batch, message in cases:
        with pytest.raises(ValueError, match=message):
            sana_worker.decode(batch, seed=0)


def perturbed(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state_dict.items()}


def test_weight_update_changes_hidden_states_and_images(tiny_model_dir, sana_batch):
    worker = DiffusionDecoderWorker(sana_config(tiny_model_dir))
    original = {k: v.clone() for k, v in worker.decoder.ar.state_dict().items()}
    states_v0 = worker.decoder.ar_hidden_states(sana_batch.prompt_ids, sana_batch.image_tokens)
    images_v0 = worker.decode(sana_batch, seed=3).images

    assert worker.update_weights(1, perturbed(original, 0.05)) == 1
    assert worker.served_version() == 1
    states_v1 = worker.decoder.ar_hidden_states(sana_batch.prompt_ids, sana_batch.image_tokens)
    decoded_v1 = worker.decode(dataclasses.replace(sana_batch, policy_version=1), seed=3)
    assert (states_v1 - states_v0).abs().max() > 0.1
    assert decoded_v1.policy_version == 1
    assert np.abs(decoded_v1.images.astype(int) - images_v0.astype(int)).mean() > 1

    # loading the original weights back (as a newer version) restores the exact outputs
    assert worker.update_weights(2, original) == 2
    torch.testing.assert_close(
        worker.decoder.ar_hidden_states(sana_batch.prompt_ids, sana_batch.image_tokens), states_v0, atol=0, rtol=0
    )
    np.testing.assert_array_equal(worker.decode(dataclasses.replace(sana_batch, policy_version=2), seed=3).images,
                                  images_v0)
    # SANA renders from the AR hidden states: tokens of v1 (or v3) are refused by a decoder serving v2
    for sampled in (1, 3):
        with pytest.raises(DecoderVersionError, match=f"decoder serves v2, the tokens were sampled at v{sampled}"):
            worker.decode(dataclasses.replace(sana_batch, policy_version=sampled), seed=3)


def test_bad_weight_update_is_refused_and_old_version_serves(tiny_model_dir, sana_batch):
    worker = DiffusionDecoderWorker(sana_config(tiny_model_dir))
    good = {k: v.clone() for k, v in worker.decoder.ar.state_dict().items()}
    assert worker.update_weights(4, good) == 4
    states = worker.decoder.ar_hidden_states(sana_batch.prompt_ids, sana_batch.image_tokens)
    name = "model.layers.0.mlp.up_proj.weight"
    missing = {k: v for k, v in good.items() if k != name}
    wrong_shape = {**perturbed(good, 1.0), name: torch.zeros(3, 3)}
    with_nan = {**perturbed(good, 1.0), name: torch.full_like(good[name], float("nan"))}
    unknown = {**good, "model.layers.9.extra.weight": torch.zeros(2)}
    cases = [(5, missing, "missing names"), (5, wrong_shape, "shape"), (5, with_nan, "NaN"), (5, unknown, "unknown names")]
    for version, weights, reason in cases:
        with pytest.raises(WeightUpdateError, match=reason):
            worker.update_weights(version, weights)
    with pytest.raises(WeightUpdateError, match="older than the served 4"):
        worker.update_weights(3, good)
    with pytest.raises(WeightUpdateError, match="non-negative int"):
        worker.update_weights(-1, good)
    assert worker.served_version() == 4
    after = worker.decoder.ar_hidden_states(sana_batch.prompt_ids, sana_batch.image_tokens)
    torch.testing.assert_close(after, states, atol=0, rtol=0)  # nothing was partially loaded


def test_missing_checkpoints_and_wrong_kind_are_clear_errors(tmp_path, glyph_model_dir):
    with pytest.raises(CheckpointNotFoundError, match="no such directory"):
        DiffusionDecoderWorker(DecoderConfig(model=str(tmp_path / "nope")))
    with pytest.raises(CheckpointNotFoundError, match="not in the local cache"):
        DiffusionDecoderWorker(DecoderConfig(model="BLIP3o/BLIP3o-NEXT-SFT-not-cached"))
    with pytest.raises(CheckpointNotFoundError, match="has no SANA decoder"):
        DiffusionDecoderWorker(DecoderConfig(model=str(glyph_model_dir), kind="sana"))
    with pytest.raises(ValidationError, match="extra"):
        DecoderConfig(model="x", num_steps=3)
    with pytest.raises(ValidationError, match="repeats"):
        GlyphConfig(alphabet="aab")


@pytest.mark.slow
def test_decoder_runs_as_ray_actor(ray_cluster, tiny_model_dir, sana_worker, sana_batch):
    ray = ray_cluster
    actor = decoder_actor(sana_config(tiny_model_dir))
    remote = ray.get(actor.decode.remote(sana_batch, 5))
    local = sana_worker.decode(sana_batch, seed=5)
    # the actor runs torch with 1 thread (Ray's OMP_NUM_THREADS=1), this process with 2
    assert_images_close(remote.images, local.images)
    assert remote.policy_version == 0
    weights = {k: v.clone() for k, v in sana_worker.decoder.ar.state_dict().items()}
    assert ray.get(actor.update_weights.remote(7, weights)) == 7
    with pytest.raises(WeightUpdateError, match="missing names"):
        ray.get(actor.update_weights.remote(8, {}))
    assert ray.get(actor.served_version.remote()) == 7
    ray.kill(actor)


# -- glyph -------------------------------------------------------------------------------------


def glyphs() -> GlyphDecoder:
    return GlyphDecoder(GlyphConfig(), codebook_size=64, tokens_per_image=8)


def test_glyph_table_round_trips_text():
    decoder = glyphs()
    # a..z are codes 0..25, 0..9 are 26..35, 36..63 are blank; rows pad with the first blank (36)
    assert decoder.text_to_codes("cat") == [2, 0, 19, 36, 36, 36, 36, 36]
    assert decoder.text_to_codes("a1 z9") == [0, 27, 36, 25, 35, 36, 36, 36]
    assert decoder.codes_to_text([2, 0, 19, 63, 40, 26, 36, 36]) == "cat  0  "
    assert sum(c == " " for c in decoder.characters) == 28
    with pytest.raises(ValueError, match="longer than the 8 tokens"):
        decoder.text_to_codes("elephants")
    with pytest.raises(ValueError, match=r"\['C'\] are not in the glyph alphabet"):
        decoder.text_to_codes("Cat")
    with pytest.raises(ValueError, match="outside the codebook"):
        decoder.codes_to_text([64])


def test_glyph_rendering_draws_in_the_right_tiles():
    decoder = glyphs()
    blank = decoder.render_text("")
    assert blank.shape == (64, 256, 3) and blank.dtype == np.uint8 and (blank == 255).all()
    image = decoder.render_text("  l")  # one narrow letter in tile 2 (x 64..95)
    dark_columns = np.nonzero((image < 128).any(axis=(0, 2)))[0]
    assert 64 <= dark_columns.min() and dark_columns.max() < 96
    assert image.min() == 0  # black text on white
    codes = torch.tensor([decoder.text_to_codes("sun"), decoder.text_to_codes("  l")])
    np.testing.assert_array_equal(decoder.render_codes(codes), np.stack([decoder.render_text("sun"), image]))


def de_bruijn_pairs(symbols: int) -> list[int]:
    """A cyclic sequence over range(symbols) holding every ordered pair (a, b) once as neighbours (de Bruijn
    B(symbols, 2), by concatenating Lyndon words), with its first symbol repeated at the end to close it."""
    sequence, word = [], [0, 0, 0]

    def build(t: int, p: int) -> None:
        if t > 2:
            if 2 % p == 0:
                sequence.extend(word[1:p + 1])
            return
        word[t] = word[t - p]
        build(t + 1, p)
        for symbol in range(word[t - p] + 1, symbols):
            word[t] = symbol
            build(t + 1, t)

    build(1, 1)
    return sequence + sequence[:1]


def test_glyph_inverse_reads_back_every_row_it_draws():
    """The inverse of the glyph decoder: encode(render(codes)) is codes with every blank code read as the one
    blank code 36 (all blanks draw the same tile), and render(encode(image)) == image pixel for pixel. Rows
    cut from a de Bruijn sequence put every ordered pair of the 37 tiles (36 characters + blank) side by
    side at least once, so every neighbour overhang is met (DejaVu Bold's 'm' reaches 1 px into the tile
    on its left); random rows put codes at the edges."""
    decoder = glyphs()
    encoder = GlyphImageEncoder(decoder)
    tiles = de_bruijn_pairs(37)  # 1370 symbols: 36 = blank
    rows = [tiles[i:i + 8] for i in range(0, len(tiles) - 1, 7)]  # neighbouring rows share a symbol: no pair lost
    rows[-1] = (rows[-1] + [36] * 8)[:8]
    generator = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.tensor(rows), torch.randint(0, 64, (50, 8), generator=generator)])  # [246, 8]
    images = decoder.render_codes(codes)  # [246, 64, 256, 3]
    read = encoder.encode(images)
    assert torch.equal(read, torch.where(codes >= 36, 36, codes))
    np.testing.assert_array_equal(decoder.render_codes(read), images)
    assert isinstance(encoder, ImageToIds) and (encoder.tokens_per_image, encoder.codebook_size) == (8, 64)
    with pytest.raises(ValueError, match=r"expected glyph images of shape \[B, 64, 256, 3\]"):
        decoder.images_to_codes(images[:, :, :128])


def test_glyph_worker_decodes_rows_and_tracks_versions(glyph_model_dir):
    worker = DiffusionDecoderWorker(DecoderConfig(model=str(glyph_model_dir)))  # kind from the layout
    words = ["cat", "road", "stop"]
    codes = torch.tensor([worker.decoder.glyphs.text_to_codes(w) for w in words])
    decoded = worker.decode(rollout_batch(glyph_model_dir, words, codes), seed=0)
    np.testing.assert_array_equal(decoded.images, np.stack([glyphs().render_text(w) for w in words]))
    weights = load_ar_model(ModelPaths(glyph_model_dir)).state_dict()
    assert worker.update_weights(3, weights) == 3 and worker.served_version() == 3
    with pytest.raises(WeightUpdateError, match="shape"):
        worker.update_weights(4, {**weights, "lm_head.weight": torch.zeros(2, 2)})
    assert worker.served_version() == 3
    batch_v0 = rollout_batch(glyph_model_dir, words, codes)
    assert worker.decode(dataclasses.replace(batch_v0, policy_version=3), seed=0).policy_version == 3
    # glyph tiles do not depend on the AR weights: tokens of any version render, the same, and the
    # images belong to the tokens' version (the driver then sees no version mismatch to redo)
    for sampled in (0, 4):
        again = worker.decode(dataclasses.replace(batch_v0, policy_version=sampled), seed=0)
        np.testing.assert_array_equal(again.images, decoded.images)
        assert again.policy_version == sampled


@pytest.mark.slow
def test_glyph_rows_read_back_with_the_ocr_reward():
    from rewards.ocr import OcrConfig, OcrScorer

    decoder = glyphs()
    words = ["cat", "sun", "road", "open", "stop", "bike", "fish", "star", "hello 42", "a1b2c3d4"]
    images = [decoder.render_codes(torch.tensor([decoder.text_to_codes(w)]))[0] for w in words]
    results = OcrScorer(OcrConfig(size="small")).score(images, words)
    assert [r.recognized.replace(" ", "").lower() for r in results] == [w.replace(" ", "") for w in words]
    assert [r.reward for r in results] == [1.0] * len(words)
    # a blank row reads as nothing
    assert OcrScorer(OcrConfig(size="small")).read([decoder.render_text("")]) == [""]
