"""The GRPO objective on image tokens, top to bottom:

    advantages -> ratios -> clipped surrogate -> KL -> truncated IS correction -> aggregation -> metrics

Notation per row b (one sampled image) and image token t (t < N):
    A_b        group-relative advantage of row b
    logp       log-prob of the sampled token under the policy being trained (with grad)
    logp_old   under the policy at the start of the update (the "proximal" policy)
    logp_mu    under the sampler (vLLM, possibly an older weight version: async mode)
    logp_ref   under the frozen reference AR model
All log-probs are the masked ones of `policy.logprobs` (softmax over image tokens at temperature T,
truncated to the top-k / top-p the sampler used), except in the KL: there the policy and the
reference are both scored on the untruncated distribution (a token outside the reference's top-k
would otherwise be -inf).

Numerical guards (as verl's `core_algos.py`): log-ratios are clamped to [-20, 20] before `exp`
(ratio and IS weight), and the k3 estimate to [-10, 10].

Sources: GRPO (Shao et al. 2024, DeepSeekMath), Dr. GRPO (Liu et al. 2025: no std scaling,
token-sum normalised by a constant), DAPO (Yu et al. 2025: clip-higher, dynamic sampling,
token-mean), dual clip (Ye et al. 2020), KL estimators k1/k2/k3 (Schulman 2020, "Approximating
KL divergence"), truncated IS for sampler/learner mismatch (Yao et al. 2025, "Your efficient RL
framework secretly brings you off-policy RL training").

Deliberate deviations from BLIP3o-NEXT's trl fork: the IS correction (theirs is strictly
on-policy), optional filtering of zero-signal groups (off by default, as upstream), log-probs of
the truncated sampling distribution (theirs: the full softmax), and a token mask kept general
(every image has exactly N tokens, so token-mean and seq-mean-token-mean agree there; they differ
once a mask drops tokens).

Spatial credit (optional, `spatial`): where a reward says which parts of the image are right or
wrong (regions, rl/objectives/regions.py), token t of row b gets

    A_bt = A_b + lambda L_bt

with L_bt the group-normalised local advantage of the regions over t's grid cell (0 where no region
reaches it). lambda = 0 is exactly the plain GRPO above (the same tensors: `token_advantages`). What
this does to the gradient: the A_b part is GRPO's estimate of grad E[R]; the lambda part is a policy
gradient of the region rewards where each token is credited only with the regions over its own cell
(a dense, myopic shaping: a token's effect on other cells, and on the scalar reward through them, is
not counted), with a baseline (the group's pooled region mean) that includes the token's own sample
as GRPO's group mean does. So the update is biased against grad E[R] by lambda times that shaping
term: it follows grad E[R] exactly only when the scalar reward is the mean of the region rewards and
each cell's region depends on its own token alone (the glyph decoder's tiles with per-character OCR
come close; SigLIP2 tokens decoded by SANA do not). Rows of a zero-signal group that have a local
signal stay in the update when lambda > 0.

Each variant is a small function chosen once in `GRPOLoss.__init__`; the hot path has no string
switches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from rl.objectives.regions import ComponentRegions, Grid, local_advantages


class SpatialCreditConfig(BaseModel):
    """Spatial credit: per-token advantages from the reward's regions (rl/objectives/regions.py)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    weight: float = Field(0.0, ge=0)
    """lambda: A_bt = A_b + lambda L_bt; 0 = plain GRPO, exactly."""
    rewards: list[str] | None = None
    """Reward components (names in `rewards.mix`, or the task: ocr / geneval) whose regions count;
    None = every component that returns regions."""
    min_cover: float = Field(0.5, gt=0, le=1)
    """A region reaches a grid cell it covers at least this share of (and always its home cell)."""
    grid: tuple[int, int] | None = None
    """(rows, cols) of the token grid; None = from the model (the glyph decoder's 1 x N tiles, else a
    square raster: 27 x 27 SigLIP2 tokens). The diffusion learner always uses SANA's latent grid."""


