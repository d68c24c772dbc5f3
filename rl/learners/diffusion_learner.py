"""One DeepSpeed rank of the diffusion learner: Flow-GRPO on SANA's transformer.

    train_step(rollout, advantages[, regions]) on every rank:
        [spatial credit (`flow.spatial`): local advantages of the reward regions on the latent grid,
         a per-position term beside Flow-GRPO's (rl/objectives/flow_grpo.py `local_policy_loss`)]
        plan: kept images -> shuffled optimizer steps of world * gas * micro images, padded so every
              rank runs the same number of forwards (rl/learners/ar_learner.py's plan_epoch: ZeRO-3 gathers
              parameters collectively in each forward)
        [logp_old [S, R] of every image before any update: ppo_anchor 'learner' with several
         optimizer steps]
        per micro-batch, per SDE step t (S of them):
              guided velocity at x_t (the trained transformer; the reference without grad when
              beta > 0: the frozen copy, or under LoRA the same transformer with its adapter off)
              -> Gaussian step -> log p(x_{t+1} | x_t) (and the KL term flow_grpo_kl)
              -> flow_grpo_step_loss -> backward;
              engine.step() (DeepSpeed accumulates gas * S backwards into one optimizer step)
        [after each optimizer step: the EMA of the trained weights (`ema`) counts it, and takes
         the weights every update_interval steps]
    publish_weights() on every rank: ZeRO-3 gathers the weights collectively; rank 0 sends the
        transformer (or under LoRA its adapter) with rl/weight_sync.py's sender to every decoder's
        transformer stream (rollout/decoder_weights.py: validated and versioned like the AR weights)
    serve(ema) on every rank: the next version, holding the EMA (an evaluation) or the trained weights

The EMA (rl/objectives/flow_grpo.py `WeightsEMA`, config `ema`) is used as Flow-GRPO uses it: the
rollouts sample the trained weights (`publish_weights`); exports (`export_policy`, a checkpoint's
`diffusion_policy/`) and `weights_digest` are the EMA's; `serve(ema=True)` puts it on the decoders
for an evaluation and `serve(ema=False)` the trained weights back. Every rank holds it whole in
float32 (the adapter under LoRA: megabytes; full fine-tuning: 4 bytes a parameter) and saves it in
its checkpoint's client state, so a resume and a guard rollback restore it with the weights.

The rank is the AR learner's `LearnerRank` with another model, batch and loss: joining the group,
checkpoints (save/load/probe), gathering and publishing weights are inherited unchanged, and so is
its LoRA (`lora`, policy/sana_lora.py): `_add_adapter` wraps the transformer with peft, only the
adapter trains, is published (PEFT names) and checkpointed (with its optimizer state), and the KL
reference is `_adapter_off`. `export_policy` then writes the adapter directory, as the AR learner's
does; policy/sana_lora.py `export_merged_transformer` folds it into the base transformer.

Where this differs from Flow-GRPO (yifan123/flow_grpo `scripts/train_sd3.py`), on purpose:
- full fine-tuning of the transformer by default, with a frozen copy as the KL reference; `lora`
  is Flow-GRPO's way (the reference is the same model with the adapter off), on SANA's attention
  projections (policy/sana_lora.py), initialised as peft's default (A Kaiming-uniform, B = 0;
  Flow-GRPO: A Gaussian, B = 0): version 0 is the base model either way.
- every SDE step of the rollout is trained (Flow-GRPO: the first int(0.99 T) steps).
- `ppo_anchor: learner` by default: logp_old is the learner's own at the start of the update, so
  the first ratio is exactly 1; `sampler` is Flow-GRPO's (the decoder's recorded log-probs).
- the loss normalised over the whole optimizer step on all ranks: the mean over its images and SDE
  steps (Flow-GRPO: per process).
- the EMA in float32 and updated once per optimizer step (rl/objectives/flow_grpo.py `WeightsEMA`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from policy.loading import load_connector, torch_dtype
from policy.model_dir import CheckpointNotFoundError, resolve_model_dir
from rl.learners.ar_config import reference_deepspeed_config
from rl.learners.ar_learner import (
    LearnerRank,
    MicroBatch,
    OptimizerStep,
    _skip_jit_ops,
    epoch_seed,
    lr_lambda,
    plan_epoch,
)
from rl.learners.diffusion_config import (
    DiffusionLearnerConfig,
    diffusion_deepspeed_config,
)
from rl.learners.group import LearnerGroup, _get_all
from rl.objectives.flow_grpo import (
    WeightsEMA,
    flow_grpo_kl,
    flow_grpo_step_loss,
    local_policy_loss,
    position_log_probs,
)
from rl.objectives.grpo import GroupAdvantages, spatial_credit
from rl.objectives.regions import ComponentRegions
from rl.weight_sync import SyncReport, TensorSource, WeightSyncConfig
from rollout.decoder_weights import TransformerWeightsHandle
from rollout.diffusion_rollout import DiffusionRollout
from rollout.flow_sde import SdeStep, sde_step, step_log_prob
from rollout.sana_decoder import guided_velocity, null_and_cond_captions

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
"""The weights file of a diffusers model directory (what `from_pretrained` reads)."""


@dataclass
class DiffusionLearnerMetrics:
    """One `train_step` over a batch of SDE rollouts, combined over ranks."""

    policy_version: int
    """Transformer version after this step (unchanged if nothing was trained)."""
    sampler_version: int
    """Transformer version the rollouts were sampled with."""
    optimizer_steps: int
    rows: int
    """Images that took part."""
    zero_signal_share: float
    losses: list[float] = field(default_factory=list)
    """Loss of each optimizer step (mean over its images and SDE steps)."""
    grad_norms: list[float] = field(default_factory=list)
    loss: float = 0.0
    policy_loss: float = 0.0
    kl: float = 0.0
    """Mean per-step KL term to the frozen decoder (Flow-GRPO's, rl/objectives/flow_grpo.py `flow_grpo_kl`;
    before beta); NaN without a reference (beta 0)."""
    clip_fraction: float = 0.0
    ratio_mean: float = 0.0
    ratio_min: float = 0.0
    ratio_max: float = 0.0
    logprob_max_abs_diff: float = 0.0
    """max |learner - sampler| per-step log-prob at the weights the rollouts were sampled with (the
    sampler/learner agreement; measured before the first update of the step)."""
    grad_norm: float = 0.0
    lr: float = 0.0
    step_s: float = 0.0
    spatial_share: float = float("nan")
    """Spatial credit: share of the kept images' latent positions with a local signal; NaN when off."""
    spatial_std: float = float("nan")
    """Spatial credit: std of the local advantages over those positions (before lambda); NaN when off."""


