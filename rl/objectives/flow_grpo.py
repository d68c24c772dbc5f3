"""Flow-GRPO's objective for one SDE step of the diffusion decoder, top to bottom:

    advantages (clipped) -> ratio per step -> clipped surrogate -> KL to the frozen decoder -> loss

and the EMA of the trained weights that Flow-GRPO evaluates and saves (`WeightsEMA`, at the end).

Notation per image b and SDE step t (rollout/flow_sde.py):
    A_b       group-relative advantage of image b, clipped to [-adv_clip_max, adv_clip_max]
    logp      log p(x_{t+1} | x_t) under the decoder being trained (with grad), a mean over latent
              elements as the sampler records it
    logp_old  the sampler's log-prob of the same transition
    mu, mu_ref  the transition means under the trained and the frozen decoder; s = std_t sqrt(-dt_t)
              their std, std_t = a sqrt(sigma / (1 - sigma)) and dt_t = sigma_{t+1} - sigma_t < 0

Source: Liu et al. 2025 (Flow-GRPO), yifan123/flow_grpo `scripts/train_sd3.py` (the loss at each
sampled timestep j): ratio = exp(logp - logp_old), loss = mean(max(-A ratio, -A clip(ratio,
1 - eps, 1 + eps))), + beta KL_t with KL_t = mean over elements of (mu - mu_ref)^2 / (2 std_t^2)
(`kl_loss` there; std_t is `std_dev_t` of `sd3_sde_with_logprob.py`, before the sqrt(-dt) factor).
That is the exact KL between the two Gaussian transitions weighted by the step's length:
KL_t = (-dt_t) KL(N(mu, s^2) || N(mu_ref, s^2)) (`flow_grpo_kl`), so beta means what Flow-GRPO's
beta means (0.04 for GenEval and OCR) on any sigma schedule. A shifted schedule has steps of very
different lengths (shift 3, 10 steps: -dt from 0.036 to 0.25), and the weighting follows them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlowLossStats:
    loss: float
    policy_loss: float
    kl: float
    """Mean per-image KL term KL_t (`flow_grpo_kl`, before beta)."""
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


def flow_grpo_kl(mean: torch.Tensor, ref_mean: torch.Tensor, scale: torch.Tensor, dt: float) -> torch.Tensor:
    """Flow-GRPO's KL term of one SDE step: -> [B]

        KL_t = (-dt_t) KL(N(mu, s^2) || N(mu_ref, s^2)) = mean over elements of (mu - mu_ref)^2 / (2 std_t^2)

    `scale` is s = std_t sqrt(-dt_t) (the step's `SdeStep.scale`), `dt` = sigma_{t+1} - sigma_t < 0."""
    if dt >= 0:
        raise ValueError(f"an SDE step goes down in sigma: dt {dt} must be negative")
    return -dt * gaussian_kl(mean, ref_mean, scale)  # [B]


def flow_grpo_step_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float, adv_clip_max: float, beta: float = 0.0,
                        kl: torch.Tensor | None = None) -> tuple[torch.Tensor, FlowLossStats]:
    """The loss of one SDE step over a batch of images (all [B]); `kl` [B] from `flow_grpo_kl`
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


# ---------------------------------------------------------------------------------------------
# Spatial credit (rl/objectives/grpo.py `spatial_credit`): a latent position's own advantage


def position_log_probs(next_latents: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log p(x_{t+1} | x_t) of each latent position, averaged over channels: -> [B, h*w].

    The transition is a diagonal Gaussian, so the image's log-prob (rollout/flow_sde.py
    `step_log_prob`, the mean over all elements) is the mean of these over positions."""
    squared = (next_latents.detach() - mean) ** 2  # [B, C, h, w]
    per_element = -squared / (2 * scale**2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)  # [B, C, h, w]
    return per_element.mean(dim=1).flatten(1)  # [B, h*w]


