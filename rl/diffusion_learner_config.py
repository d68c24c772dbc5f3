"""Configuration of the diffusion learner (Flow-GRPO on SANA's transformer; rl/diffusion_learner.py).

The DeepSpeed fields have the AR learner's names and meanings (rl/learner_config.py), so the same
helpers build the DeepSpeed config and the lr schedule from either; defaults follow Flow-GRPO
(yifan123/flow_grpo `config/base.py`, `config/grpo.py`) where it has one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policy.sana_lora import TransformerLoRAConfig
from rl.learner_config import WeightSyncConfig, deepspeed_config
from rollout.diffusion_rollout import SdeSampling


class FlowGRPOConfig(BaseModel):
    """The per-step objective (rl/flow_grpo.py for the formulas)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    clip_range: float = Field(1e-4, gt=0)
    """Ratio clipped to [1 - eps, 1 + eps] (Flow-GRPO: 1e-4)."""
    adv_clip_max: float = Field(5.0, gt=0)
    """Advantages clamped to [-max, max] (Flow-GRPO: 5)."""
    beta: float = Field(0.004, ge=0)
    """KL coefficient to the frozen decoder; 0 loads no reference copy. Our KL is the exact one between
    the two Gaussian steps, Flow-GRPO's is ours times -dt (rl/flow_grpo.py): its beta 0.04 (GenEval,
    OCR) at 10 steps (-dt = 0.1) is 0.004 here."""
    ppo_anchor: Literal["learner", "sampler"] = "learner"
    """logp_old of the ratio. learner: the learner's own log-probs at the start of the update (the
    first ratio is exactly 1; recomputed once when the update has several optimizer steps);
    sampler: the decoder's recorded log-probs (Flow-GRPO; equal to the learner's within 1e-5 at the
    same weights, tested)."""
    max_staleness: int = Field(0, ge=0)
    """How many versions older than the learner's the sampling transformer may be (0: on-policy)."""
    scale_by_std: bool = True
    """Group advantages (r - mean) / (std + eps) (Flow-GRPO's per-prompt stat tracker); False: r - mean."""
    advantage_eps: float = Field(1e-4, gt=0)
    """eps of the advantage's denominator (Flow-GRPO: 1e-4; its std is the biased one, ours the
    unbiased one as for the AR policy: rl/grpo.py)."""
    filter_zero_signal_groups: bool = False
    """Leave groups whose rewards are all equal out of the update (their advantages are 0 anyway)."""


class DiffusionLearnerConfig(BaseModel):
    """The DeepSpeed learner of SANA's transformer: one Ray actor per rank."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str
    """Model directory or hub id (blip3o-rl layout); its connector (frozen) and SANA transformer load."""
    world_size: int = Field(1, ge=1)
    """DeepSpeed ranks (one Ray actor each)."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 on CPU, bf16 on GPU (Flow-GRPO trains in bf16 autocast)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Device of each rank."""
    dist_backend: Literal["gloo", "nccl"] = "gloo"
    """torch.distributed backend of the ranks."""
    micro_batch_size: int = Field(4, ge=1)
    """Images per forward/backward on one rank (each image then runs one guided forward per SDE step)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per rank per optimizer step: one step sees world * gas * micro images, every SDE step."""
    epochs: int = Field(1, ge=1)
    """Passes over each rollout batch (Flow-GRPO: num_inner_epochs 1)."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip (Flow-GRPO: max_grad_norm 1.0)."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate (Flow-GRPO: 3e-4, with LoRA)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Shape after warmup (rl/learner.py::lr_lambda)."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from 0."""
    total_steps: int = Field(1000, ge=1)
    """Optimizer steps of the schedule (linear and cosine decay)."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay (Flow-GRPO: 1e-4)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    seed: int = 0
    """Seed of the mini-batch shuffling."""
    num_cpus_per_rank: float = Field(1.0, gt=0)
    """Ray CPUs reserved per rank."""
    num_gpus_per_rank: float = Field(0.0, ge=0)
    """Ray GPUs reserved per rank."""
    torch_threads: int | None = None
    """torch intra-op threads per rank (None = leave Ray's default)."""
    initial_version: int = Field(0, ge=0)
    """Transformer weight version of the loaded weights (a resumed run passes its last version)."""
    sampling: SdeSampling = SdeSampling()
    """How the decoder samples the rollouts this learner trains on (it checks every batch)."""
    flow: FlowGRPOConfig = FlowGRPOConfig()
    """The loss."""
    sync: WeightSyncConfig = WeightSyncConfig()
    """How transformer weights reach the decoder workers."""
    lora: TransformerLoRAConfig | None = None
    """Train a LoRA adapter on the transformer (Flow-GRPO's way) instead of every weight: only the
    adapter is optimised, published and checkpointed, and the KL reference is the transformer with
    the adapter off (no frozen copy). Decoders need the same config as `transformer_lora`. None:
    full fine-tuning."""

    @model_validator(mode="after")
    def _consistent(self) -> "DiffusionLearnerConfig":
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("bf16 needs ZeRO stage >= 1 (DeepSpeed keeps fp32 master weights there)")
        if self.device == "cpu" and self.dist_backend == "nccl":
            raise ValueError("dist_backend 'nccl' needs device 'cuda'; use 'gloo' on CPU")
        return self


def diffusion_deepspeed_config(config: DiffusionLearnerConfig) -> dict:
    """The AR learner's DeepSpeed config with one backward per (micro-batch, SDE step): every SDE
    step's loss is backpropagated on its own (one step's activations at a time, as Flow-GRPO's
    accumulation over timesteps), so DeepSpeed accumulates gas * S backwards per optimizer step."""
    ds = deepspeed_config(config)  # reads only the DeepSpeed fields shared with LearnerConfig
    accumulation = config.gradient_accumulation_steps * len(config.sampling.sde_steps())
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = config.micro_batch_size * accumulation * config.world_size
    return ds