class GRPOConfig(BaseModel):
    """The GRPO objective (the formulas are below)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    scale_by_std: bool = True
    """Divide group-centred rewards by a std (GRPO); False = Dr. GRPO (centre only)."""
    std_scope: Literal["group", "batch"] = "group"
    """Which std divides (`group_advantages`): each group's own (BLIP3o-NEXT / TRL) or the whole batch's."""
    advantage_eps: float = Field(1e-4, gt=0)
    """Added to the std before dividing (BLIP3o-NEXT / TRL: 1e-4)."""
    filter_zero_signal_groups: bool = False
    """Leave groups whose rewards are all equal out of the update (filtering: they are not sampled
    again, unlike DAPO's dynamic sampling). Off = upstream: they stay in at advantage 0, so they
    add KL gradient and count in token-mean's denominator. Counted either way."""
    clip_low: float = Field(0.2, ge=0, lt=1)
    """Ratio clipped below at 1 - clip_low."""
    clip_high: float = Field(0.2, ge=0)
    """Ratio clipped above at 1 + clip_high (clip-higher: DAPO uses 0.28)."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual clip c > 1: for negative advantages the loss is capped at -c * A (None = off)."""
    beta: float = Field(0.001, ge=0)
    """KL coefficient to the frozen reference AR model; 0 = no reference model is loaded at all."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator as a loss term. Gradients: k1's has expectation 0 (it only moves
    the value, not the policy); k2's is the gradient of the reverse KL(pi || ref); k3's is the
    gradient of the forward KL(ref || pi) (BLIP3o-NEXT / GRPO use k3)."""
    ppo_anchor: Literal["learner", "sampler"] = "learner"
    """What the PPO ratio is taken against (logp_old). learner: the learner's own log-probs at the
    start of the update (recomputed when the update has several optimizer steps), so the first
    ratio is exactly 1 (BLIP3o-NEXT / TRL recompute them too); sampler: the rollout worker's
    log-probs (no recompute; kernel and staleness differences then land in the clipping)."""
    tis_cap: float | None = Field(2.0, gt=0)
    """Truncated importance-sampling cap on pi_old / mu between the learner's anchor and the
    sampler (stale async rollouts, kernel differences); None = off. Needs ppo_anchor 'learner'
    (with the sampler as anchor the weight is 1)."""
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How per-token losses become one number (see grpo.py)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts; log-probs are computed at the same temperature."""
    spatial: SpatialCreditConfig | None = None
    """Per-token advantages from the reward's regions (spatial credit); None = off."""


# ---------------------------------------------------------------------------------------------
# 1. Advantages


@dataclass(frozen=True)
class GroupAdvantages:
    """Per-row advantages of a rollout batch and which rows carry signal."""

    advantages: torch.Tensor
    """[R] float32: A_b (0 for rows of zero-signal groups)."""
    keep: torch.Tensor
    """[R] bool: rows that take part in the update."""
    groups: int
    """Number of groups (prompts) in the batch."""
    zero_signal_groups: int
    """Groups whose rewards were all equal (no gradient signal), dropped or not."""
    local: torch.Tensor | None = None
    """[R, P] float32 lambda L_bt, the spatial part of each token's advantage (None: spatial credit off)."""
    local_signal: torch.Tensor | None = None
    """[R, P] bool: token t of row b has a local signal."""
    spatial_weight: float = 0.0
    """lambda (0: spatial credit off)."""

    @property
    def zero_signal_share(self) -> float:
        return self.zero_signal_groups / max(self.groups, 1)

    def kept_rows(self) -> list[int]:
        return torch.nonzero(self.keep).flatten().tolist()

    def token_advantages(self, rows: list[int] | torch.Tensor) -> torch.Tensor:
        """These rows' advantages: [b] A_b (spatial credit off), or [b, P] A_b + lambda L_bt."""
        if self.local is None:
            return self.advantages[rows]  # [b]
        return self.advantages[rows].unsqueeze(-1) + self.local[rows]  # [b, P]

    def spatial_summary(self) -> dict[str, float]:
        """Over the kept rows: the share of tokens with a local signal and the std of L_bt over
        them (before lambda); empty when spatial credit is off."""
        if self.local is None:
            return {}
        signal = self.local_signal[self.keep]  # [k, P]
        share = float(signal.float().mean()) if signal.numel() else 0.0
        return {"spatial_share": share, "spatial_std": self._local_std(signal)}

    def _local_std(self, signal: torch.Tensor) -> float:
        values = self.local[self.keep][signal] / self.spatial_weight  # [n] L_bt
        return float(values.std(correction=0)) if values.numel() else 0.0


class AdvantageSettings(Protocol):
    """What `group_advantages` reads of a config: the AR learner's `grpo` and the diffusion
    learner's `flow` (rl/learners/diffusion_config.py) both have these."""

    scale_by_std: bool
    std_scope: Literal["group", "batch"]
    advantage_eps: float
    filter_zero_signal_groups: bool


def group_std(group_rewards: torch.Tensor, batch_rewards: torch.Tensor) -> torch.Tensor:
    """std_g(r): the group's unbiased sample std (DeepSeekMath, TRL, BLIP3o-NEXT)."""
    return group_rewards.std()


def batch_std(group_rewards: torch.Tensor, batch_rewards: torch.Tensor) -> torch.Tensor:
    """std(r) over every reward of the batch, biased (Flow-GRPO `stat_tracking.py` with
    `sample.global_std`: `np.std(rewards)` of the gathered batch, the per-prompt mean kept)."""
    return batch_rewards.std(correction=0)


STD_SCOPES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"group": group_std, "batch": batch_std}


