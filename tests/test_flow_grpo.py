"""Flow-GRPO's objective (rl/objectives/flow_grpo.py) against values computed by hand in the
comments: the per-step loss, the KL term as Flow-GRPO computes it, and the EMA of the weights.
No model: pure tensor math (the learner that uses it: tests/test_diffusion_learner.py)."""

from __future__ import annotations

import pytest
import torch

from rl.objectives.flow_grpo import (
    WeightsEMA,
    ema_decay,
    flow_grpo_kl,
    flow_grpo_step_loss,
    gaussian_kl,
)
from rollout.flow_sde import sde_step


def test_flow_grpo_step_loss_by_hand():
    # advantages [2, -7] -> clipped to 5: [2, -5]; ratios exp([0.1, -0.2]) = [1.105171, 0.818731], clip 0.05
    # image 0: A = 2:  max(-2 * 1.105171, -2 * 1.05) = max(-2.210342, -2.1) = -2.1 (clipped)
    # image 1: A = -5: max(5 * 0.818731, 5 * 0.95) = max(4.093654, 4.75) = 4.75 (clipped)
    # policy loss = (-2.1 + 4.75) / 2 = 1.325
    logp = torch.tensor([0.1, -0.2], requires_grad=True)
    old = torch.zeros(2)
    # KL: means differ by 0.1 everywhere on image 0, 0 on image 1; s = 0.5 -> 0.01 / (2 * 0.25) = 0.02
    mean = torch.zeros(2, 1, 2, 2)
    mean[0] += 0.1
    kl = gaussian_kl(mean, torch.zeros(2, 1, 2, 2), torch.full((1, 1, 1, 1), 0.5))
    assert kl.tolist() == pytest.approx([0.02, 0.0])
    loss, stats = flow_grpo_step_loss(logp, old, torch.tensor([2.0, -7.0]), clip_range=0.05, adv_clip_max=5.0,
                                      beta=0.5, kl=kl)
    assert stats.policy_loss == pytest.approx(1.325, abs=1e-6)
    assert stats.kl == pytest.approx(0.01) and loss.item() == pytest.approx(1.325 + 0.5 * 0.01, abs=1e-6)
    assert stats.clip_fraction == 1.0 and stats.ratio_mean == pytest.approx((1.105171 + 0.818731) / 2, abs=1e-6)
    loss.backward()
    assert logp.grad.tolist() == [0.0, 0.0]  # both clipped: no policy gradient
    # at the first update the ratio is exactly 1: the unclipped surrogate, gradient -A / B
    first = torch.zeros(2, requires_grad=True)
    loss, stats = flow_grpo_step_loss(first, torch.zeros(2), torch.tensor([2.0, -7.0]), 0.05, 5.0)
    loss.backward()
    assert stats.ratio_mean == 1.0 and first.grad.tolist() == pytest.approx([-1.0, 2.5])


def test_the_kl_term_is_flow_grpos_at_steps_of_different_lengths():
    """Two SDE steps of the sampler's own math (rollout/flow_sde.py), the trained and the reference
    velocity 0.2 apart on image 0 and equal on image 1. Flow-GRPO (`train_sd3.py`) takes
    kl = mean((mu - mu_ref)^2) / (2 std_dev_t^2), std_dev_t = a sqrt(sigma / (1 - sigma)) before
    the sqrt(-dt) factor; the exact Gaussian KL is that divided by -dt, so an unweighted exact KL
    would be 4x too large at the first step and 10x at the second.

    a = 0.7, x = 1 (both), mu - mu_ref = 0.2 (1 + std^2 (1 - sigma) / (2 sigma)) dt:
      step 1: sigma 0.5 -> 0.25, dt -0.25: std 0.7, factor 1 + 0.49 * 0.5 / 1.0 = 1.245,
              mu - mu_ref = 0.2 * 1.245 * -0.25 = -0.06225 -> kl = 0.0038750625 / 0.98 = 0.00395415
      step 2: sigma 0.9 -> 0.8, dt -0.1: std 0.7 * 3 = 2.1, factor 1 + 4.41 * 0.1 / 1.8 = 1.245,
              mu - mu_ref = 0.2 * 1.245 * -0.1 = -0.0249 -> kl = 0.00062001 / 8.82 = 7.0296e-5
    """
    x = torch.ones(2, 1, 2, 2)
    velocity = torch.zeros(2, 1, 2, 2)
    velocity[0] += 0.2
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    expected = {(0.5, 0.25): 0.0038750625 / 0.98, (0.9, 0.8): 0.00062001 / 8.82}
    for (sigma, sigma_next), kl_by_hand in expected.items():
        policy = sde_step(velocity, x, sigma, sigma_next, sigma_max=0.95, noise_level=0.7, noise=noise)
        reference = sde_step(torch.zeros_like(velocity), x, sigma, sigma_next, 0.95, 0.7,
                             next_latents=policy.next_latents)
        kl = flow_grpo_kl(policy.mean, reference.mean, policy.scale, sigma_next - sigma)  # [2]
        # float32 means of magnitude 1 carry ~1e-7 absolute error into a difference of 0.02 .. 0.06
        assert kl.tolist() == pytest.approx([kl_by_hand, 0.0], rel=1e-4, abs=1e-12)
        # ...and the loss adds beta times its batch mean (Flow-GRPO's beta 0.04, as is)
        _, stats = flow_grpo_step_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]), 1e-4, 5.0,
                                       beta=0.04, kl=kl)
        assert stats.kl == pytest.approx(kl_by_hand / 2, rel=1e-4)
        assert stats.loss == pytest.approx(0.04 * kl_by_hand / 2, rel=1e-4)
    with pytest.raises(ValueError, match="negative"):
        flow_grpo_kl(x, x, torch.ones(1, 1, 1, 1), 0.1)


