"""Configuration of the diffusion learner (Flow-GRPO on SANA's transformer; rl/learners/diffusion_learner.py).

The DeepSpeed fields are the AR learner's (rl/learners/ar_config.py `DeepSpeedRanksConfig`, with its
checks), so the same helpers build the DeepSpeed config and the lr schedule from either; defaults follow Flow-GRPO
(yifan123/flow_grpo `config/base.py`, `config/grpo.py`) where it has one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from policy.sana_lora import TransformerLoRAConfig
from rl.learners.ar_config import DeepSpeedRanksConfig, deepspeed_config
from rl.objectives.grpo import SpatialCreditConfig
from rollout.diffusion_rollout import SdeSampling


class FlowGRPOConfig(BaseModel):
    """The per-step objective (rl/objectives/flow_grpo.py for the formulas)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    clip_range: float = Field(1e-4, gt=0)
    """Ratio clipped to [1 - eps, 1 + eps] (Flow-GRPO: 1e-4)."""
    adv_clip_max: float = Field(5.0, gt=0)
    """Advantages clamped to [-max, max] (Flow-GRPO: 5)."""
    beta: float = Field(0.04, ge=0)
    """KL coefficient to the frozen decoder, in Flow-GRPO's units (each step's exact Gaussian KL
    weighted by its -dt: rl/objectives/flow_grpo.py `flow_grpo_kl`); 0 loads no reference copy.
    Flow-GRPO: 0.04 for GenEval and OCR, 0.01 for PickScore."""
    ppo_anchor: Literal["learner", "sampler"] = "learner"
    """logp_old of the ratio. learner: the learner's own log-probs at the start of the update (the
    first ratio is exactly 1; recomputed once when the update has several optimizer steps);
    sampler: the decoder's recorded log-probs (Flow-GRPO; equal to the learner's within 1e-5 at the
    same weights, tested)."""
    max_staleness: int = Field(0, ge=0)
    """How many versions older than the learner's the sampling transformer may be (0: on-policy)."""
    scale_by_std: bool = True
    """Advantages (r - mean_group) / (std + eps) (Flow-GRPO's per-prompt stat tracker); False: r - mean_group."""
    std_scope: Literal["group", "batch"] = "batch"
    """The std of the advantages (rl/objectives/grpo.py `group_advantages`): batch = the biased std of
    every reward of the step (Flow-GRPO's `sample.global_std`, set in all its configs); group = each
    group's unbiased std (as the AR policy's, BLIP3o-NEXT)."""
    advantage_eps: float = Field(1e-4, gt=0)
    """eps of the advantage's denominator (Flow-GRPO: 1e-4)."""
    filter_zero_signal_groups: bool = False
    """Leave groups whose rewards are all equal out of the update (their advantages are 0 anyway)."""
    spatial: SpatialCreditConfig | None = None
    """Per-position advantages from the reward's regions on SANA's latent grid (spatial credit,
    rl/objectives/flow_grpo.py `local_policy_loss`; its `grid` is ignored: the latents' own); None = off."""


class EMAConfig(BaseModel):
    """An EMA of the trained weights (rl/objectives/flow_grpo.py `WeightsEMA`): the rollouts still sample
    the trained weights; exports (checkpoints' `diffusion_policy/`) hold the EMA, and `serve(ema=True)`
    puts it on the decoders for an evaluation. Flow-GRPO's `train.ema` (on in its GRPO configs)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    decay: float = Field(0.9, gt=0, lt=1)
    """Largest decay d; early updates use min((1 + n) / (10 + n), d) after n optimizer steps (Flow-GRPO: 0.9)."""
    update_interval: int = Field(8, ge=1)
    """The EMA takes the weights after optimizer step n when (n + 1) % interval == 0 (Flow-GRPO: 8)."""


class DiffusionLearnerConfig(DeepSpeedRanksConfig):
    """The DeepSpeed learner of SANA's transformer: one Ray actor per rank (the placement, batch,
    optimizer and sync fields are the AR learner's, rl/learners/ar_config.py `DeepSpeedRanksConfig`)."""

    model: str
    """Model directory or hub id (blip3o-rl layout); its connector (frozen) and SANA transformer load."""
    micro_batch_size: int = Field(4, ge=1)
    """Images per forward/backward on one rank (each image then runs one guided forward per SDE
    step); one optimizer step sees world * gas * micro images, every SDE step."""
    gradient_checkpointing: bool = False
    """Recompute each SANA block's activations in the backward instead of keeping them (diffusers'
    gradient checkpointing): a row keeps each block's input only (rl/sana_memory.py; SANA1.5 at 1024 px,
    bf16, LoRA: 0.31 GiB a row instead of 4.4; CFG makes two rows an image), for about a third more compute."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate (Flow-GRPO: 3e-4, with LoRA; its grad clip 1.0 and 1 inner epoch are the defaults)."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay (Flow-GRPO: 1e-4)."""
    sampling: SdeSampling = SdeSampling()
    """How the decoder samples the rollouts this learner trains on (it checks every batch)."""
    flow: FlowGRPOConfig = FlowGRPOConfig()
    """The loss."""
    lora: TransformerLoRAConfig | None = None
    """Train a LoRA adapter on the transformer (Flow-GRPO's way) instead of every weight: only the
    adapter is optimised, published and checkpointed, and the KL reference is the transformer with
    the adapter off (no frozen copy). Decoders need the same config as `transformer_lora`. None:
    full fine-tuning."""
    ema: EMAConfig | None = None
    """Keep an EMA of the trained weights (the adapter under LoRA), float32, on every rank and in
    checkpoints; None: no EMA (exports hold the trained weights)."""


def diffusion_deepspeed_config(config: DiffusionLearnerConfig) -> dict:
    """The AR learner's DeepSpeed config with one backward per (micro-batch, SDE step): every SDE
    step's loss is backpropagated on its own (one step's activations at a time, as Flow-GRPO's
    accumulation over timesteps), so DeepSpeed accumulates gas * S backwards per optimizer step."""
    ds = deepspeed_config(config)
    accumulation = config.gradient_accumulation_steps * len(config.sampling.sde_steps())
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = config.micro_batch_size * accumulation * config.world_size
    return ds