def local_policy_loss(position_logprobs: torch.Tensor, local: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """The spatial part of one SDE step's loss: -> scalar

        -mean_{b,p} clip(lambda L_bp, +-adv_clip_max) exp(logp_bp - sg(logp_bp))

    Its value is -mean(lambda L) and its gradient -mean lambda L_bp grad logp_bp: with the image term
    (`flow_grpo_step_loss`, ratio 1) that is the policy gradient of per-position advantages
    A_b + lambda L_bp. It is taken at the current weights, unclipped (an on-policy REINFORCE term:
    Flow-GRPO's ratio clip of 1e-4 binds the image term only); with several optimizer steps per
    update its later steps are slightly off-policy. `local` [B, h*w] is lambda L (0 off-signal)."""
    ratio = (position_logprobs - position_logprobs.detach()).exp()  # [B, P], 1 with the gradient of logp
    return -(local.clamp(-adv_clip_max, adv_clip_max) * ratio).mean()


# ---------------------------------------------------------------------------------------------
# The EMA of the trained weights (Flow-GRPO's `train.ema`, `flow_grpo/ema.py` `EMAModuleWrapper`)


def ema_decay(steps: int, max_decay: float) -> float:
    """d_n = min((1 + n) / (10 + n), max_decay) after n optimizer steps: a short memory at first
    (Flow-GRPO's `get_current_decay`)."""
    return min((1 + steps) / (10 + steps), max_decay)


class WeightsEMA:
    """An exponential moving average of named weights, kept in float32:

        after optimizer step n (n = 1, 2, ...), if (n + 1) % update_interval == 0:
            ema <- ema + (1 - d_n) (w - ema),    d_n = `ema_decay(n, decay)`

    starting from the weights it is built with. Flow-GRPO (decay 0.9, every 8 steps) samples with
    the trained weights, and evaluates and saves the EMA. Deliberate differences from its code:
    - float32, not the parameters' dtype: in bf16 a (1 - d) share of a small update mostly rounds away.
    - one update per optimizer step. Flow-GRPO calls `ema.step` after every training micro-batch
      with its optimizer-step counter, so at an update step its EMA moves gradient_accumulation_steps
      times toward the same weights: an effective decay d^gas (0.9^8 = 0.43 at its GenEval settings).
    """

    def __init__(self, weights: dict[str, torch.Tensor], decay: float, update_interval: int):
        self.decay, self.update_interval = decay, update_interval
        self.weights = {name: t.detach().to(torch.float32, copy=True) for name, t in weights.items()}
        self.dtypes = {name: t.dtype for name, t in weights.items()}
        """Each weight's own dtype: `cast` returns the EMA in it (what an export or a publish holds)."""
        self.steps = 0
        """Optimizer steps counted (n)."""

    def tick(self) -> bool:
        """Count one optimizer step; True when the EMA takes the weights now (`update`)."""
        self.steps += 1
        return (self.steps + 1) % self.update_interval == 0

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        """ema <- ema + (1 - d_n) (w - ema) for every name, n the steps counted so far."""
        weight = 1.0 - ema_decay(self.steps, self.decay)
        for name, ema in self.weights.items():
            ema.lerp_(weights[name].to(ema.device, torch.float32), weight)

    def cast(self) -> dict[str, torch.Tensor]:
        """The EMA in each weight's own dtype (new tensors)."""
        return {name: ema.to(self.dtypes[name], copy=True) for name, ema in self.weights.items()}

    def state_dict(self) -> dict:
        return {"steps": self.steps, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict` (a checkpoint's); its names and shapes must be this EMA's."""
        saved = state["weights"]
        shapes = {name: tuple(t.shape) for name, t in self.weights.items()}
        if {name: tuple(t.shape) for name, t in saved.items()} != shapes:
            raise ValueError("the checkpoint's EMA holds other weights than this learner trains")
        self.weights = {name: saved[name].to(self.weights[name].device, torch.float32, copy=True) for name in shapes}
        self.steps = int(state["steps"])
