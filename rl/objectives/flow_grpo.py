"""Flow-GRPO's objective for one SDE step of the diffusion decoder, top to bottom:

    advantages (clipped) -> ratio per step -> clipped surrogate -> KL to the frozen decoder -> loss

Notation per image b and SDE step t (rollout/flow_sde.py):
    A_b       group-relative advantage of image b, clipped to [-adv_clip_max, adv_clip_max]
    logp      log p(x_{t+1} | x_t) under the decoder being trained (with grad), a mean over latent
              elements as the sampler records it
    logp_old  the sampler's log-prob of the same transition
    mu, mu_ref  the transition means under the trained and the frozen decoder; s its std

Source: Liu et al. 2025 (Flow-GRPO), yifan123/flow_grpo `scripts/train_sd3.py` (the loss at each
sampled timestep j): ratio = exp(logp - logp_old), loss = mean(max(-A ratio, -A clip(ratio,
1 - eps, 1 + eps))), + beta KL. Deliberate difference: our KL is the exact KL between the two
Gaussian transitions, mean over elements of (mu - mu_ref)^2 / (2 s^2) with s = std_t sqrt(-dt);
Flow-GRPO divides by 2 std_t^2 instead (its value is ours times -dt, a constant per step), so its
beta values correspond to ours times -dt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlowLossStats:
    loss: float
    policy_loss: float
    kl: float
    """Mean per-image KL (before beta)."""
    clip_fraction: float
    """Share of images whose |ratio - 1| exceeds the clip range."""
    ratio_mean: float


def clipped_advantages(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """A clamped to [-adv_clip_max, adv_clip_max] (Flow-GRPO: 5)."""
    return advantages.clamp(-adv_clip_max, adv_clip_max)  # [B]


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, s^2) || N(mu_ref, s^2)) per element, averaged over the latent: -> [B]."""
    per_element = (mean - ref_mean) ** 2 / (2 * scale**2)  # [B, C, h, w]
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))  # [B]


def flow_grpo_step_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float, adv_clip_max: float, beta: float = 0.0,
                        kl: torch.Tensor | None = None) -> tuple[torch.Tensor, FlowLossStats]:
    """The loss of one SDE step over a batch of images (all [B]); `kl` [B] from `gaussian_kl`
    (needed when beta > 0)."""
    adv = clipped_advantages(advantages, adv_clip_max)  # [B]
    ratio = (logprobs - old_logprobs.detach()).clamp(-20.0, 20.0).exp()  # [B]
    unclipped = -adv * ratio  # [B]
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)  # [B]
    policy_loss = torch.maximum(unclipped, clipped).mean()
    if beta > 0:
        if kl is None:
            raise ValueError("beta > 0 needs the KL to the frozen decoder")
        kl_mean = kl.mean()
    else:
        kl_mean = torch.zeros((), dtype=policy_loss.dtype)
    loss = policy_loss + beta * kl_mean
    with torch.no_grad():
        stats = FlowLossStats(
            loss=loss.item(), policy_loss=policy_loss.item(), kl=kl_mean.item(),
            clip_fraction=float(((ratio - 1.0).abs() > clip_range).float().mean()),
            ratio_mean=float(ratio.mean()),
        )
    return loss, stats