def group_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor | list[int], config: AdvantageSettings
) -> GroupAdvantages:
    """A_b = (r_b - mean_g(r)) / (std + eps), or r_b - mean_g(r) without std scaling (Dr. GRPO).

    The mean is always the group's; the std is the group's (`std_scope: group`, unbiased, as
    DeepSeekMath/TRL) or the whole batch's (`batch`, biased, as Flow-GRPO's global std: a group
    whose rewards barely differ then gets small advantages instead of unit-scale ones). A group
    with all-equal rewards (or a single sample) is zero-signal: its advantages are 0 and, with
    `filter_zero_signal_groups`, its rows are not kept (the batch std still counts its rewards).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32).flatten()  # [R]
    group_index = torch.as_tensor(group_index, dtype=torch.long).flatten()  # [R]
    if rewards.shape != group_index.shape:
        raise ValueError(f"{rewards.numel()} rewards for {group_index.numel()} group indices")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
    std = STD_SCOPES[config.std_scope]
    advantages = torch.zeros_like(rewards)  # [R]
    keep = torch.ones_like(rewards, dtype=torch.bool)  # [R]
    groups = group_index.unique()
    zero_signal = 0
    for g in groups.tolist():
        rows = group_index == g  # [R] bool
        r = rewards[rows]  # [G]
        if r.numel() < 2 or bool((r == r[0]).all()):
            zero_signal += 1
            keep[rows] = not config.filter_zero_signal_groups
            continue
        centred = r - r.mean()  # [G]
        advantages[rows] = centred / (std(r, rewards) + config.advantage_eps) if config.scale_by_std else centred
    return GroupAdvantages(advantages, keep, groups=len(groups), zero_signal_groups=zero_signal)


def spatial_credit(advantages: GroupAdvantages, regions: list[ComponentRegions], group_index, grid: Grid,
                   spatial: SpatialCreditConfig | None, settings: AdvantageSettings) -> GroupAdvantages:
    """`advantages` with spatial credit from the step's regions on `grid` (off, or lambda 0: unchanged).
    The local advantages are normalised as the scalar ones (`settings.scale_by_std`, `advantage_eps`)."""
    if spatial is None or spatial.weight == 0:
        return advantages
    chosen = [c for c in regions if spatial.rewards is None or c.name in spatial.rewards]
    local = local_advantages(chosen, group_index, grid, settings.scale_by_std, settings.advantage_eps,
                             spatial.min_cover)
    return with_spatial_credit(advantages, torch.from_numpy(local.values), torch.from_numpy(local.signal),
                               spatial.weight)


def with_spatial_credit(advantages: GroupAdvantages, local: torch.Tensor, signal: torch.Tensor,
                        weight: float) -> GroupAdvantages:
    """`advantages` with each token's spatial part lambda L_bt (local [R, P], signal [R, P] bool).

    lambda = 0 returns `advantages` itself: plain GRPO, exactly. With lambda > 0 a row with a local
    signal is kept even in a zero-signal group (its tokens still get lambda L_bt)."""
    if weight == 0:
        return advantages
    local = torch.as_tensor(local, dtype=torch.float32)  # [R, P]
    signal = torch.as_tensor(signal, dtype=torch.bool)  # [R, P]
    if local.shape != signal.shape or local.shape[0] != advantages.advantages.numel():
        raise ValueError(f"local advantages {tuple(local.shape)} for {advantages.advantages.numel()} rows")
    keep = advantages.keep | signal.any(dim=1)  # [R]
    return replace(advantages, keep=keep, local=weight * torch.where(signal, local, 0.0), local_signal=signal,
                   spatial_weight=weight)


# ---------------------------------------------------------------------------------------------
# 2-3. Ratios and the clipped surrogate

LOG_RATIO_CLAMP = 20.0
"""|log ratio| bound before exp (verl: `torch.clamp(negative_approx_kl, min=-20.0, max=20.0)`)."""
K3_CLAMP = 10.0
"""Bound of the per-token k3 estimate (verl's `kl_penalty` for "low_var_kl")."""


def clamped_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(clamp(log_ratio, -20, 20)): finite for any finite or infinite log-ratio."""
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()  # [B, N]


@dataclass(frozen=True)
class Surrogate:
    loss: torch.Tensor
    """[B, N] per-token policy-gradient loss."""
    clipped_low: torch.Tensor
    """[B, N] bool: A < 0 and ratio < 1 - clip_low (the lower clip zeroes the gradient)."""
    clipped_high: torch.Tensor
    """[B, N] bool: A > 0 and ratio > 1 + clip_high (the upper clip zeroes the gradient)."""
    dual_clipped: torch.Tensor
    """[B, N] bool: A < 0 and the dual clip capped the loss at -c A."""


def per_token(advantages: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """[B] A_b broadcast over the tokens, or [B, N] A_bt (spatial credit) as it is: -> [B, N]."""
    return (advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages).expand_as(ratio)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> Surrogate:
    """PPO/GRPO surrogate with separate ranges (clip-higher):

        loss = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)

    ratio [B, N], advantages [B] (broadcast over tokens) or [B, N] (spatial credit: per token).
    """
    adv = per_token(advantages, ratio)  # [B, N]
    unclipped = ratio * adv  # [B, N]
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv  # [B, N]
    loss = -torch.minimum(unclipped, clipped)  # [B, N]
    low = (adv < 0) & (ratio < 1 - clip_low)  # [B, N]
    high = (adv > 0) & (ratio > 1 + clip_high)  # [B, N]
    return Surrogate(loss, low, high, torch.zeros_like(low))


def dual_clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float, dual_clip: float
) -> Surrogate:
    """Clipped surrogate plus the dual clip for A < 0 (a huge ratio cannot blow the loss up):

        loss = min(clipped loss, -c * A)   where A < 0;   the clipped loss elsewhere
    """
    base = clipped_surrogate(ratio, advantages, clip_low, clip_high)
    adv = per_token(advantages, ratio)  # [B, N]
    cap = -dual_clip * adv  # [B, N]
    capped = (adv < 0) & (base.loss > cap)  # [B, N]
    loss = torch.where(capped, cap, base.loss)  # [B, N]
    return Surrogate(loss, base.clipped_low, base.clipped_high, capped)


# ---------------------------------------------------------------------------------------------
# 4. KL to the reference model (per token, estimators of KL(pi || pi_ref) from samples of pi)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = logp - logp_ref (unbiased, high variance, can be negative)."""
    return logp - ref_logp  # [B, N]


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = (logp - logp_ref)^2 / 2 (biased, low variance, >= 0)."""
    return 0.5 * (logp - ref_logp) ** 2  # [B, N]


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1 (unbiased, >= 0; GRPO's choice),
    clamped to [-10, 10] (verl's `kl_penalty`): one token far from the reference cannot blow up
    the loss."""
    delta = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, N]
    return (delta.exp() - delta - 1).clamp(-K3_CLAMP, K3_CLAMP)  # [B, N]


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


