"""Flow-GRPO's SDE sampler for the flow-matching decoder: each Euler step becomes a Gaussian
transition with a log-prob, so the decoder can be trained with a policy gradient.

The flow-matching ODE  x' = x + v dt  (dt = sigma_next - sigma < 0) is replaced by an SDE with the
same marginals (Liu et al. 2025, "Flow-GRPO"; yifan123/flow_grpo
`flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`):

    std   = a * sqrt(sigma / (1 - sigma))          (sigma = 1 uses the next sigma's value below 1
                                                    in the denominator, as there: no division by 0)
    mean  = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt
    x'    = mean + std sqrt(-dt) eps,    eps ~ N(0, I)
    log p(x' | x) = mean over latent elements of  -(x' - mean)^2 / (2 s^2) - log s - log sqrt(2 pi),
                    s = std sqrt(-dt)

a is the noise level (0.7 in Flow-GRPO). With a = 0 the step is exactly the Euler ODE step and
has no density (`step_log_prob` refuses it).

Everything here is pure tensor math (no model): the decoder worker samples with it and the
diffusion learner recomputes the same log-probs from the recorded latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SdeStep:
    """One transition x -> x'."""

    next_latents: torch.Tensor
    """[B, C, h, w] x'."""
    mean: torch.Tensor
    """[B, C, h, w] the Gaussian's mean."""
    scale: torch.Tensor
    """[B or 1, 1, 1, 1] its standard deviation s = std * sqrt(-dt) (0 at noise level 0)."""


def step_std(sigma: float, sigma_max: float, noise_level: float) -> float:
    """std_t = a * sqrt(sigma / (1 - sigma)); at sigma = 1 the denominator uses `sigma_max`, the
    largest sigma below 1 of the schedule (Flow-GRPO's `sigmas[1]`)."""
    denominator = 1.0 - (sigma_max if sigma >= 1.0 else sigma)
    return noise_level * math.sqrt(sigma / denominator)


def sde_step(velocity: torch.Tensor, latents: torch.Tensor, sigma: float, sigma_next: float, sigma_max: float,
             noise_level: float, noise: torch.Tensor | None = None, next_latents: torch.Tensor | None = None) -> SdeStep:
    """The transition from `latents` at `sigma` to `sigma_next` given the (guided) velocity.

    Give `noise` (eps, [B, C, h, w]) to sample x', or `next_latents` to score a recorded one.
    Computed in float32 (Flow-GRPO: bf16 overflows in the mean).
    """
    if (noise is None) == (next_latents is None):
        raise ValueError("give exactly one of noise (to sample) or next_latents (to score)")
    x, v = latents.float(), velocity.float()  # [B, C, h, w]
    dt = sigma_next - sigma  # < 0
    std = step_std(sigma, sigma_max, noise_level)
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt  # [B, C, h, w]
    scale = torch.full((1, 1, 1, 1), std * math.sqrt(-dt), dtype=torch.float32, device=x.device)
    if next_latents is None:
        next_latents = mean + scale * noise.float()  # [B, C, h, w]
    return SdeStep(next_latents.float(), mean, scale)


def step_log_prob(step: SdeStep) -> torch.Tensor:
    """log p(x' | x) averaged over the latent elements: -> [B] (Flow-GRPO's normalisation)."""
    if bool((step.scale <= 0).any()):
        raise ValueError("a deterministic step (noise level 0) has no log-prob")
    squared = (step.next_latents.detach() - step.mean) ** 2  # [B, C, h, w]
    per_element = -squared / (2 * step.scale**2) - torch.log(step.scale) - 0.5 * math.log(2 * math.pi)
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))  # [B]


def step_noise(seed: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """eps of one row at one step from a CPU generator of its own: a trajectory can be replayed
    from (seed, step) alone, whatever the batch or device."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randn(shape, generator=generator)


@dataclass
class SdeTrajectory:
    """What the sampler records so the learner can recompute every step's log-prob."""

    latents: torch.Tensor
    """[T+1, B, C, h, w] x_0 (noise) .. x_T (final), float32."""
    log_probs: torch.Tensor
    """[T, B] log p(x_{t+1} | x_t) under the sampling weights (0 for ODE steps)."""
    sigmas: list[float]
    """T+1 sigmas, from 1 down to 0."""
    sde_steps: list[int]
    """Indices t of the steps sampled with the SDE (the others are ODE steps: MixGRPO's window)."""
    noise_level: float
