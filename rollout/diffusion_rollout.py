"""What the decoder hands the diffusion learner: per image, enough to recompute every trained SDE
step's log-prob exactly (Flow-GRPO on the SANA decoder: the diffusion learner trains on these).

The learner scores step t of image b as log p(x_{t+1} | x_t) under its own transformer
(rollout/flow_sde.py). That needs x_t and x_{t+1} at every trained t, the condition, the timestep
and sigmas, the noise level and the guidance scale. We send the recorded latents rather than the
seeds: regenerating x_t from (seed + r, t) means replaying the whole trajectory with the sampling
weights (T guided forwards per image, the cost of sampling again), while the recorded latents cost
one guided forward per trained step, which the loss needs anyway. The condition travels as the AR
hidden states [N+1, h] (the learner runs the frozen connector itself: h = 2048 < its 2304 outputs,
and the null caption connector(0) needs no bytes at all).

Bytes per image (float32 latents, hidden states in the decoder's dtype), T = 10 SDE steps, so
K = 11 latents:

    tiny (make-tiny --preset sana: N = 16, h = 128, latent 4 x 8 x 8):
        hidden 17 x 128 x 4 B = 8,704  +  latents 11 x 256 x 4 B = 11,264  +  log-probs 40  ~ 20 kB
    real (BLIP3o-NEXT: N = 729, h = 2048, SANA1.5 latent 32 x 32 x 32):
        hidden 730 x 2048 x 4 B = 5.98 MB (2.99 MB in bf16)  +  latents 11 x 32,768 x 4 B = 1.44 MB
        ~ 7.4 MB per image in float32 (4.4 MB with bf16 states): ~ 0.95 GB for a 128-image step.
        A 2-step SDE window (MixGRPO) keeps 3 latents (0.39 MB); the hidden states then dominate.

`DiffusionRollout.bytes_per_image()` gives the exact figure of a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rollout.flow_sde import SdeTrajectory


class SdeSampling(BaseModel):
    """How the decoder samples for training (Flow-GRPO `config/grpo.py`: 10 steps, noise level 0.7)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    steps: int = Field(10, ge=1)
    """Flow-matching steps of a training sample (Flow-GRPO trains with 10, evaluates with 40)."""
    noise_level: float = Field(0.7, gt=0)
    """SDE noise level a (0 would be the ODE, which has no log-prob to train)."""
    sde_window: tuple[int, int] | None = None
    """(first step, number of steps) sampled with the SDE and trained; the others are ODE steps
    (MixGRPO). None: every step (Flow-GRPO samples every step with the SDE and trains the first
    int(0.99 T) of them, `timestep_fraction`; we train every SDE step)."""

    @model_validator(mode="after")
    def _window_inside(self) -> "SdeSampling":
        if self.sde_window is not None:
            first, count = self.sde_window
            if first < 0 or count < 1 or first + count > self.steps:
                raise ValueError(f"sde_window {self.sde_window} must lie inside the {self.steps} steps")
        return self

    def sde_steps(self) -> list[int]:
        """Indices of the SDE (trained) steps."""
        if self.sde_window is None:
            return list(range(self.steps))
        first, count = self.sde_window
        return list(range(first, first + count))


@dataclass
class DiffusionRollout:
    """SDE samples of a batch of images, row for row with the rollout batch they decode."""

    hidden_states: torch.Tensor
    """[B, N+1, h] AR last-layer states at <S0> + the image tokens (SANA's condition)."""
    latents: torch.Tensor
    """[K, B, C, h, w] float32: trajectory latents x_k for k in `latent_steps` (x_0 is noise)."""
    latent_steps: list[int]
    """The K trajectory indices held: every trained step t and t + 1."""
    log_probs: torch.Tensor
    """[S, B] float32: the sampler's log p(x_{t+1} | x_t) at each step of `train_steps`."""
    train_steps: list[int]
    """The S SDE steps t (sorted); the learner trains exactly these."""
    timesteps: torch.Tensor
    """[T] float32: the transformer's timestep at each step (sigma * 1000)."""
    sigmas: list[float]
    """T + 1 sigmas, 1 .. 0."""
    noise_level: float
    guidance_scale: float
    group_index: list[int]
    """Prompt of each row (group-relative advantages)."""
    seed: int
    """Base seed: row r's initial noise and step noises come from seed + r."""
    policy_version: int
    """AR weight version whose hidden states conditioned the images."""
    decoder_version: int
    """SANA transformer weight version that sampled them (0 = the weights on disk)."""
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[1]

    @classmethod
    def from_trajectory(cls, trajectory: SdeTrajectory, hidden_states: torch.Tensor, timesteps: torch.Tensor,
                        guidance_scale: float, group_index: list[int], seed: int, policy_version: int,
                        decoder_version: int) -> "DiffusionRollout":
        """Keep only what the learner reads: the latents around the SDE steps and their log-probs."""
        train_steps = sorted(trajectory.sde_steps)
        latent_steps = sorted({t for t in train_steps} | {t + 1 for t in train_steps})
        return cls(
            hidden_states=hidden_states.detach().cpu(),
            latents=trajectory.latents[latent_steps].contiguous(),  # [K, B, C, h, w]
            latent_steps=latent_steps,
            log_probs=trajectory.log_probs[train_steps].contiguous(),  # [S, B]
            train_steps=train_steps, timesteps=timesteps.detach().float().cpu(), sigmas=list(trajectory.sigmas),
            noise_level=trajectory.noise_level, guidance_scale=guidance_scale, group_index=list(group_index),
            seed=seed, policy_version=policy_version, decoder_version=decoder_version,
        )

    def latent(self, step: int) -> torch.Tensor:
        """x_step for every row: -> [B, C, h, w]."""
        return self.latents[self.latent_steps.index(step)]

    def select(self, rows: list[int]) -> "DiffusionRollout":
        """The rollout restricted to `rows` (a learner micro-batch)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        return replace(self, hidden_states=self.hidden_states[index], latents=self.latents[:, index],
                       log_probs=self.log_probs[:, index], group_index=[self.group_index[r] for r in rows])

    @classmethod
    def concat(cls, parts: list["DiffusionRollout"]) -> "DiffusionRollout":
        """Rows of several micro-batches or chunks sampled alike (same steps, versions and sampler)."""
        first = parts[0]
        for part in parts[1:]:
            same = (part.train_steps == first.train_steps and part.sigmas == first.sigmas
                    and part.noise_level == first.noise_level and part.guidance_scale == first.guidance_scale
                    and part.policy_version == first.policy_version and part.decoder_version == first.decoder_version)
            if not same:
                raise ValueError("cannot concatenate rollouts sampled with different steps, sampler or versions")
        timings: dict[str, float] = {}
        for part in parts:
            for name, seconds in part.timings.items():
                timings[name] = timings.get(name, 0.0) + seconds
        return replace(first, hidden_states=torch.cat([p.hidden_states for p in parts]),
                       latents=torch.cat([p.latents for p in parts], dim=1),
                       log_probs=torch.cat([p.log_probs for p in parts], dim=1),
                       group_index=[g for p in parts for g in p.group_index], timings=timings)

    def bytes_per_image(self) -> int:
        """Tensor payload of one image (hidden states + latents + log-probs)."""
        tensors = (self.hidden_states, self.latents, self.log_probs)
        return sum(t.numel() * t.element_size() for t in tensors) // max(len(self), 1)