# ---------------------------------------------------------------------------------------------
# 5. Truncated importance sampling for stale rollouts


def truncated_is_weight(old_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """w = min(exp(clamp(logp_old - logp_mu, -20, 20)), cap), no gradient.

    The rollouts were drawn from mu (an older weight version in async mode, and a different
    kernel in any mode); the surrogate is taken w.r.t. the proximal policy, so each token's
    policy-gradient term is reweighted by pi_old / mu, truncated at `cap` to bound the variance.
    """
    return clamped_ratio(old_logp - sampler_logp).clamp(max=cap).detach()  # [B, N]


# ---------------------------------------------------------------------------------------------
# 6. Loss aggregation. Each is split into a per-row value and a denominator over the WHOLE
#    optimizer step (all micro-batches and ranks), so summing micro-batch losses gives exactly
#    the mini-batch loss however rows are spread over ranks.


class TokenMean:
    """sum_{b,t} m_bt l_bt / sum_{b,t} m_bt (DAPO): every token weighs the same."""

    def row_values(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (per_token * mask).sum(-1)  # [B]

    def denominator(self, rows: int, tokens: float) -> float:
        return tokens


class SeqMeanTokenMean:
    """mean_b (sum_t m_bt l_bt / sum_t m_bt) (original GRPO): every sequence weighs the same."""

    def row_values(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [B]

    def denominator(self, rows: int, tokens: float) -> float:
        return rows


class SeqMeanTokenSumNorm:
    """mean_b (sum_t m_bt l_bt / N_max) (Dr. GRPO): a constant normaliser, no length bias."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def row_values(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (per_token * mask).sum(-1) / self.max_tokens  # [B]

    def denominator(self, rows: int, tokens: float) -> float:
        return rows


def make_aggregation(name: str, max_tokens: int):
    return {
        "token-mean": TokenMean,
        "seq-mean-token-mean": SeqMeanTokenMean,
        "seq-mean-token-sum-norm": lambda: SeqMeanTokenSumNorm(max_tokens),
    }[name]()


# ---------------------------------------------------------------------------------------------
# 7. The loss and its metrics


@dataclass
class LossStats:
    """Sums over the real tokens of one or more micro-batches; add them up, then `summary()`."""

    loss: float = 0.0
    pg_loss: float = 0.0
    kl_loss: float = 0.0
    tokens: float = 0.0
    kl: float = 0.0
    clipped_low: float = 0.0
    clipped_high: float = 0.0
    dual_clipped: float = 0.0
    ratio: float = 0.0
    ratio_max: float = float("-inf")
    ratio_min: float = float("inf")
    is_weight: float = 0.0
    is_truncated: float = 0.0
    entropy: float = 0.0

    SUMMED = ("loss", "pg_loss", "kl_loss", "tokens", "kl", "clipped_low", "clipped_high", "dual_clipped",
              "ratio", "is_weight", "is_truncated", "entropy")

    def __add__(self, other: "LossStats") -> "LossStats":
        out = LossStats(**{name: getattr(self, name) + getattr(other, name) for name in self.SUMMED})
        out.ratio_max = max(self.ratio_max, other.ratio_max)
        out.ratio_min = min(self.ratio_min, other.ratio_min)
        return out

    def summary(self) -> dict[str, float]:
        """Per-token means (fractions for the clip counts); loss terms are already normalised."""
        per_token = max(self.tokens, 1.0)
        return {
            "loss": self.loss, "pg_loss": self.pg_loss, "kl_loss": self.kl_loss,
            "kl": self.kl / per_token,
            "clip_low_frac": self.clipped_low / per_token, "clip_high_frac": self.clipped_high / per_token,
            "dual_clip_frac": self.dual_clipped / per_token,
            "ratio_mean": self.ratio / per_token, "ratio_max": self.ratio_max, "ratio_min": self.ratio_min,
            "is_weight_mean": self.is_weight / per_token, "is_truncated_frac": self.is_truncated / per_token,
            "entropy": self.entropy / per_token,
        }


assert set(LossStats.SUMMED) | {"ratio_max", "ratio_min"} == {f.name for f in fields(LossStats)}


@dataclass
class LossInputs:
    """One micro-batch of b rows (some may be padding with row_weight 0)."""

    logprobs: torch.Tensor
    """[b, N] logp under the trained policy (with grad)."""
    old_logprobs: torch.Tensor
    """[b, N] logp_old (proximal policy, no grad)."""
    sampler_logprobs: torch.Tensor
    """[b, N] logp_mu as recorded by the rollout worker."""
    advantages: torch.Tensor
    """[b] A_b, or [b, N] A_bt with spatial credit."""
    row_weight: torch.Tensor
    """[b] 1 for real rows, 0 for padding rows (equal micro-batches on every rank)."""
    denominator: float
    """Aggregation denominator of the whole optimizer step (rows or tokens, all ranks)."""
    ref_logprobs: torch.Tensor | None = None
    """[b, N] logp_ref on the untruncated distribution (None when beta = 0)."""
    kl_logprobs: torch.Tensor | None = None
    """[b, N] logp of the trained policy on the untruncated distribution, with grad, for the KL;
    None = `logprobs` (no truncation)."""
    entropy: torch.Tensor | None = None
    """[b, N] entropy of the masked distribution (metrics only)."""
    mask: torch.Tensor | None = None
    """[b, N] token mask (None = all N tokens count)."""


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar: this micro-batch's share of the optimizer-step loss (sum over micro-batches = loss)."""
    stats: LossStats


def _no_is_correction(old_logp: torch.Tensor, sampler_logp: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(old_logp)  # [B, N]


class GRPOLoss:
    """per-token l = w_IS * surrogate + beta * KL; loss = sum_b row_weight_b * agg_b(l) / denominator."""

    def __init__(self, config: GRPOConfig, tokens_per_image: int):
        self.beta = config.beta
        self.tis_cap = config.tis_cap
        if config.dual_clip is None:
            self.surrogate = lambda r, a: clipped_surrogate(r, a, config.clip_low, config.clip_high)
        else:
            self.surrogate = lambda r, a: dual_clipped_surrogate(r, a, config.clip_low, config.clip_high,
                                                                 config.dual_clip)
        self.kl = KL_ESTIMATORS[config.kl_estimator] if config.beta > 0 else None
        if config.tis_cap is None:
            self.is_weight = _no_is_correction
        else:
            self.is_weight = lambda old, mu: truncated_is_weight(old, mu, config.tis_cap)
        self.aggregation = make_aggregation(config.loss_aggregation, tokens_per_image)

    def __call__(self, x: LossInputs) -> LossOutput:
        mask = x.mask if x.mask is not None else torch.ones_like(x.logprobs)  # [b, N]
        weight = x.row_weight.to(x.logprobs.dtype)  # [b]

        ratio = clamped_ratio(x.logprobs - x.old_logprobs.detach())  # [b, N]
        surrogate = self.surrogate(ratio, x.advantages.to(ratio.dtype))
        is_weight = self.is_weight(x.old_logprobs, x.sampler_logprobs)  # [b, N]
        pg_token = is_weight * surrogate.loss  # [b, N]

        if self.kl is not None:
            if x.ref_logprobs is None:
                raise ValueError("beta > 0 needs reference log-probs")
            kl_token = self.kl(x.logprobs if x.kl_logprobs is None else x.kl_logprobs, x.ref_logprobs)  # [b, N]
        else:
            kl_token = torch.zeros_like(pg_token)  # [b, N]

        def aggregate(per_token: torch.Tensor) -> torch.Tensor:
            return (weight * self.aggregation.row_values(per_token, mask)).sum() / x.denominator

        pg_loss = aggregate(pg_token)
        kl_loss = self.beta * aggregate(kl_token)
        loss = pg_loss + kl_loss
        return LossOutput(loss, self._stats(x, mask * weight.unsqueeze(-1), loss, pg_loss, kl_loss, ratio,
                                            surrogate, is_weight, kl_token))

    def _stats(self, x, real, loss, pg_loss, kl_loss, ratio, surrogate, is_weight, kl_token) -> LossStats:
        """Token sums over real tokens (`real` [b, N] = mask * row weight), detached."""
        with torch.no_grad():
            real_bool = real > 0  # [b, N]
            ratio_real = ratio.detach()[real_bool]  # [n]
            return LossStats(
                loss=loss.item(), pg_loss=pg_loss.item(), kl_loss=kl_loss.item(),
                tokens=float(real.sum()),
                kl=float((kl_token.detach() * real).sum()),
                clipped_low=float((surrogate.clipped_low & real_bool).sum()),
                clipped_high=float((surrogate.clipped_high & real_bool).sum()),
                dual_clipped=float((surrogate.dual_clipped & real_bool).sum()),
                ratio=float(ratio_real.sum()),
                ratio_max=float(ratio_real.max()) if ratio_real.numel() else float("-inf"),
                ratio_min=float(ratio_real.min()) if ratio_real.numel() else float("inf"),
                is_weight=float((is_weight * real).sum()),
                is_truncated=float(((clamped_ratio(x.old_logprobs - x.sampler_logprobs) > self.tis_cap) & real_bool).sum())
                if self.tis_cap is not None else 0.0,
                entropy=float((x.entropy * real).sum()) if x.entropy is not None else 0.0,
            )