def test_ema_decays_and_updates_by_hand():
    # decay 0.9, every step: d_n = min((1 + n) / (10 + n), 0.9) = 2/11, 3/12, 4/13 after steps 1, 2, 3
    # weights 1, 2, 4 after them, the EMA starting at 0:
    #   e1 = 0 + (9/11)(1 - 0) = 0.818182
    #   e2 = 0.818182 + 0.75 (2 - 0.818182) = 1.704545
    #   e3 = 1.704545 + (9/13)(4 - 1.704545) = 3.293706
    ema = WeightsEMA({"w": torch.zeros(3, dtype=torch.bfloat16)}, decay=0.9, update_interval=1)
    assert ema.weights["w"].dtype == torch.float32
    for weight, expected in ((1.0, 0.818182), (2.0, 1.704545), (4.0, 3.293706)):
        assert ema.tick()
        ema.update({"w": torch.full((3,), weight, dtype=torch.bfloat16)})
        assert ema.weights["w"].tolist() == pytest.approx([expected] * 3, abs=1e-6)
    assert ema.steps == 3
    # exports and publishes hold it in the weight's own dtype (bf16 rounds 3.293706 to 3.296875)
    assert ema.cast()["w"].dtype == torch.bfloat16 and ema.cast()["w"][0].item() == 3.296875
    assert ema_decay(1000, 0.9) == 0.9 and ema_decay(0, 0.9) == pytest.approx(0.1)

    # Flow-GRPO's interval 8: the EMA takes the weights after steps 7 and 15 ((n + 1) % 8 == 0), at d 8/17
    every_8 = WeightsEMA({"w": torch.zeros(1)}, decay=0.9, update_interval=8)
    assert [n for n in range(1, 17) if every_8.tick()] == [7, 15]
    assert ema_decay(7, 0.9) == pytest.approx(8 / 17)


def test_ema_state_round_trip_and_refuses_other_weights():
    ema = WeightsEMA({"a": torch.zeros(2), "b": torch.ones(1)}, decay=0.9, update_interval=1)
    ema.tick()
    ema.update({"a": torch.ones(2), "b": torch.zeros(1)})  # d = 2/11: a -> 9/11, b -> 2/11
    again = WeightsEMA({"a": torch.full((2,), 7.0), "b": torch.zeros(1)}, decay=0.9, update_interval=1)
    again.load_state_dict(ema.state_dict())
    assert again.steps == 1 and all(torch.equal(again.weights[n], ema.weights[n]) for n in ema.weights)
    assert again.weights["a"].tolist() == pytest.approx([9 / 11] * 2)
    assert again.weights["a"].data_ptr() != ema.weights["a"].data_ptr()  # a copy, not the saved tensors
    other = WeightsEMA({"a": torch.zeros(3), "b": torch.ones(1)}, decay=0.9, update_interval=1)
    with pytest.raises(ValueError, match="other weights"):
        other.load_state_dict(ema.state_dict())
