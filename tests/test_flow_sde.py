"""Flow-GRPO's SDE sampler: the step and its log-prob by hand, then on the tiny SANA decoder
(noise level 0 is the ODE sampler; recomputed log-probs equal the sampler's)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rollout.decoder_config import DecoderConfig
from rollout.flow_sde import sde_step, step_log_prob, step_std
from tests.test_decoder import CAPTIONS, random_codes, rollout_batch


def test_sde_step_and_log_prob_by_hand():
    # x = 1, v = 0.5, sigma 0.5 -> 0.25 (dt = -0.25), noise level a = 0.7
    # std = 0.7 sqrt(0.5 / 0.5) = 0.7
    # mean = 1 (1 + 0.49 / 1.0 * -0.25) + 0.5 (1 + 0.49 * 0.5 / 1.0) * -0.25 = 0.8775 - 0.155625 = 0.721875
    # s = 0.7 sqrt(0.25) = 0.35; eps = 1 -> x' = 1.071875
    # log p = -(0.35)^2 / (2 * 0.35^2) - log 0.35 - log sqrt(2 pi) = -0.5 + 1.049822 - 0.918939 = -0.369117
    x, v = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.5)
    step = sde_step(v, x, sigma=0.5, sigma_next=0.25, sigma_max=0.9, noise_level=0.7, noise=torch.ones(1, 1, 1, 1))
    assert step.mean.item() == pytest.approx(0.721875, abs=1e-6)
    assert step.scale.item() == pytest.approx(0.35, abs=1e-6)
    assert step.next_latents.item() == pytest.approx(1.071875, abs=1e-6)
    assert step_log_prob(step).item() == pytest.approx(-0.369117, abs=1e-5)
    # scoring the recorded x' gives the same number; another x' a lower one (farther from the mean)
    again = sde_step(v, x, 0.5, 0.25, 0.9, 0.7, next_latents=step.next_latents)
    assert step_log_prob(again).item() == pytest.approx(-0.369117, abs=1e-5)
    farther = sde_step(v, x, 0.5, 0.25, 0.9, 0.7, next_latents=step.next_latents + 0.35)
    # (2 s)^2 / (2 s^2) = 2 instead of 0.5: 1.5 lower
    assert step_log_prob(farther).item() == pytest.approx(-0.369117 - 1.5, abs=1e-5)
    # the log-prob is a mean over latent elements: a [1, 2, 1, 1] latent with eps (1, 0) averages
    two = sde_step(v.expand(1, 2, 1, 1), x.expand(1, 2, 1, 1), 0.5, 0.25, 0.9, 0.7,
                   noise=torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    assert step_log_prob(two).item() == pytest.approx(-0.369117 + 0.25, abs=1e-5)


def test_sigma_one_uses_the_next_sigma_and_noise_level_zero_is_euler():
    # at sigma = 1: std = a sqrt(1 / (1 - sigma_max)) (Flow-GRPO's sigmas[1])
    assert step_std(1.0, 0.9, 0.7) == pytest.approx(0.7 * math.sqrt(10))
    x, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ode = sde_step(v, x, 0.6, 0.4, 0.9, 0.0, noise=torch.randn(2, 4, 3, 3))
    torch.testing.assert_close(ode.next_latents, x + v * (0.4 - 0.6))
    with pytest.raises(ValueError, match="no log-prob"):
        step_log_prob(ode)
    with pytest.raises(ValueError, match="exactly one"):
        sde_step(v, x, 0.6, 0.4, 0.9, 0.7)


@pytest.fixture(scope="module")
def sana(tiny_model_dir):
    from policy.model_dir import ModelPaths
    from rollout.decoder_worker import build_decoder

    decoder = build_decoder(DecoderConfig(model=str(tiny_model_dir), num_inference_steps=6), ModelPaths(tiny_model_dir))
    batch = rollout_batch(tiny_model_dir, CAPTIONS, random_codes(tiny_model_dir, len(CAPTIONS)))
    return decoder, decoder.ar_hidden_states(batch.prompt_ids, batch.image_tokens)


def test_noise_level_zero_reproduces_the_ode_sampler(sana):
    decoder, hidden = sana
    ode = decoder.sample_latents(hidden, seed=3)
    sde = decoder.sample_sde(hidden, seed=3, steps=6, noise_level=0.0)
    torch.testing.assert_close(sde.latents[-1], ode.float(), atol=1e-5, rtol=1e-5)
    assert bool((sde.log_probs == 0).all())
    noisy = decoder.sample_sde(hidden, seed=3, steps=6, noise_level=0.7)
    assert float((noisy.latents[-1] - ode.float()).abs().mean()) > 0.05  # the SDE does move the sample


def test_recomputed_log_probs_equal_the_samplers(sana):
    """What the diffusion learner does at step 0: same weights, recorded latents -> same log-probs,
    so the first ratio is exactly 1."""
    decoder, hidden = sana
    trajectory = decoder.sample_sde(hidden, seed=7, steps=6, noise_level=0.7, sde_steps=[1, 2, 4])
    assert trajectory.latents.shape[:2] == (7, len(CAPTIONS))
    captions = decoder.captions(hidden)
    timesteps, sigmas = decoder.schedule(6)
    assert sigmas == trajectory.sigmas and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    for index, t in enumerate(timesteps):
        if index not in trajectory.sde_steps:
            assert bool((trajectory.log_probs[index] == 0).all())
            continue
        with torch.no_grad():
            velocity = decoder.guided_velocity(trajectory.latents[index], t, captions)
        step = sde_step(velocity, trajectory.latents[index], sigmas[index], sigmas[index + 1], sigmas[1], 0.7,
                        next_latents=trajectory.latents[index + 1])
        assert float((step_log_prob(step) - trajectory.log_probs[index]).abs().max()) < 1e-5
    # row r's trajectory depends only on seed + r: decoded alone with seed 8 it is row 1 of the batch
    alone = decoder.sample_sde(hidden[1:2], seed=8, steps=6, noise_level=0.7, sde_steps=[1, 2, 4])
    torch.testing.assert_close(alone.latents[:, 0], trajectory.latents[:, 1], atol=1e-5, rtol=1e-5)


def test_guidance_one_is_cfg_free_one_conditional_forward(sana):
    """guidance_scale 1.0 (CFG-free sampling and training) runs only the conditional branch: half
    the forwards, the velocity of CFG at w = 1 up to float rounding."""
    from rollout.sana_decoder import guided_velocity

    decoder, hidden = sana
    captions = decoder.captions(hidden)  # [2B, N+1, d], null rows first
    latents = torch.randn(len(CAPTIONS), *decoder.initial_noise(1, 0).shape[1:], generator=torch.Generator().manual_seed(0))
    t = decoder.schedule(6)[0][2]
    batches = []

    def counting(model_input, **kwargs):
        batches.append(model_input.shape[0])
        return decoder.transformer(model_input, **kwargs)

    scale = decoder.transformer.config.timestep_scale
    with torch.no_grad():
        free = guided_velocity(counting, scale, latents, t, captions, 1.0, decoder.dtype)
        cond = decoder.transformer(latents, encoder_hidden_states=captions[len(CAPTIONS):],
                                   timestep=(t * scale).expand(len(CAPTIONS)), return_dict=False)[0].float()
        both = guided_velocity(counting, scale, latents, t, captions, 1.0 + 1e-9, decoder.dtype)
    assert batches == [len(CAPTIONS), 2 * len(CAPTIONS)]
    assert torch.equal(free, cond)
    torch.testing.assert_close(free, both, atol=1e-5, rtol=1e-5)


def test_jpeg_compressibility_rewards():
    from rewards.compressibility import jpeg_reward, jpeg_size_kb
    from rewards.errors import RewardInputError

    flat = np.full((64, 64, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    small, large = jpeg_size_kb(flat), jpeg_size_kb(noise)
    assert 0 < small < 1.0 < large  # a flat 64 px image is a few hundred bytes, noise several kB
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    assert large == buffer.tell() / 1000
    assert jpeg_reward(noise, "incompressibility") == large
    assert jpeg_reward(noise, "compressibility") == pytest.approx(-large / 500)
    assert jpeg_reward(flat, "compressibility") > jpeg_reward(noise, "compressibility")
    with pytest.raises(RewardInputError):
        jpeg_size_kb(np.zeros((4, 4), np.uint8))
