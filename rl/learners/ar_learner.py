"""One DeepSpeed rank of the GRPO learner (a Ray actor; `LearnerGroup` starts one per rank).

    train_step(batch, advantages[, regions]) on every rank:
        [spatial credit (`grpo.spatial`): each token's advantage A_b + lambda L_bt from the reward
         regions projected on the token grid (rl/objectives/grpo.py `spatial_credit`)]
        plan: kept rows -> per epoch, shuffled optimizer steps of world * gas * micro rows,
              padded with zero-weight rows so every rank runs the same number of micro-batches
              (ZeRO-3 gathers parameters collectively in every forward: ranks must stay in step);
              a micro-batch then runs its real rows only (one zero-weight row if it has none)
        [logp_old of every row before any update, when there are several optimizer steps]
        [reference log-probs of every row (untruncated), when beta > 0]
        per micro-batch: forward (image-token rows of the head only, policy/logprobs.py
              ImageTokenLogits) -> masked log-probs -> GRPOLoss -> backward; engine.step()
    publish_weights(version) on every rank: rank 0's weight sender (rl/weight_sync.py) reads the
        weights a bucket (`sync.bucket_mb`) at a time; under ZeRO-3 every rank gathers each bucket's
        parameters with it (a collective), so no rank ever holds the whole gathered model.

With `lora` set (policy/lora.py) the causal LM is wrapped with a peft LoRA adapter: only the adapter
is optimised, published (PEFT names, kilobytes to megabytes) and checkpointed, and the KL reference is
the same module with the adapter switched off (peft's `disable_adapter`), so no reference copy is
loaded. The wrapped LM keeps its HF module tree (peft swaps the targeted Linears in place), so
`ImageTokenLogits` and gradient checkpointing work on it unchanged; an adapter on `lm_head` is added
by `AdaptedHeadImageLogits` (ImageTokenLogits reads the head's weight directly, which would skip it).

Each rank sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT itself (otherwise
DeepSpeed falls back to MPI discovery). LOCAL_RANK is 0: Ray gives every GPU actor its own
CUDA_VISIBLE_DEVICES, so each rank's device is its local device 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from policy.loading import load_ar_model, load_tokenizer, load_vocab
from policy.logprobs import (
    ImageTokenLogits,
    Truncation,
    codebook_entropy,
    codebook_token_logprobs,
)
from policy.lora import AdaptedHeadImageLogits, LoRAConfig
from policy.model_dir import resolve_model_dir
from policy.weights import ParamSpec
from rl.learners.ar_config import (
    DeepSpeedRanksConfig,
    LearnerConfig,
    deepspeed_config,
    reference_deepspeed_config,
)
from rl.objectives.grpo import (
    GroupAdvantages,
    GRPOLoss,
    LossInputs,
    LossStats,
    spatial_credit,
)
from rl.objectives.regions import ComponentRegions, Grid, token_grid
from rl.weight_sync import (
    SyncReport,
    TensorSource,
    WeightSyncConfig,
    make_manifest,
    make_sender,
)
from rollout.records import RolloutBatch


@dataclass(frozen=True)
class MicroBatch:
    rows: list[int]
    """Batch rows of this micro-batch on this rank."""
    weights: list[float]
    """1 for a real row, 0 for padding."""

    def without_padding(self) -> "MicroBatch":
        """The real rows only; one zero-weight row when there is none. Every rank still runs the
        same number of forwards and backwards (ZeRO's collectives), but padding costs at most
        one row of compute instead of a whole micro-batch share."""
        real = [(row, weight) for row, weight in zip(self.rows, self.weights) if weight > 0]
        if not real:
            return MicroBatch(self.rows[:1], [0.0])
        return MicroBatch([row for row, _ in real], [weight for _, weight in real])


@dataclass(frozen=True)
class OptimizerStep:
    micro_batches: list[MicroBatch]
    """This rank's micro-batches (exactly gradient_accumulation_steps of them)."""
    rows: int
    """Real rows in this step over all ranks (the aggregation denominator counts these)."""


def plan_epoch(kept: list[int], world: int, rank: int, micro: int, gas: int, seed: int) -> list[OptimizerStep]:
    """Shuffle the kept rows and split them evenly into optimizer steps of at most world*gas*micro.

    Each step is padded to exactly world*gas*micro rows with zero-weight copies; real rows are
    dealt round-robin so every rank gets its share. Pure: every rank computes the same plan.
    """
    per_step = world * gas * micro
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [kept[i] for i in order]
    steps = []
    for chunk in np.array_split(np.asarray(shuffled, dtype=np.int64), math.ceil(len(kept) / per_step)):
        rows = chunk.tolist() + [int(chunk[0])] * (per_step - len(chunk))
        weights = [1.0] * len(chunk) + [0.0] * (per_step - len(chunk))
        mine, mine_w = rows[rank::world], weights[rank::world]  # micro * gas each
        micro_batches = [MicroBatch(mine[i : i + micro], mine_w[i : i + micro]) for i in range(0, micro * gas, micro)]
        steps.append(OptimizerStep(micro_batches, len(chunk)))
    return steps


def _image_head(causal_lm, vocab, lora: LoRAConfig | None = None) -> ImageTokenLogits:
    """The model as image-token logits (with the head's adapter added when `lora` adapts the head).
    ZeRO-3 gathers a parameter for the forward of the module that owns it; the head's weight (the
    embedding, when tied) and its adapter are read in the wrapper's forward, so they are registered
    there as external parameters (a no-op below stage 3)."""
    import deepspeed

    module = (AdaptedHeadImageLogits if lora is not None and lora.adapts_head else ImageTokenLogits)(causal_lm, vocab)
    for param in causal_lm.lm_head.parameters():  # the weight, and under LoRA on the head its A and B
        deepspeed.zero.register_external_parameter(module, param)
    return module


def epoch_seed(config: DeepSpeedRanksConfig, version: int, epoch: int) -> int:
    """Shuffling seed of one epoch: differs per update and epoch, identical on every rank."""
    return config.seed * 1_000_003 + version * 1_009 + epoch


@dataclass
class LearnerMetrics:
    """One `train_step`: all optimizer steps over the rollout batch, combined over ranks."""

    policy_version: int
    """Weight version after this step (unchanged if nothing was trained)."""
    sampler_version: int
    """Version the rollouts were sampled with (policy_version - 1 - sampler_version = staleness)."""
    optimizer_steps: int
    rows: int
    """Rows that took part (zero-signal groups dropped)."""
    zero_signal_share: float
    """Share of groups whose rewards were all equal."""
    losses: list[float] = field(default_factory=list)
    """Loss of each optimizer step (before that step's update)."""
    grad_norms: list[float] = field(default_factory=list)
    """Global gradient norm (before clipping) of each optimizer step; NaN at ZeRO stage 0."""
    loss: float = 0.0
    pg_loss: float = 0.0
    kl_loss: float = 0.0
    kl: float = 0.0
    """Mean per-token KL to the reference; NaN when there is none (beta 0)."""
    clip_low_frac: float = 0.0
    clip_high_frac: float = 0.0
    dual_clip_frac: float = 0.0
    entropy: float = 0.0
    ratio_mean: float = 0.0
    ratio_min: float = 0.0
    ratio_max: float = 0.0
    is_weight_mean: float = 0.0
    is_truncated_frac: float = 0.0
    logprob_max_abs_diff: float = float("nan")
    """max |learner - sampler| log-prob of the batch's image tokens at the weights that sampled them (the
    first optimizer step's forwards); NaN when the rollouts are older than the learner (async)."""
    grad_norm: float = 0.0
    lr: float = 0.0
    step_s: float = 0.0
    spatial_share: float = float("nan")
    """Spatial credit: share of the kept rows' tokens with a local signal; NaN when it is off."""
    spatial_std: float = float("nan")
    """Spatial credit: std of the local advantages L_bt over those tokens (before lambda); NaN when off."""


CHECKPOINT_TAG = "learner"
"""DeepSpeed checkpoint tag (the run's checkpoint folder already names the step)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _skip_jit_ops() -> None:
    """Mark every DeepSpeed C++ op unavailable so nothing JIT-compiles (the shm comm op alone takes
    ~3 min per fresh machine); we use torch's AdamW and plain torch.distributed collectives."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = defaultdict(bool)


class LearnerRank:
    """One DeepSpeed rank: the trained AR policy, the frozen reference, the loss; rank 0 also sends weights."""

    def __init__(self, config: LearnerConfig):
        self.config = config
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)

    def master_endpoint(self) -> tuple[str, int]:
        """Address and a free port on this node (asked of rank 0 before `setup`)."""
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, rank: int, master_addr: str, master_port: int) -> None:
        """Join the DeepSpeed group (all ranks call this concurrently) and build model and loss."""
        config = self.config
        self.rank, self.world = rank, config.world_size
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        import deepspeed

        _skip_jit_ops()
        deepspeed.init_distributed(dist_backend=config.dist_backend, auto_mpi_discovery=False, verbose=False)

        paths = resolve_model_dir(config.model)
        tokenizer = load_tokenizer(paths)
        self.vocab = load_vocab(paths, tokenizer)
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id
        on_gpu = config.device == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        dtype = "bfloat16" if config.precision == "bf16" else "float32"
        # beta = 0: no reference model at all. The reference is the AR part only, never SANA. With
        # LoRA it is the policy itself with the adapter switched off (`_adapter_off`): no second copy.
        self.has_reference = config.grpo.beta > 0
        self.reference = None
        if self.has_reference and config.lora is None:
            self.reference = self._reference_engine(paths)
        # Loaded in the training dtype at once (no fp32 copy of a bf16 model on the way).
        model = load_ar_model(paths, dtype, str(self.device)).train()
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.peft_model = None
        if config.lora is not None:
            model = self._add_adapter(model, config)
        policy = _image_head(model, self.vocab, config.lora)  # only the image rows of the head, at image positions
        trainable = [p for p in policy.parameters() if p.requires_grad]  # all of them, or the adapter only
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=config.adam_betas,
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        # ZeRO-3 partitions the already-loaded module here (no zero.Init needed for from_pretrained).
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(config))
        self.loss_fn = GRPOLoss(config.grpo, self.vocab.tokens_per_image)
        self.grid = self._token_grid(paths)
        self.version = config.initial_version
        self.sender = None
        self.sync = config.sync
        self.paths = paths

    def _token_grid(self, paths) -> Grid | None:
        """Where the image tokens sit on the image (spatial credit only): the configured grid, else the
        model's (its decoder kind and tokens per image)."""
        spatial = self.config.grpo.spatial
        if spatial is None:
            return None
        grid = spatial.grid or token_grid(paths.layout().decoder, self.vocab.tokens_per_image)
        if grid[0] * grid[1] != self.vocab.tokens_per_image:
            raise ValueError(f"spatial credit grid {grid} does not hold the {self.vocab.tokens_per_image} image tokens")
        return grid

    def _reference_engine(self, paths):
        """The frozen KL reference: the model directory's AR weights, as image-token logits."""
        import deepspeed

        dtype = "bfloat16" if self.config.precision == "bf16" else "float32"
        reference = _image_head(load_ar_model(paths, dtype, str(self.device)).requires_grad_(False), self.vocab)
        # Under ZeRO-3 the frozen reference is sharded across the ranks like the policy (an
        # engine without optimizer); below it, each rank holds a copy (its parameters only).
        return deepspeed.initialize(model=reference, config=reference_deepspeed_config(self.config))[0]

    def set_hyperparameters(self, lr_scale: float, beta: float) -> None:
        """Train from now on with peak lr = config lr x `lr_scale` (the schedule's shape and position
        kept) and KL coefficient `beta`: the guard's rollback (rl/guard/rules.py). Absolute, not cumulative:
        the driver derives both from its rollback count after every checkpoint load, so a resumed run
        trains with the same values. Raising beta from 0 loads the frozen reference (every rank calls
        this: a collective under ZeRO-3)."""
        self.set_lr_scale(lr_scale)
        if beta > 0 and not self.has_reference and self.peft_model is None:
            self.reference = self._reference_engine(self.paths)
        if beta == 0:
            self.reference = None
        self.has_reference = beta > 0
        self.config = self.config.model_copy(update={"grpo": self.config.grpo.model_copy(update={"beta": beta})})
        self.loss_fn = GRPOLoss(self.config.grpo, self.vocab.tokens_per_image)

    def set_lr_scale(self, lr_scale: float) -> None:
        """Peak lr = config lr x `lr_scale` from now on, the schedule's shape and position kept."""
        scheduler = self.engine.lr_scheduler  # LambdaLR: lr = base_lr x lambda(step)
        scheduler.base_lrs = [self.config.lr * lr_scale for _ in scheduler.base_lrs]
        for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)

    def _add_adapter(self, model, config: LearnerConfig):
        """Wrap `model` with a LoRA adapter (peft freezes every base weight) and return the same causal
        LM, its targeted Linears now LoRA layers (ImageTokenLogits keeps calling `lm.model` and
        `lm.lm_head`). The adapter starts as peft initialises it (B = 0: version 0 is the base model),
        from a seeded generator so every rank, and every run, starts from the same A."""
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.peft_model = get_peft_model(model, config.lora.peft_config())
        return self.peft_model.base_model.model

    def _adapter_off(self):
        """Context in which the policy is the base model (the KL reference under LoRA)."""
        import contextlib

        return self.peft_model.disable_adapter() if self.peft_model is not None else contextlib.nullcontext()

    # ----- training ---------------------------------------------------------------------------

    def _image_logits(self, reference: bool, batch: RolloutBatch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-token logits [b, N, K] of the policy or the reference (each through its engine), and the codes."""
        tokens = batch.image_tokens[rows]  # [b, N]
        prompts = [batch.prompt_ids[r] for r in rows]
        if reference and self.reference is None:  # LoRA: the policy engine with its adapter switched off
            with self._adapter_off():
                logits = self.engine.module.image_logits(prompts, tokens, self.pad_id, call=self.engine)  # [b, N, K]
        else:
            engine = self.reference if reference else self.engine
            logits = engine.module.image_logits(prompts, tokens, self.pad_id, call=engine)  # [b, N, K]
        return logits, self.vocab.to_codebook(tokens).to(self.device)  # [b, N, K], [b, N]

    def _logprobs(self, reference: bool, batch: RolloutBatch, rows: list[int], truncation: Truncation) -> torch.Tensor:
        logits, codes = self._image_logits(reference, batch, rows)
        return codebook_token_logprobs(logits, codes, self.config.grpo.temperature, truncation)  # [b, N]

    @torch.no_grad()
    def _logprob_table(self, reference: bool, batch: RolloutBatch, plan: list[OptimizerStep],
                       truncation: Truncation) -> torch.Tensor:
        """Log-probs of every batch row [R, N] under the current policy (logp_old before this
        update) or the reference.

        Every rank runs its share of the first epoch's plan (the same number of forwards
        everywhere: a ZeRO-3 engine gathers parameters collectively in each forward, so a rank
        that skipped one would leave the others waiting), then the ranks exchange their rows.
        """
        rows = [r for step in plan for mb in step.micro_batches for r in mb.rows]
        mine = torch.cat([self._logprobs(reference, batch, mb.rows, truncation)
                          for step in plan for mb in step.micro_batches])
        all_rows = [torch.empty(len(rows), dtype=torch.long, device=self.device) for _ in range(self.world)]
        all_lp = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(all_rows, torch.tensor(rows, device=self.device))
        torch.distributed.all_gather(all_lp, mine)
        table = torch.zeros(batch.logprobs.shape, dtype=mine.dtype, device=self.device)  # [R, N]
        table[torch.cat(all_rows)] = torch.cat(all_lp)
        return table

    def logprobs(self, batch: RolloutBatch, reference: bool = False) -> torch.Tensor:
        """Log-probs [R, N] of every row of `batch` under the current policy (at the batch's
        truncation, as the loss scores them) or the KL reference (untruncated, as the KL scores
        them); every rank must call this. For checks of sampler-learner agreement."""
        if reference and not self.has_reference:
            raise ValueError("no KL reference (grpo.beta is 0)")
        plan = plan_epoch(list(range(len(batch))), self.world, self.rank, self.config.micro_batch_size, 1, seed=0)
        truncation = Truncation.off() if reference else batch.truncation
        return self._logprob_table(reference, batch, plan, truncation).cpu()  # [R, N]

    def _micro_step(self, batch, advantages, mb: MicroBatch, denominator: float, proximal,
                    reference) -> tuple[LossStats, float]:
        """One forward/backward; returns its loss pieces and max |learner - sampler| log-prob."""
        mb = mb.without_padding()
        logits, codes = self._image_logits(False, batch, mb.rows)  # [b, N, K], [b, N]
        temperature, truncation = self.config.grpo.temperature, batch.truncation
        logprobs = codebook_token_logprobs(logits, codes, temperature, truncation)  # [b, N]
        entropy = codebook_entropy(logits, codes, temperature, truncation)  # [b, N], no grad
        kl_logprobs = None  # the KL is taken on the untruncated distributions (see policy/logprobs.py)
        if self.has_reference and truncation.active:
            kl_logprobs = codebook_token_logprobs(logits, codes, temperature)  # [b, N]
        ref = reference[mb.rows] if reference is not None else None  # [b, N]
        sampler = batch.logprobs[mb.rows].to(self.device)  # [b, N]
        if self.config.grpo.ppo_anchor == "sampler":
            old = sampler  # the rollout worker's log-probs are logp_old
        elif proximal is None:
            old = logprobs.detach()  # a single optimizer step: this forward IS the proximal policy
        else:
            old = proximal[mb.rows]  # [b, N]
        out = self.loss_fn(LossInputs(
            logprobs=logprobs, old_logprobs=old, sampler_logprobs=sampler,
            advantages=advantages.token_advantages(mb.rows).to(self.device),  # [b] or [b, N]
            row_weight=torch.tensor(mb.weights, device=self.device),
            denominator=denominator, ref_logprobs=ref, kl_logprobs=kl_logprobs, entropy=entropy,
        ))
        # DeepSpeed divides by gas and averages over ranks; our loss is already the exact share of
        # the step's loss (denominator over all ranks and micro-batches), so undo both.
        self.engine.backward(out.loss * self.config.gradient_accumulation_steps * self.world)
        self.engine.step()  # applies the optimizer only at the gradient-accumulation boundary
        return out.stats, float((logprobs.detach() - sampler).abs().max())

    def train_step(self, batch: RolloutBatch, advantages: GroupAdvantages,
                   regions: list[ComponentRegions] | None = None) -> LearnerMetrics:
        """Several epochs of mini-batch updates on one rollout batch; the version goes up by one.
        `regions`: the step's reward regions (spatial credit, `grpo.spatial`; ignored when it is off)."""
        start = time.perf_counter()
        config, n_tokens = self.config, self.vocab.tokens_per_image
        if advantages.advantages.numel() != len(batch) or batch.image_tokens.shape[1] != n_tokens:
            raise ValueError(f"batch of {len(batch)} rows x {batch.image_tokens.shape[1]} tokens does not match "
                             f"{advantages.advantages.numel()} advantages x {n_tokens} tokens per image")
        advantages = spatial_credit(advantages, regions or [], batch.group_index, self.grid, config.grpo.spatial,
                                    config.grpo)
        if batch.temperature != config.grpo.temperature:
            raise ValueError(f"rollouts were sampled at temperature {batch.temperature}, the learner scores at "
                             f"{config.grpo.temperature}: log-probs would not match")
        kept = advantages.kept_rows()
        metrics = LearnerMetrics(self.version, batch.policy_version, 0, len(kept), advantages.zero_signal_share,
                                 **advantages.spatial_summary())
        if not kept:
            return metrics
        self.engine.train()
        plans = [plan_epoch(kept, self.world, self.rank, config.micro_batch_size, config.gradient_accumulation_steps,
                            epoch_seed(config, self.version, epoch)) for epoch in range(config.epochs)]
        n_steps = sum(len(plan) for plan in plans)
        recompute = config.grpo.ppo_anchor == "learner" and n_steps > 1
        proximal = self._logprob_table(False, batch, plans[0], batch.truncation) if recompute else None
        # the KL's reference log-probs, untruncated (see policy/logprobs.py), once per row
        reference = self._logprob_table(True, batch, plans[0], Truncation.off()) if self.has_reference else None
        total, losses, grad_norms = LossStats(), [], []
        gap = torch.tensor(float("-inf"), dtype=torch.float64, device=self.device)
        for plan in plans:
            for step in plan:
                denominator = self.loss_fn.aggregation.denominator(step.rows, step.rows * n_tokens)
                step_stats = LossStats()
                for mb in step.micro_batches:
                    stats, mb_gap = self._micro_step(batch, advantages, mb, denominator, proximal, reference)
                    step_stats = step_stats + stats
                    if step is plans[0][0]:  # the weights are updated only at its end: the sampler's still
                        gap = torch.maximum(gap, torch.tensor(mb_gap, dtype=torch.float64, device=self.device))
                norm = self.engine.get_global_grad_norm()
                grad_norms.append(float("nan") if norm is None else float(norm))
                losses.append(step_stats.loss)
                total = total + step_stats
        total, losses = self._reduce(total, losses)
        torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
        on_policy = batch.policy_version == self.version  # else the learner is ahead of the sampler (async)
        self.version += 1
        summary = total.summary()
        summary.update(loss=sum(losses) / n_steps, pg_loss=total.pg_loss / n_steps, kl_loss=total.kl_loss / n_steps)
        if not self.has_reference:
            summary["kl"] = float("nan")  # beta 0: no reference, so no KL was measured (a gap, not a 0)
        return LearnerMetrics(
            policy_version=self.version, sampler_version=batch.policy_version, optimizer_steps=n_steps,
            rows=len(kept), zero_signal_share=advantages.zero_signal_share, losses=losses, grad_norms=grad_norms,
            grad_norm=float(np.mean(grad_norms)), lr=float(self.engine.get_lr()[0]),
            step_s=time.perf_counter() - start, logprob_max_abs_diff=float(gap) if on_policy else float("nan"),
            **summary, **advantages.spatial_summary(),
        )

    def _reduce(self, stats: LossStats, losses: list[float]) -> tuple[LossStats, list[float]]:
        """Sum the loss pieces and token counts over ranks; max/min for the ratio extremes."""
        dist = torch.distributed
        sums = torch.tensor([getattr(stats, name) for name in LossStats.SUMMED] + losses, dtype=torch.float64,
                            device=self.device)
        extremes = torch.tensor([stats.ratio_max, -stats.ratio_min], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        n = len(LossStats.SUMMED)
        out = LossStats(**dict(zip(LossStats.SUMMED, sums[:n].tolist())))
        out.ratio_max, out.ratio_min = float(extremes[0]), -float(extremes[1])
        return out, sums[n:].tolist()

    # ----- weights ----------------------------------------------------------------------------

    def _gathered(self, published_only: bool = False):
        """Context in which every parameter (or, with `published_only` under LoRA, every adapter
        parameter) is whole on every rank (a collective under ZeRO-3)."""
        import contextlib

        import deepspeed

        if self.config.zero_stage == 3:
            params = list(self.engine.module.parameters())
            if published_only and self.peft_model is not None:
                params = [p for p in params if p.requires_grad]  # the adapter: kilobytes, not the model
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def _named_weights(self) -> dict[str, torch.Tensor]:
        """What a publish sends: the full AR weights (HF names), or under LoRA the adapter only
        (PEFT's saved names, policy/lora.py)."""
        if self.peft_model is not None:
            from peft import get_peft_model_state_dict

            adapter = get_peft_model_state_dict(self.peft_model, save_embedding_layers=False)
            return {name: t.detach() for name, t in adapter.items()}
        return self._base_weights()

    def _base_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The AR model's own parameters in HF names (under LoRA: the frozen base, without the adapter)."""
        # remove_duplicate=False keeps tied aliases (e.g. lm_head.weight) as in the HF state_dict.
        lm = self.engine.module.lm  # HF names: the parameters of the wrapped causal LM
        named = lm.named_parameters(remove_duplicate=False)
        if self.peft_model is None:
            return dict(named)
        return {name.replace(".base_layer.", "."): p for name, p in named if ".lora_" not in name}

    def _base_weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self._base_parameters().items()}

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """What a publish sends (full AR weights, or the LoRA adapter) as CPU copies on rank 0 (None
        elsewhere); every rank must call this."""
        with self._gathered(published_only=True):
            if self.rank != 0:
                return None
            return {name: t.to("cpu", copy=True) for name, t in self._named_weights().items()}

    def gather_base_weights(self) -> dict[str, torch.Tensor] | None:
        """The AR model's weights without any adapter (HF names) as CPU copies on rank 0; under full
        fine-tuning the same as `gather_weights`. Every rank must call this."""
        with self._gathered():
            if self.rank != 0:
                return None
            return {name: t.to("cpu", copy=True) for name, t in self._base_weights().items()}

    def connect_workers(self, workers: list, sync: WeightSyncConfig | None = None) -> None:
        """Rank 0: build the weight sender for these workers (the broadcast group forms here);
        `sync` overrides the configured transport (benchmarks compare them on one learner). Every
        rank keeps the sync settings: its buckets are the sender's."""
        self.sync = sync or self.config.sync
        if self.rank == 0:
            if self.sender is not None:
                self.sender.close()
            self.sender = make_sender(self.sync, workers)

    def publish_weights(self) -> SyncReport | None:
        """Send the current version to every worker (rank 0's sender); rank 0's report. Under
        ZeRO-3 every rank gathers the parameters bucket by bucket as the sender packs them; an
        adapter (kilobytes) is gathered whole."""
        if self.peft_model is None:
            # a tied head is the embedding: sent once; buckets as the sender's
            source = GatheredBuckets(distinct(self._base_parameters()), self.sync.bucket_mb * 2**20)
            try:
                return self._send(source) if self.rank == 0 else None
            finally:
                source.follow()
        with self._gathered(published_only=True):
            if self.rank != 0:
                return None
            return self._send(TensorSource(self._named_weights()))

    def _send(self, source) -> SyncReport:
        if self.sender is None:
            raise RuntimeError("publish_weights before connect_workers: no workers to send to")
        return self.sender.publish(self.version, source)

    def policy_version(self) -> int:
        return self.version

    # ----- checkpoints (every rank calls these: ZeRO shards are saved and loaded per rank) -------

    def save_checkpoint(self, directory: str) -> dict[str, int]:
        """DeepSpeed engine state (weights, optimizer, lr schedule) and the version, into `directory`;
        then this rank commits its part (rl/checkpoint.py). Returns the files it wrote and their sizes."""
        from rl.checkpoint import commit_rank_part

        # Under LoRA the frozen base is the model directory's: only the adapter and its optimizer state are saved.
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state=self._client_state(),
                                    exclude_frozen_parameters=self.peft_model is not None)
        return commit_rank_part(Path(directory), self.rank)

    def _client_state(self) -> dict:
        """What a checkpoint keeps beside the engine's state (the diffusion learner adds its EMA)."""
        return {"version": self.version}

    def _restore_client_state(self, client_state: dict) -> None:
        """Take back what `_client_state` saved, apart from the version."""

    def write_probe(self, root: str, nonce: str) -> str:
        """Write this rank's probe file under `root` (the driver then reads it); returns this host."""
        from rl.checkpoint import write_probe

        return write_probe(Path(root), self.rank, nonce)

    def load_checkpoint(self, directory: str, version: int | None = None) -> int:
        """Restore what `save_checkpoint` wrote; returns the restored version. `version`: serve the
        restored weights as this version instead of the saved one (a guard rollback: a worker only
        takes versions newer than the one it serves)."""
        # strict unless LoRA: its checkpoint holds the adapter only (the base stays as loaded at setup)
        path, client_state = self.engine.load_checkpoint(directory, tag=CHECKPOINT_TAG,
                                                         load_module_strict=self.peft_model is None)
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint '{CHECKPOINT_TAG}' in {directory}")
        self._restore_client_state(client_state)
        self.version = int(client_state["version"]) if version is None else version
        return self.version

    def export_policy(self, directory: str) -> None:
        """The AR policy as vLLM loads it: a Hugging Face directory (weights + tokenizer), or under
        LoRA the adapter in PEFT's format (a `LoRARequest` path; `blip3o-rl export --merge` folds it
        into the model directory named in its adapter_config.json)."""
        with self._gathered(published_only=True):
            if self.rank != 0:
                return
            # one CPU copy per tensor: a tied head stays an alias of the embedding, which save_pretrained
            # leaves out as `weights_digest` does (copying each name broke the alias: the export held the
            # head twice and its digest never matched the learner's, so every rollback of a tied model failed)
            copies, weights = {}, {}
            for name, t in self._exported_weights().items():
                key = (t.data_ptr(), tuple(t.shape))
                if key not in copies:
                    copies[key] = t.to("cpu", copy=True)
                weights[name] = copies[key]
            if self.peft_model is not None:
                from policy.lora import write_adapter

                write_adapter(Path(directory), self.config.lora, weights, base_model=str(self.paths.root))
                return
            self.engine.module.lm.save_pretrained(directory, state_dict=weights, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)

    def weights_digest(self) -> str | None:
        """sha256 of the weights `export_policy` writes (rl/checkpoint.py `weights_digest`) on rank 0,
        None elsewhere; every rank must call this. A rollback proves with it that the learner holds
        exactly the checkpoint's weights."""
        from rl.checkpoint import weights_digest

        with self._gathered(published_only=True):
            return weights_digest(self._exported_weights()) if self.rank == 0 else None

    def _exported_weights(self) -> dict[str, torch.Tensor]:
        """What an export writes (inside `_gathered`): what a publish sends (the diffusion learner's
        EMA instead, when it keeps one)."""
        return self._named_weights()

    def close(self) -> None:
        """Release the sender (its shared-memory file, its process group)."""
        if self.sender is not None:
            self.sender.close()
            self.sender = None


def distinct(parameters: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """Each parameter under its first name only: a tied alias (lm_head.weight is the embedding) is
    not published twice; every receiver serves the head through the embedding."""
    first: dict[int, str] = {}
    for name, p in parameters.items():
        first.setdefault(id(p), name)
    return {name: parameters[name] for name in first.values()}


class GatheredBuckets:
    """The learner's parameters as a weight source (rl/weight_sync.py `WeightSource`). Under ZeRO-3
    the full shapes come from DeepSpeed's records and each bucket's parameters are gathered only
    while the sender packs them; the gather is a collective, so the other ranks `follow` the same
    buckets in the same order. Below stage 3 the gathers do nothing (DeepSpeed's context is a no-op
    for parameters it does not partition)."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], bucket_limit: int):
        self.parameters = parameters
        self.manifest = make_manifest(self.specs, bucket_limit)
        self.gathers = 0
        """Buckets gathered so far (by the sender, or by `follow`)."""

    @property
    def specs(self) -> dict[str, ParamSpec]:
        return {name: ParamSpec(tuple(getattr(p, "ds_shape", p.shape)), p.dtype) for name, p in self.parameters.items()}

    @contextlib.contextmanager
    def gathered(self, names):
        import deepspeed

        self.gathers += 1
        with deepspeed.zero.GatheredParameters([self.parameters[name] for name in names], modifier_rank=None):
            yield {name: self.parameters[name].detach() for name in names}

    def follow(self) -> None:
        """Join every bucket's gather not joined yet: a rank that does not send joins them all; rank
        0 joins those its sender did not reach (a failed broadcast), so no rank waits in a gather."""
        for bucket in range(self.gathers, len(self.manifest.bucket_bytes)):
            with self.gathered(self.manifest.bucket_names(bucket)):
                pass


def lr_lambda(config: DeepSpeedRanksConfig):
    """Multiplier of the peak lr at optimizer step s: linear warmup, then constant / linear / cosine."""
    warmup, total = config.warmup_steps, config.total_steps

    def progress(step: int) -> float:
        return min((step - warmup) / max(total - warmup, 1), 1.0)

    after_warmup = {
        "constant": lambda step: 1.0,
        "linear": lambda step: 1.0 - progress(step),
        "cosine": lambda step: 0.5 * (1.0 + math.cos(math.pi * progress(step))),
    }[config.lr_schedule]
    return lambda step: (step + 1) / warmup if step < warmup else after_warmup(step)
