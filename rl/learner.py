"""One DeepSpeed rank of the GRPO learner (a Ray actor; `LearnerGroup` starts one per rank).

    train_step(batch, advantages) on every rank:
        plan: kept rows -> per epoch, shuffled optimizer steps of world * gas * micro rows,
              padded with zero-weight rows so every rank runs the same number of micro-batches
              (ZeRO-3 gathers parameters collectively in every forward: ranks must stay in step)
        [proximal log-probs before any update, when the IS correction needs them]
        per micro-batch: forward -> masked log-probs -> GRPOLoss -> backward; engine.step()
    publish_weights(version) on every rank: ZeRO-3 gathers the full weights collectively; rank 0
        hands them to the weight sender (rl/weight_sync.py), which waits for every worker.

Each rank sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT itself (otherwise
DeepSpeed falls back to MPI discovery). LOCAL_RANK is 0: Ray gives every GPU actor its own
CUDA_VISIBLE_DEVICES, so each rank's device is its local device 0.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from policy.loading import load_ar_model, load_tokenizer, load_vocab
from policy.logprobs import image_token_entropy, image_token_logprobs, sequence_logits
from policy.model_dir import resolve_model_dir
from rl.grpo import GroupAdvantages, GRPOLoss, LossInputs, LossStats
from rl.learner_config import LearnerConfig, WeightSyncConfig, deepspeed_config
from rl.weight_sync import SyncReport, make_sender
from rollout.records import RolloutBatch


@dataclass(frozen=True)
class MicroBatch:
    rows: list[int]
    """Batch rows of this micro-batch on this rank."""
    weights: list[float]
    """1 for a real row, 0 for padding."""


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


def epoch_seed(config: LearnerConfig, version: int, epoch: int) -> int:
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
    clip_low_frac: float = 0.0
    clip_high_frac: float = 0.0
    dual_clip_frac: float = 0.0
    entropy: float = 0.0
    ratio_mean: float = 0.0
    ratio_min: float = 0.0
    ratio_max: float = 0.0
    is_weight_mean: float = 0.0
    is_truncated_frac: float = 0.0
    grad_norm: float = 0.0
    lr: float = 0.0
    step_s: float = 0.0


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
        # beta = 0: no reference model at all. The reference is the AR part only, never SANA.
        self.reference = None
        if config.grpo.beta > 0:
            self.reference = load_ar_model(paths, dtype, str(self.device)).requires_grad_(False)
        model = load_ar_model(paths, "float32", str(self.device)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.adam_betas,
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        # ZeRO-3 partitions the already-loaded module here (no zero.Init needed for from_pretrained).
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(config))
        self.loss_fn = GRPOLoss(config.grpo, self.vocab.tokens_per_image)
        self.version = config.initial_version
        self.sender = None

    # ----- training ---------------------------------------------------------------------------

    def _logits(self, model, batch: RolloutBatch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch.image_tokens[rows].to(self.device)  # [b, N]
        logits, _ = sequence_logits(model, [batch.prompt_ids[r] for r in rows], tokens, self.pad_id)  # [b, N, V]
        return logits, tokens

    def _logprobs(self, model, batch: RolloutBatch, rows: list[int]) -> torch.Tensor:
        logits, tokens = self._logits(model, batch, rows)
        return image_token_logprobs(logits, tokens, self.vocab, self.config.grpo.temperature)  # [b, N]

    @torch.no_grad()
    def _proximal_logprobs(self, batch: RolloutBatch, plan: list[OptimizerStep]) -> torch.Tensor:
        """logp_old of every batch row under the weights before this update: [R, N].

        Every rank runs its share of the first epoch's plan (same number of forwards everywhere),
        then the ranks exchange their rows.
        """
        rows = [r for step in plan for mb in step.micro_batches for r in mb.rows]
        mine = torch.cat([self._logprobs(self.engine, batch, mb.rows) for step in plan for mb in step.micro_batches])
        all_rows = [torch.empty(len(rows), dtype=torch.long, device=self.device) for _ in range(self.world)]
        all_lp = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(all_rows, torch.tensor(rows, device=self.device))
        torch.distributed.all_gather(all_lp, mine)
        table = torch.zeros(batch.logprobs.shape, dtype=mine.dtype, device=self.device)  # [R, N]
        table[torch.cat(all_rows)] = torch.cat(all_lp)
        return table

    def _micro_step(self, batch, advantages, mb: MicroBatch, denominator: float, proximal, ref_cache) -> LossStats:
        logits, tokens = self._logits(self.engine, batch, mb.rows)  # [b, N, V]
        temperature = self.config.grpo.temperature
        logprobs = image_token_logprobs(logits, tokens, self.vocab, temperature)  # [b, N]
        with torch.no_grad():
            entropy = image_token_entropy(logits.detach(), self.vocab, temperature)  # [b, N]
            missing = [r for r in mb.rows if r not in ref_cache]
            if self.reference is not None and missing:
                ref_cache.update(zip(missing, self._logprobs(self.reference, batch, missing)))
        ref = torch.stack([ref_cache[r] for r in mb.rows]) if self.reference is not None else None  # [b, N]
        sampler = batch.logprobs[mb.rows].to(self.device)  # [b, N]
        if self.config.grpo.tis_cap is None:
            old = sampler  # standard GRPO: the sampler's log-probs are the old policy
        elif proximal is None:
            old = logprobs.detach()  # a single optimizer step: this forward IS the proximal policy
        else:
            old = proximal[mb.rows]  # [b, N]
        out = self.loss_fn(LossInputs(
            logprobs=logprobs, old_logprobs=old, sampler_logprobs=sampler,
            advantages=advantages.advantages[mb.rows].to(self.device),
            row_weight=torch.tensor(mb.weights, device=self.device),
            denominator=denominator, ref_logprobs=ref, entropy=entropy,
        ))
        # DeepSpeed divides by gas and averages over ranks; our loss is already the exact share of
        # the step's loss (denominator over all ranks and micro-batches), so undo both.
        self.engine.backward(out.loss * self.config.gradient_accumulation_steps * self.world)
        self.engine.step()  # applies the optimizer only at the gradient-accumulation boundary
        return out.stats

    def train_step(self, batch: RolloutBatch, advantages: GroupAdvantages) -> LearnerMetrics:
        """Several epochs of mini-batch updates on one rollout batch; the version goes up by one."""
        start = time.perf_counter()
        config, n_tokens = self.config, self.vocab.tokens_per_image
        if advantages.advantages.numel() != len(batch) or batch.image_tokens.shape[1] != n_tokens:
            raise ValueError(f"batch of {len(batch)} rows x {batch.image_tokens.shape[1]} tokens does not match "
                             f"{advantages.advantages.numel()} advantages x {n_tokens} tokens per image")
        kept = advantages.kept_rows()
        metrics = LearnerMetrics(self.version, batch.policy_version, 0, len(kept), advantages.zero_signal_share)
        if not kept:
            return metrics
        self.engine.train()
        plans = [plan_epoch(kept, self.world, self.rank, config.micro_batch_size, config.gradient_accumulation_steps,
                            epoch_seed(config, self.version, epoch)) for epoch in range(config.epochs)]
        n_steps = sum(len(plan) for plan in plans)
        proximal = self._proximal_logprobs(batch, plans[0]) if config.grpo.tis_cap is not None and n_steps > 1 else None
        ref_cache: dict[int, torch.Tensor] = {}
        total, losses, grad_norms = LossStats(), [], []
        for plan in plans:
            for step in plan:
                denominator = self.loss_fn.aggregation.denominator(step.rows, step.rows * n_tokens)
                step_stats = LossStats()
                for mb in step.micro_batches:
                    step_stats = step_stats + self._micro_step(batch, advantages, mb, denominator, proximal, ref_cache)
                norm = self.engine.get_global_grad_norm()
                grad_norms.append(float("nan") if norm is None else float(norm))
                losses.append(step_stats.loss)
                total = total + step_stats
        total, losses = self._reduce(total, losses)
        self.version += 1
        summary = total.summary()
        summary.update(loss=sum(losses) / n_steps, pg_loss=total.pg_loss / n_steps, kl_loss=total.kl_loss / n_steps)
        return LearnerMetrics(
            policy_version=self.version, sampler_version=batch.policy_version, optimizer_steps=n_steps,
            rows=len(kept), zero_signal_share=advantages.zero_signal_share, losses=losses, grad_norms=grad_norms,
            grad_norm=float(np.mean(grad_norms)), lr=float(self.engine.get_lr()[0]),
            step_s=time.perf_counter() - start, **summary,
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

    def _gathered(self):
        """Context in which every parameter is whole on every rank (a collective under ZeRO-3)."""
        import contextlib

        import deepspeed

        if self.config.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def _named_weights(self) -> dict[str, torch.Tensor]:
        # remove_duplicate=False keeps tied aliases (e.g. lm_head.weight) as in the HF state_dict.
        return {name: p.detach() for name, p in self.engine.module.named_parameters(remove_duplicate=False)}

    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """Full AR weights as CPU copies on rank 0 (None elsewhere); every rank must call this."""
        with self._gathered():
            if self.rank != 0:
                return None
            return {name: t.to("cpu", copy=True) for name, t in self._named_weights().items()}

    def connect_workers(self, workers: list, sync: WeightSyncConfig | None = None) -> None:
        """Rank 0: build the weight sender for these workers (the broadcast group forms here);
        `sync` overrides the configured transport (benchmarks compare them on one learner)."""
        if self.rank == 0:
            if self.sender is not None:
                self.sender.close()
            self.sender = make_sender(sync or self.config.sync, workers)

    def publish_weights(self) -> SyncReport | None:
        """Gather (every rank) and send the current version to every worker (rank 0); rank 0's report."""
        with self._gathered():
            if self.rank != 0:
                return None
            if self.sender is None:
                raise RuntimeError("publish_weights before connect_workers: no workers to send to")
            return self.sender.publish(self.version, self._named_weights())

    def policy_version(self) -> int:
        return self.version

    # ----- checkpoints (every rank calls these: ZeRO shards are saved and loaded per rank) -------

    def save_checkpoint(self, directory: str) -> None:
        """DeepSpeed engine state (weights, optimizer, lr schedule) and the version, into `directory`."""
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, client_state={"version": self.version})

    def load_checkpoint(self, directory: str) -> int:
        """Restore what `save_checkpoint` wrote; returns the restored version."""
        path, client_state = self.engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint '{CHECKPOINT_TAG}' in {directory}")
        self.version = int(client_state["version"])
        return self.version

    def export_policy(self, directory: str) -> None:
        """The AR policy as a Hugging Face directory (weights + tokenizer) that vLLM and transformers load."""
        with self._gathered():
            if self.rank == 0:
                weights = {name: t.to("cpu", copy=True) for name, t in self._named_weights().items()}
                self.engine.module.save_pretrained(directory, state_dict=weights, safe_serialization=True)
                self.tokenizer.save_pretrained(directory)

    def close(self) -> None:
        """Release the sender (its shared-memory file, its process group)."""
        if self.sender is not None:
            self.sender.close()
            self.sender = None


def lr_lambda(config: LearnerConfig):
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