@dataclass
class _Tally:
    """Statistics of one train_step on one rank: sums weighted by image-steps (all-reduced), maxima."""

    image_steps: float = 0.0
    loss: float = 0.0
    policy_loss: float = 0.0
    kl: float = 0.0
    clipped: float = 0.0
    ratio: float = 0.0
    SUMMED = ("image_steps", "loss", "policy_loss", "kl", "clipped", "ratio")
    ratio_max: float = -math.inf
    neg_ratio_min: float = -math.inf
    logprob_diff: float = -math.inf
    """max |learner - sampler| log-prob among forwards run at the sampling weights."""
    MAXED = ("ratio_max", "neg_ratio_min", "logprob_diff")

    def add(self, stats, images: float, ratio: torch.Tensor) -> None:
        self.image_steps += images
        self.loss += stats.loss * images
        self.policy_loss += stats.policy_loss * images
        self.kl += stats.kl * images
        self.clipped += stats.clip_fraction * images
        self.ratio += stats.ratio_mean * images
        self.ratio_max = max(self.ratio_max, float(ratio.max()))
        self.neg_ratio_min = max(self.neg_ratio_min, -float(ratio.min()))


class DiffusionLearnerRank(LearnerRank):
    """One DeepSpeed rank: SANA's transformer (trained, or frozen under a trained LoRA adapter), its
    frozen copy (beta > 0, full fine-tuning only), the frozen connector; rank 0 also sends the
    transformer weights (or the adapter) to the decoders."""

    config: DiffusionLearnerConfig

    def setup(self, rank: int, master_addr: str, master_port: int) -> None:
        """Join the DeepSpeed group (all ranks concurrently) and build the models."""
        config = self.config
        self.rank, self.world = rank, config.world_size
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        import deepspeed
        from diffusers import SanaTransformer2DModel

        _skip_jit_ops()
        deepspeed.init_distributed(dist_backend=config.dist_backend, auto_mpi_discovery=False, verbose=False)
        paths = resolve_model_dir(config.model)
        if not paths.sana_transformer.is_dir():
            raise CheckpointNotFoundError(f"model directory {paths.root} has no SANA transformer (sana/transformer)")
        on_gpu = config.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        dtype_name = "bfloat16" if config.precision == "bf16" else "float32"
        self.dtype = torch_dtype(dtype_name)

        def transformer():
            return SanaTransformer2DModel.from_pretrained(paths.sana_transformer, torch_dtype=self.dtype).to(self.device)

        # frozen, as in BLIP3o-NEXT: the connector maps the AR states into SANA's caption space
        self.connector = load_connector(paths, dtype_name, str(self.device)).eval().requires_grad_(False)
        # beta = 0: no reference. Under LoRA the reference is the policy with its adapter off (no copy).
        self.has_reference = config.flow.beta > 0
        self.reference = None
        if self.has_reference and config.lora is None:  # the frozen copy, sharded like the policy under ZeRO-3
            self.reference = deepspeed.initialize(model=transformer().eval().requires_grad_(False),
                                                  config=reference_deepspeed_config(config))[0]
        model = transformer().train()
        if config.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.timestep_scale = model.config.timestep_scale
        self.peft_model = None
        if config.lora is not None:  # the same transformer module, its targeted Linears now LoRA layers
            model = self._add_adapter(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]  # all of them, or the adapter only
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=config.adam_betas,
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=diffusion_deepspeed_config(config))
        self.backwards_per_step = config.gradient_accumulation_steps * len(config.sampling.sde_steps())
        self.version = config.initial_version
        self.sender = None
        self.paths = paths  # the adapter's base model, as exports name it
        self.ema = None
        if config.ema is not None:  # of what a publish sends: every weight, or the adapter
            with self._gathered(published_only=True):
                self.ema = WeightsEMA(self._named_weights(), config.ema.decay, config.ema.update_interval)

    def set_hyperparameters(self, lr_scale: float, beta: float) -> None:
        """The AR learner's (its beta is GRPO's KL coefficient, with an AR reference model): not this
        learner's. A guard rollback scales this one's lr with `set_lr_scale` and keeps `flow.beta`."""
        raise NotImplementedError("the diffusion learner takes set_lr_scale; its KL coefficient is flow.beta")

    # ----- one SDE step, as the decoder samples it ----------------------------------------------

    @torch.no_grad()
    def _captions(self, part: DiffusionRollout) -> torch.Tensor:
        """[2b, N+1, d] null + real captions (the frozen connector, as the decoder computes them)."""
        return null_and_cond_captions(self.connector, part.hidden_states.to(self.device), self.dtype)

    def _transition(self, model, part: DiffusionRollout, captions: torch.Tensor, step: int) -> SdeStep:
        """The Gaussian step x_step -> x_{step+1} under `model` (an engine), scoring the recorded x_{step+1}."""
        x = part.latent(step).to(self.device)  # [b, C, h, w]
        t = part.timesteps[step].to(self.device)
        velocity = guided_velocity(model, self.timestep_scale, x, t, captions, part.guidance_scale, self.dtype)
        sigmas = part.sigmas
        return sde_step(velocity, x, sigmas[step], sigmas[step + 1], sigmas[1], part.noise_level,
                        next_latents=part.latent(step + 1).to(self.device))

    @torch.no_grad()
    def _reference_transition(self, part: DiffusionRollout, captions: torch.Tensor, step: int) -> SdeStep:
        """`_transition` under the KL reference: the frozen copy, or the policy with its adapter off."""
        if self.reference is not None:
            return self._transition(self.reference, part, captions, step)
        with self._adapter_off():
            return self._transition(self.engine, part, captions, step)

    @torch.no_grad()
    def _logprobs(self, part: DiffusionRollout, reference: bool = False) -> torch.Tensor:
        """[S, b] per-step log-probs of `part` under the current weights or the reference (no grad)."""
        captions = self._captions(part)
        if reference:
            steps = [self._reference_transition(part, captions, t) for t in part.train_steps]
        else:
            steps = [self._transition(self.engine, part, captions, t) for t in part.train_steps]
        return torch.stack([step_log_prob(step) for step in steps])

    def recompute_log_probs(self, rollout: DiffusionRollout, reference: bool = False) -> torch.Tensor:
        """[S, B] log-probs of every image's SDE steps under the current weights (or the KL
        reference), in micro-batches (every rank runs all of them: the same forwards everywhere
        under ZeRO-3)."""
        if reference and not self.has_reference:
            raise ValueError("no KL reference (flow.beta is 0)")
        micro = self.config.micro_batch_size
        parts = [self._logprobs(rollout.select(list(range(first, min(first + micro, len(rollout))))), reference)
                 for first in range(0, len(rollout), micro)]
        return torch.cat(parts, dim=1).cpu()  # [S, B]

    @torch.no_grad()
    def _logprob_table(self, rollout: DiffusionRollout, plan: list[OptimizerStep]) -> torch.Tensor:
        """logp_old [S, R] of every row before this update: each rank scores its share of the first
        epoch's plan (the same number of forwards everywhere), then the ranks exchange them."""
        rows = [r for step in plan for mb in step.micro_batches for r in mb.rows]
        mine = torch.cat([self._logprobs(rollout.select(mb.rows)) for step in plan for mb in step.micro_batches],
                         dim=1)  # [S, n]
        all_rows = [torch.empty(len(rows), dtype=torch.long, device=self.device) for _ in range(self.world)]
        all_lp = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(all_rows, torch.tensor(rows, device=self.device))
        torch.distributed.all_gather(all_lp, mine)
        table = torch.zeros(rollout.log_probs.shape, dtype=mine.dtype, device=self.device)  # [S, R]
        table[:, torch.cat(all_rows)] = torch.cat(all_lp, dim=1)
        return table

    # ----- training -----------------------------------------------------------------------------

    def _check(self, rollout: DiffusionRollout, advantages: GroupAdvantages) -> None:
        config = self.config
        if advantages.advantages.numel() != len(rollout):
            raise ValueError(f"{advantages.advantages.numel()} advantages for {len(rollout)} images")
        if rollout.train_steps != config.sampling.sde_steps() or len(rollout.sigmas) != config.sampling.steps + 1 \
                or rollout.noise_level != config.sampling.noise_level:
            raise ValueError(f"rollouts sampled with SDE steps {rollout.train_steps} of {len(rollout.sigmas) - 1} at "
                             f"noise level {rollout.noise_level}; this learner is configured for {config.sampling}")
        lag = self.version - rollout.decoder_version
        if not 0 <= lag <= config.flow.max_staleness:
            raise ValueError(f"rollouts sampled by transformer v{rollout.decoder_version}, the learner is at "
                             f"v{self.version} (max_staleness {config.flow.max_staleness})")

    def _micro_step(self, rollout: DiffusionRollout, advantages: GroupAdvantages, mb: MicroBatch, step_rows: int,
                    proximal: torch.Tensor | None, at_sampling_weights: bool, tally: _Tally) -> float:
        """Backward of every SDE step of one micro-batch; returns its share of the step's loss.
        `at_sampling_weights`: no update happened yet and the learner is at the rollouts' version,
        so |logp - sampler| measures the sampler/learner agreement."""
        flow = self.config.flow
        mb = mb.without_padding()
        part = rollout.select(mb.rows)
        captions = self._captions(part)  # [2b, N+1, d]
        adv = advantages.advantages[mb.rows].to(self.device)  # [b]
        local = advantages.local[mb.rows].to(self.device) if advantages.local is not None else None  # [b, h*w]
        real = float(sum(mb.weights))  # b, or 0 for a padding-only micro-batch
        share = real / (step_rows * len(part.train_steps))  # of the optimizer step's mean over images x steps
        loss_share = 0.0
        for s, t in enumerate(part.train_steps):
            transition = self._transition(self.engine, part, captions, t)
            logp = step_log_prob(transition)  # [b]
            kl = None
            if self.has_reference:
                reference = self._reference_transition(part, captions, t)  # no grad
                dt = part.sigmas[t + 1] - part.sigmas[t]  # this step's own length weighs its KL
                kl = flow_grpo_kl(transition.mean, reference.mean, transition.scale, dt)  # [b]
            sampler = part.log_probs[s].to(self.device)  # [b]
            if flow.ppo_anchor == "sampler":
                old = sampler
            else:
                old = logp.detach() if proximal is None else proximal[s, mb.rows]  # [b]
            loss, stats = flow_grpo_step_loss(logp, old, adv, flow.clip_range, flow.adv_clip_max, flow.beta, kl)
            if local is not None:  # spatial credit: each latent position's own advantage
                positions = position_log_probs(transition.next_latents, transition.mean, transition.scale)  # [b, h*w]
                loss = loss + local_policy_loss(positions, local, flow.adv_clip_max)
            # DeepSpeed divides by its accumulation count and averages over ranks; the loss is already
            # this micro-step's exact share of the optimizer step's mean, so undo both.
            self.engine.backward(loss * share * self.backwards_per_step * self.world)
            self.engine.step()  # the optimizer runs at the accumulation boundary only
            loss_share += float(loss) * share
            if real > 0:
                with torch.no_grad():
                    tally.add(stats, real, (logp - old).clamp(-20.0, 20.0).exp())
                    if at_sampling_weights:
                        tally.logprob_diff = max(tally.logprob_diff, float((logp - sampler).abs().max()))
        return loss_share

    def train_step(self, rollout: DiffusionRollout, advantages: GroupAdvantages,
                   regions: list[ComponentRegions] | None = None) -> DiffusionLearnerMetrics:
        """Flow-GRPO updates on one batch of SDE rollouts; the transformer version goes up by one.
        `regions`: the step's reward regions (spatial credit on the latent grid, `flow.spatial`)."""
        start = time.perf_counter()
        config = self.config
        self._check(rollout, advantages)
        grid = tuple(rollout.latents.shape[-2:])  # (h, w) latent positions
        advantages = spatial_credit(advantages, regions or [], rollout.group_index, grid, config.flow.spatial,
                                    config.flow)
        kept = advantages.kept_rows()
        if not kept:
            return DiffusionLearnerMetrics(self.version, rollout.decoder_version, 0, 0, advantages.zero_signal_share,
                                           **advantages.spatial_summary())
        self.engine.train()
        plans = [plan_epoch(kept, self.world, self.rank, config.micro_batch_size, config.gradient_accumulation_steps,
                            epoch_seed(config, self.version, epoch)) for epoch in range(config.epochs)]
        n_steps = sum(len(plan) for plan in plans)
        on_policy = rollout.decoder_version == self.version
        tally, losses, grad_norms = _Tally(), [], []
        proximal = None
        if config.flow.ppo_anchor == "learner" and n_steps > 1:
            proximal = self._logprob_table(rollout, plans[0])  # [S, R], before any update
            if on_policy:
                rows = torch.tensor(kept, device=self.device)
                tally.logprob_diff = float((proximal[:, rows].cpu() - rollout.log_probs[:, kept]).abs().max())
        first = True  # the first optimizer step's forwards all run before its update
        for plan in plans:
            for step in plan:
                losses.append(sum(self._micro_step(rollout, advantages, mb, step.rows, proximal, first and on_policy,
                                                   tally) for mb in step.micro_batches))
                norm = self.engine.get_global_grad_norm()
                grad_norms.append(float("nan") if norm is None else float(norm))
                self._update_ema()
                first = False
        self.version += 1
        return self._metrics(rollout, advantages, kept, n_steps, tally, losses, grad_norms, start)

    def _metrics(self, rollout: DiffusionRollout, advantages: GroupAdvantages, kept: list[int], n_steps: int,
                 tally: _Tally, losses: list[float], grad_norms: list[float], start: float) -> DiffusionLearnerMetrics:
        """Combine over ranks: sums of the weighted statistics and the losses, maxima of the extremes."""
        dist = torch.distributed
        summed = torch.tensor([getattr(tally, n) for n in _Tally.SUMMED] + losses, dtype=torch.float64,
                              device=self.device)
        maxed = torch.tensor([getattr(tally, n) for n in _Tally.MAXED], dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        total = dict(zip(_Tally.SUMMED, summed.tolist()))
        losses = summed[len(_Tally.SUMMED):].tolist()
        per = max(total["image_steps"], 1.0)
        ratio_max, neg_ratio_min, diff = maxed.tolist()
        return DiffusionLearnerMetrics(
            policy_version=self.version, sampler_version=rollout.decoder_version, optimizer_steps=n_steps,
            rows=len(kept), zero_signal_share=advantages.zero_signal_share, losses=losses, grad_norms=grad_norms,
            loss=float(np.mean(losses)), policy_loss=total["policy_loss"] / per,
            kl=total["kl"] / per if self.has_reference else float("nan"),
            clip_fraction=total["clipped"] / per, ratio_mean=total["ratio"] / per,
            ratio_max=ratio_max, ratio_min=-neg_ratio_min,
            logprob_max_abs_diff=diff if math.isfinite(diff) else float("nan"),
            grad_norm=float(np.mean(grad_norms)), lr=float(self.engine.get_lr()[0]),
            step_s=time.perf_counter() - start, **advantages.spatial_summary(),
        )

    # ----- weights ------------------------------------------------------------------------------

    def _base_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The transformer's parameters by diffusers name (what the decoders' full contract expects;
        under LoRA the frozen base, without the adapter). The inherited `_named_weights` publishes
        these, or under LoRA the adapter in PEFT's names."""
        named = self.engine.module.named_parameters()
        if self.peft_model is None:
            return dict(named)
        return {name.replace(".base_layer.", "."): p for name, p in named if ".lora_" not in name}

    def _exported_weights(self) -> dict[str, torch.Tensor]:
        """The EMA in the weights' dtypes when the learner keeps one (Flow-GRPO saves the EMA), else
        what a publish sends; `export_policy` writes these and `weights_digest` hashes them."""
        return self.ema.cast() if self.ema is not None else self._named_weights()

    def export_policy(self, directory: str) -> None:
        """The transformer (its EMA with `ema`) as a diffusers directory (a model directory's
        sana/transformer), or under LoRA the adapter in PEFT's format, naming the model directory as
        its base (as the AR learner's export; policy/sana_lora.py `export_merged_transformer` merges it)."""
        from safetensors.torch import save_file

        with self._gathered(published_only=True):
            if self.rank != 0:
                return
            weights = {name: t.to("cpu", copy=True) for name, t in self._exported_weights().items()}
            if self.peft_model is None:  # diffusers' layout: its config and one safetensors file
                self.engine.module.save_config(directory)
                save_file(weights, str(Path(directory) / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
                return
            from policy.lora import write_adapter

            write_adapter(Path(directory), self.config.lora, weights, base_model=str(self.paths.root))

    def serve(self, ema: bool) -> SyncReport | None:
        """Advance the version by one and publish under it the EMA (`ema`: what Flow-GRPO evaluates)
        or the trained weights (back to training); rank 0's report. Decoders take only newer
        versions, so both directions take a new one: the driver's decoder version follows the
        report's, and no rollout is trained between the two (it would be sampled by the EMA)."""
        if ema and self.ema is None:
            raise ValueError("the diffusion learner keeps no EMA (diffusion_learner.ema is not set)")
        self.version += 1
        if not ema:
            return self.publish_weights()
        return self._send(TensorSource(self.ema.cast())) if self.rank == 0 else None

    def _update_ema(self) -> None:
        """After an optimizer step: the EMA counts it and, when due, takes the weights (every rank;
        a gather under ZeRO-3)."""
        if self.ema is not None and self.ema.tick():
            with self._gathered(published_only=True):
                self.ema.update(self._named_weights())

    def _client_state(self) -> dict:
        """The version and the EMA (its weights and step count): a resume and a rollback restore it."""
        state = super()._client_state()
        return state if self.ema is None else {**state, "ema": self.ema.state_dict()}

    def _restore_client_state(self, client_state: dict) -> None:
        if self.ema is None:
            return
        if "ema" in client_state:
            self.ema.load_state_dict(client_state["ema"])
            return
        print("diffusion learner: the checkpoint holds no EMA (saved without `ema`): it starts at the restored "
              "weights", flush=True)
        with self._gathered(published_only=True):
            self.ema = WeightsEMA(self._named_weights(), self.config.ema.decay, self.config.ema.update_interval)


class DiffusionLearnerGroup(LearnerGroup):
    """The diffusion learner as one object; `connect_workers` takes decoder actors and publishes
    to their transformer stream. Checkpoints: give it a directory of its own (its DeepSpeed tag is
    the AR learner's)."""

    def __init__(self, config: DiffusionLearnerConfig, timeout_s: float = 1800.0,
                 resources: dict[str, float] | None = None):
        super().__init__(config, timeout_s, resources, rank_class=DiffusionLearnerRank)

    def train_step(self, rollout, advantages: GroupAdvantages,
                   regions: list[ComponentRegions] | None = None) -> DiffusionLearnerMetrics:
        """`rollout`: a `DiffusionRollout`, or the ObjectRef of one (a run's step: it stays in the
        object store, read by every rank, never copied through the driver)."""
        import ray

        if not isinstance(rollout, ray.ObjectRef):
            return super().train_step(rollout, advantages, regions)
        refs = ray.put(advantages), ray.put(regions)
        return _get_all([r.train_step.remote(rollout, *refs) for r in self.ranks], self.timeout_s,
                        "train_step")[0]

    def connect_workers(self, decoders: list, sync: WeightSyncConfig | None = None) -> None:
        """Publish the transformer to these decoder actors (DiffusionDecoderActor handles) from now on."""
        super().connect_workers([TransformerWeightsHandle(decoder) for decoder in decoders], sync)

    def serve(self, ema: bool) -> SyncReport:
        """The next version on every decoder: the EMA (`ema`, for an evaluation) or the trained weights."""
        return _get_all([r.serve.remote(ema) for r in self.ranks], self.timeout_s, "serve")[0]

    def recompute_log_probs(self, rollout: DiffusionRollout, reference: bool = False) -> torch.Tensor:
        """[S, B] per-step log-probs of `rollout` under the learner's current weights (or its KL reference)."""
        import ray

        ref = ray.put(rollout)
        return _get_all([r.recompute_log_probs.remote(ref, reference) for r in self.ranks], self.timeout_s,
                        "recompute_log_probs")[0]
