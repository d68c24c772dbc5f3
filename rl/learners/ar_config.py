"""Configuration of the AR policy's DeepSpeed learner (typed, unknown keys rejected); the GRPO loss
and the weight sync it composes are configured beside their code (`rl/objectives/grpo.py`,
`rl/weight_sync.py`).

Derived values (the DeepSpeed config dict, the optimizer-step layout) are computed by functions
from these models, never written back into them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policy.lora import LoRAConfig
from rl.objectives.grpo import GRPOConfig
from rl.weight_sync import WeightSyncConfig


class DeepSpeedRanksConfig(BaseModel):
    """What every DeepSpeed learner shares (one Ray actor per rank): placement, precision, the batch
    layout, the optimizer and its schedule, the weight sync. `LearnerConfig` (the AR policy) and
    `DiffusionLearnerConfig` (SANA's transformer, rl/learners/diffusion_config.py) add their model,
    loss and defaults; `deepspeed_config` and `lr_lambda` read only these fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str
    """Model directory or hub id (blip3o-rl layout)."""
    world_size: int = Field(1, ge=1)
    """DeepSpeed ranks (one Ray actor each)."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage (BLIP3o-NEXT trains with ZeRO-1)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32 on CPU (bf16 is ~18x slower without bf16 instructions), bf16 on GPU."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Device of each rank."""
    dist_backend: Literal["gloo", "nccl"] = "gloo"
    """torch.distributed backend of the DeepSpeed ranks."""
    micro_batch_size: int = Field(4, ge=1)
    """Rows per forward/backward on one rank."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per rank per optimizer step: one step sees world * gas * micro rows."""
    epochs: int = Field(1, ge=1)
    """Passes over each rollout batch."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this value."""
    lr: float = Field(1e-6, gt=0)
    """Peak learning rate."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Shape after warmup: constant, linear decay to 0 or cosine decay to 0 at `total_steps`."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup from 0."""
    total_steps: int = Field(1000, ge=1)
    """Optimizer steps of the schedule (used by linear and cosine decay)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    seed: int = 0
    """Seed of the mini-batch shuffling."""
    num_cpus_per_rank: float = Field(1.0, gt=0)
    """Ray CPUs reserved per rank."""
    num_gpus_per_rank: float = Field(0.0, ge=0)
    """Ray GPUs reserved per rank (1 on GPU machines)."""
    torch_threads: int | None = None
    """torch intra-op threads per rank (None = leave Ray's default)."""
    initial_version: int = Field(0, ge=0)
    """Weight version of the loaded weights (a resumed run passes its last version)."""
    sync: WeightSyncConfig = WeightSyncConfig()
    """How the weights reach the workers."""

    @model_validator(mode="after")
    def _devices_consistent(self) -> "DeepSpeedRanksConfig":
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("bf16 needs ZeRO stage >= 1 (DeepSpeed keeps fp32 master weights there)")
        if self.device == "cpu" and self.dist_backend == "nccl":
            raise ValueError("dist_backend 'nccl' needs device 'cuda'; use 'gloo' on CPU")
        return self


class LearnerConfig(DeepSpeedRanksConfig):
    """The DeepSpeed learner of the AR policy (GRPO on the image tokens): one Ray actor per rank."""

    model: str
    """Model directory or hub id (blip3o-rl layout); only its AR part is loaded."""
    world_size: int = Field(2, ge=1)
    """DeepSpeed ranks (one Ray actor each)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (transformers' gradient checkpointing): less memory per row, about a third more compute."""
    lr: float = Field(1e-6, gt=0)
    """Peak learning rate (BLIP3o-NEXT: 1e-6 with a cosine schedule)."""
    grpo: GRPOConfig = GRPOConfig()
    """The loss."""
    lora: LoRAConfig | None = None
    """Train a LoRA adapter on the AR model instead of all its weights (None = full fine-tuning).
    Only the adapter is optimised, published and checkpointed; the KL reference is the same model
    with the adapter switched off (no second copy)."""

    @model_validator(mode="after")
    def _consistent(self) -> "LearnerConfig":
        if self.grpo.ppo_anchor == "sampler" and self.grpo.tis_cap is not None:
            raise ValueError("grpo.tis_cap corrects between the sampler and the learner's anchor: with "
                             "ppo_anchor 'sampler' there is nothing to correct; set tis_cap: null")
        return self


def deepspeed_config(config: DeepSpeedRanksConfig) -> dict:
    """The DeepSpeed config dict for `config` (the optimizer and scheduler are ours, passed as objects)."""
    ds = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.micro_batch_size * config.gradient_accumulation_steps * config.world_size,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        # torch's AdamW: DeepSpeed's own Adam ops JIT-compile C++ for minutes on a fresh machine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def reference_deepspeed_config(config: DeepSpeedRanksConfig) -> dict:
    """The frozen reference model's engine: no optimizer; ZeRO-3 shards it when the policy is
    sharded (stages below 3 keep a plain copy per rank: nothing to shard without stage 3)."""
    ds = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "zero_optimization": {"stage": 3 if config.zero_stage == 3 else 0},
        "steps_per_print": 10**9,
    }
    if config.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds
