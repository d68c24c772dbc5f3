"""GRPO math against values computed by hand (in the comments), the optimizer-step plan, configs,
weight packing, and one real update on a fixed batch moving log-probs the right way."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from policy.loading import load_ar_model, load_tokenizer, load_vocab
from policy.logprobs import sequence_image_logprobs
from policy.model_dir import ModelPaths
from policy.prompt import rollout_prompt_ids
from policy.weights import param_specs
from rl.learners.ar_config import LearnerConfig, deepspeed_config
from rl.learners.ar_learner import lr_lambda, plan_epoch
from rl.objectives.grpo import (
    GRPOConfig,
    GRPOLoss,
    LossInputs,
    LossStats,
    SeqMeanTokenMean,
    SeqMeanTokenSumNorm,
    TokenMean,
    clamped_ratio,
    clipped_surrogate,
    dual_clipped_surrogate,
    group_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    truncated_is_weight,
)
from rl.weight_sync import ALIGN, make_manifest, pack_bucket, unpack

log = math.log


def test_group_advantages_grpo_and_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 3.0, 1.0])
    groups = [0, 0, 0, 0, 1, 1, 2, 2]
    # group 0: mean 0.5, centred [0.5, -0.5, 0, 0], unbiased std sqrt(0.5 / 3) = 0.408248
    #   -> 0.5 / 0.408248 = 1.224745
    # group 1: [2, 2] all equal -> zero signal
    # group 2: mean 2, centred [1, -1], unbiased std sqrt(2 / 1) = 1.414214 -> 0.707107
    out = group_advantages(rewards, groups, GRPOConfig(advantage_eps=1e-6, filter_zero_signal_groups=True))
    expected = [1.224745, -1.224745, 0, 0, 0, 0, 0.707107, -0.707107]
    assert out.advantages.tolist() == pytest.approx(expected, abs=1e-5)
    assert out.keep.tolist() == [True] * 4 + [False] * 2 + [True] * 2
    assert out.kept_rows() == [0, 1, 2, 3, 6, 7]
    assert (out.groups, out.zero_signal_groups) == (3, 1)
    assert out.zero_signal_share == pytest.approx(1 / 3)

    dr = group_advantages(rewards, groups, GRPOConfig(scale_by_std=False))
    assert dr.advantages.tolist() == pytest.approx([0.5, -0.5, 0, 0, 0, 0, 1, -1])
    assert dr.keep.all() and dr.zero_signal_groups == 1  # kept by default (upstream), counted either way
    # the upstream default eps 1e-4: group 2 -> 1 / (1.414214 + 1e-4)
    upstream = group_advantages(rewards, groups, GRPOConfig())
    assert upstream.advantages[6].item() == pytest.approx(1 / (math.sqrt(2) + 1e-4), abs=1e-6)

    with pytest.raises(ValueError, match="3 rewards for 2 group indices"):
        group_advantages(torch.ones(3), [0, 0], GRPOConfig())
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), [0, 0], GRPOConfig())


def test_group_advantages_over_the_batch_std_as_flow_grpo():
    """The diffusion learner's default (Flow-GRPO's `sample.global_std`): each group's mean, the
    biased std of every reward of the batch; the AR learner keeps the group std."""
    from rl.learners.diffusion_config import FlowGRPOConfig

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 3.0, 1.0])
    groups = [0, 0, 0, 0, 1, 1]
    # batch mean 1, squared deviations 0 1 0.25 0.25 4 0 -> 5.5 / 6 = 0.916667, std 0.957427 (np.std)
    # group 0: mean 0.5, centred [0.5, -0.5, 0, 0] -> 0.5 / (0.957427 + 1e-4) = 0.522178
    # group 1: mean 2, centred [1, -1] -> 1 / 0.957527 = 1.044357
    flow = FlowGRPOConfig()
    assert flow.std_scope == "batch" and GRPOConfig().std_scope == "group"
    out = group_advantages(rewards, groups, flow)
    assert out.advantages.tolist() == pytest.approx([0.522178, -0.522178, 0, 0, 1.044357, -1.044357], abs=1e-5)
    # the group std instead: group 0 -> 0.5 / (0.408248 + 1e-4) = 1.224445, group 1 -> 1 / (1.414214 + 1e-4) = 0.707057
    per_group = group_advantages(rewards, groups, FlowGRPOConfig(std_scope="group"))
    assert per_group.advantages.tolist() == pytest.approx([1.224445, -1.224445, 0, 0, 0.707057, -0.707057], abs=1e-5)
    # a zero-signal group stays at 0 and counts in the batch std: [2, 2] added -> mean 1.25, squared
    # deviations 0.0625 1.5625 0.5625 0.5625 3.0625 0.0625 0.5625 0.5625 = 7 -> 7 / 8, std 0.935414
    with_flat = group_advantages(torch.cat([rewards, torch.tensor([2.0, 2.0])]), groups + [2, 2],
                                 FlowGRPOConfig(filter_zero_signal_groups=True))
    assert with_flat.advantages.tolist() == pytest.approx(
        [0.5 / 0.935514, -0.5 / 0.935514, 0, 0, 1 / 0.935514, -1 / 0.935514, 0, 0], abs=1e-5)
    assert with_flat.kept_rows() == [0, 1, 2, 3, 4, 5] and with_flat.zero_signal_groups == 1
    with pytest.raises(ValidationError):
        FlowGRPOConfig(std_scope="prompt")


def test_clipped_surrogate_clip_higher():
    ratio = torch.tensor([[0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5]], requires_grad=True)
    # clip range [1 - 0.2, 1 + 0.3] = [0.8, 1.3]
    # A = +1: min(r, clip(r)) = [0.5, 0.9, 1.1, 1.3] -> loss [-0.5, -0.9, -1.1, -1.3]; upper clip at 1.5
    # A = -2: min(-2r, -2 clip(r)) = min([-1, -1.8, -2.2, -3], [-1.6, -1.8, -2.2, -2.6])
    #         = [-1.6, -1.8, -2.2, -3] -> loss [1.6, 1.8, 2.2, 3.0]; lower clip at 0.5
    out = clipped_surrogate(ratio, torch.tensor([1.0, -2.0]), clip_low=0.2, clip_high=0.3)
    assert out.loss.tolist()[0] == pytest.approx([-0.5, -0.9, -1.1, -1.3])
    assert out.loss.tolist()[1] == pytest.approx([1.6, 1.8, 2.2, 3.0])
    assert out.clipped_high.tolist() == [[False, False, False, True], [False] * 4]
    assert out.clipped_low.tolist() == [[False] * 4, [True, False, False, False]]
    # a clipped token passes no gradient: d loss / d r = -A unless clipped
    out.loss.sum().backward()
    assert ratio.grad.tolist() == [[-1.0, -1.0, -1.0, 0.0], [0.0, 2.0, 2.0, 2.0]]


def test_dual_clip_caps_negative_advantage_loss():
    ratio = torch.tensor([[0.5, 1.1, 1.5, 3.0]])
    # A = -2, clip [0.8, 1.2]: clipped loss = [1.6, 2.2, 3.0, 6.0]; dual clip c = 1.4 caps at -c A = 2.8
    out = dual_clipped_surrogate(ratio, torch.tensor([-2.0]), 0.2, 0.2, dual_clip=1.4)
    assert out.loss.tolist()[0] == pytest.approx([1.6, 2.2, 2.8, 2.8])
    assert out.dual_clipped.tolist() == [[False, False, True, True]]
    # positive advantages are untouched: A = +1 -> [-0.5, -1.1, -1.2, -1.2]
    pos = dual_clipped_surrogate(ratio, torch.tensor([1.0]), 0.2, 0.2, dual_clip=1.4)
    assert pos.loss.tolist()[0] == pytest.approx([-0.5, -1.1, -1.2, -1.2])
    assert not pos.dual_clipped.any()
    # per-token advantages (spatial credit) [1, 4]: each token as if its A were the row's
    mixed = dual_clipped_surrogate(ratio, torch.tensor([[-2.0, 1.0, -2.0, 1.0]]), 0.2, 0.2, dual_clip=1.4)
    assert mixed.loss.tolist()[0] == pytest.approx([1.6, -1.1, 2.8, -1.2])
    assert mixed.dual_clipped.tolist() == [[False, False, True, False]]


def test_kl_estimators():
    logp, ref = torch.tensor([log(0.5)]), torch.tensor([log(0.25)])
    # k1 = log 0.5 - log 0.25 = log 2 = 0.693147
    # k2 = (log 2)^2 / 2 = 0.240227
    # k3 = exp(log 0.25 - log 0.5) - (log 0.25 - log 0.5) - 1 = 0.5 + 0.693147 - 1 = 0.193147
    assert kl_k1(logp, ref).item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_k2(logp, ref).item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_k3(logp, ref).item() == pytest.approx(0.193147, abs=1e-6)
    same = torch.tensor([log(0.3)])
    assert kl_k1(same, same).item() == kl_k2(same, same).item() == kl_k3(same, same).item() == 0.0


def test_truncated_is_weight():
    old = torch.tensor([log(0.6), log(0.2), log(0.3)], requires_grad=True)
    sampler = torch.tensor([log(0.2), log(0.4), log(0.3)])
    # 0.6 / 0.2 = 3 -> truncated to cap 2; 0.2 / 0.4 = 0.5; 0.3 / 0.3 = 1
    w = truncated_is_weight(old, sampler, cap=2.0)
    assert w.tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert not w.requires_grad


def test_loss_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token-mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    # seq-mean-token-mean: (6 / 3 + 4 / 1) / 2 rows = 3
    # seq-mean-token-sum-norm (N_max = 3): (6 / 3 + 4 / 3) / 2 rows = 1.666667
    for aggregation, expected in ((TokenMean(), 2.5), (SeqMeanTokenMean(), 3.0), (SeqMeanTokenSumNorm(3), 5 / 3)):
        value = aggregation.row_values(per_token, mask).sum() / aggregation.denominator(rows=2, tokens=4)
        assert value.item() == pytest.approx(expected)


def hand_inputs(**overrides) -> LossInputs:
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.6, 0.5], [0.5, 0.3]])).requires_grad_(True)
    fields = dict(logprobs=new, old_logprobs=old, sampler_logprobs=old, advantages=torch.tensor([1.0, -1.0]),
                  row_weight=torch.ones(2), denominator=4.0, ref_logprobs=old)
    fields.update(overrides)
    return LossInputs(**fields)


def test_grpo_loss_end_to_end_by_hand():
    config = GRPOConfig(clip_low=0.2, clip_high=0.2, beta=0.1, kl_estimator="k1", tis_cap=None)
    loss_fn = GRPOLoss(config, tokens_per_image=2)
    out = loss_fn(hand_inputs())
    # ratios [[1.2, 1.0], [1.0, 0.6]], A = [1, -1], clip [0.8, 1.2]
    # pg per token: row 0: -1.2, -1.0; row 1: +1.0, -min(-0.6, -0.8) = 0.8 (lower clip)
    #   token-mean = (-1.2 - 1.0 + 1.0 + 0.8) / 4 = -0.1
    # k1 = log(new / 0.5) = [[log 1.2, 0], [0, log 0.6]] = [[0.182322, 0], [0, -0.510826]]
    #   token-mean = -0.328504 / 4 = -0.082126; x beta 0.1 = -0.0082126
    assert out.loss.item() == pytest.approx(-0.1 - 0.0082126, abs=1e-6)
    summary = out.stats.summary()
    assert summary["pg_loss"] == pytest.approx(-0.1, abs=1e-6)
    assert summary["kl"] == pytest.approx(-0.082126, abs=1e-6)
    assert summary["clip_low_frac"] == 0.25 and summary["clip_high_frac"] == 0.0
    assert summary["ratio_mean"] == pytest.approx(0.95) and summary["ratio_max"] == pytest.approx(1.2)
    assert summary["ratio_min"] == pytest.approx(0.6) and summary["is_weight_mean"] == 1.0

    # the same step split into two micro-batches (one row each, same denominator) sums to the same
    # loss, and a zero-weight padding row changes nothing
    halves = [loss_fn(hand_inputs(logprobs=hand_inputs().logprobs[[r]].detach(),
                                  old_logprobs=hand_inputs().old_logprobs[[r]],
                                  sampler_logprobs=hand_inputs().old_logprobs[[r]],
                                  advantages=torch.tensor([[1.0, -1.0][r]]), row_weight=torch.ones(1),
                                  ref_logprobs=hand_inputs().old_logprobs[[r]])) for r in (0, 1)]
    assert halves[0].loss.item() + halves[1].loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    combined = halves[0].stats + halves[1].stats
    assert combined.summary()["ratio_min"] == pytest.approx(0.6) and combined.tokens == 4
    padded = loss_fn(hand_inputs(row_weight=torch.tensor([1.0, 0.0]), denominator=2.0))
    # row 0 alone over its 2 tokens: pg (-1.2 - 1.0) / 2 = -1.1; kl 0.1 * 0.182322 / 2 = 0.0091161
    assert padded.loss.item() == pytest.approx(-1.1 + 0.0091161, abs=1e-6)
    assert padded.stats.tokens == 2


def test_grpo_loss_with_truncated_is_and_no_reference():
    config = GRPOConfig(clip_low=0.2, clip_high=0.2, beta=0.0, tis_cap=1.5)
    loss_fn = GRPOLoss(config, tokens_per_image=2)
    assert loss_fn.kl is None  # beta = 0: no KL term and no reference log-probs needed
    sampler = torch.log(torch.tensor([[0.25, 0.5], [0.5, 0.5]]))
    out = loss_fn(hand_inputs(sampler_logprobs=sampler, ref_logprobs=None))
    # IS weights pi_old / mu: [[0.5 / 0.25 = 2 -> 1.5, 1], [1, 1]]
    # pg: (1.5 * -1.2 - 1.0 + 1.0 + 0.8) / 4 = -0.25
    assert out.loss.item() == pytest.approx(-0.25, abs=1e-6)
    assert out.stats.is_truncated == 1 and out.stats.is_weight == pytest.approx(4.5)


def test_ratio_is_weight_and_k3_are_clamped_like_verl():
    # log-ratios of +-50 are clamped to +-20 before exp; k3 to 10
    logp = torch.tensor([[0.0, -50.0]], requires_grad=True)
    old = torch.tensor([[-50.0, 0.0]])
    assert clamped_ratio(logp - old).tolist()[0] == pytest.approx([math.exp(20), math.exp(-20)])
    # the IS weight of a token the sampler gave -inf (it cannot have sampled it, but a bad record must
    # not give inf * 0 = NaN) is finite and capped
    weight = truncated_is_weight(torch.tensor([[-1.0]]), torch.tensor([[float("-inf")]]), cap=2.0)
    assert weight.item() == 2.0
    # k3 at ref - logp = 30: exp(20) - 20 - 1 unclamped, 10 after the clamp; at -0.5 unchanged
    k3 = kl_k3(torch.tensor([[-30.0, 0.0]]), torch.tensor([[0.0, -0.5]]))
    assert k3.tolist()[0] == pytest.approx([10.0, math.exp(-0.5) + 0.5 - 1], abs=1e-6)
    # the whole loss stays finite and differentiable with such inputs
    config = GRPOConfig(beta=0.1, tis_cap=2.0)
    out = GRPOLoss(config, tokens_per_image=2)(LossInputs(
        logprobs=logp, old_logprobs=old, sampler_logprobs=torch.tensor([[float("-inf"), 0.0]]),
        advantages=torch.tensor([1.0]), row_weight=torch.ones(1), denominator=2.0,
        ref_logprobs=torch.tensor([[0.0, -90.0]]),
    ))
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and bool(torch.isfinite(logp.grad).all())


def test_kl_uses_the_untruncated_logprobs_when_given():
    """With top-k/top-p the ratio uses the truncated log-probs, the KL the untruncated ones."""
    config = GRPOConfig(clip_low=0.2, clip_high=0.2, beta=0.1, kl_estimator="k1", tis_cap=None)
    loss_fn = GRPOLoss(config, tokens_per_image=2)
    full = torch.log(torch.tensor([[0.3, 0.25], [0.25, 0.15]]))  # untruncated policy
    out = loss_fn(hand_inputs(kl_logprobs=full))
    # pg as in the hand test above: -0.1; k1 = log(full / 0.5) summed = log(0.6 * 0.5 * 0.5 * 0.3) = log(0.045)
    assert out.loss.item() == pytest.approx(-0.1 + 0.1 * math.log(0.045) / 4, abs=1e-6)


def test_the_ppo_anchor_is_explicit():
    with pytest.raises(ValidationError, match="nothing to correct"):
        LearnerConfig(model="x", grpo=GRPOConfig(ppo_anchor="sampler"))
    assert LearnerConfig(model="x", grpo=GRPOConfig(ppo_anchor="sampler", tis_cap=None)).grpo.ppo_anchor == "sampler"


def test_plan_epoch_covers_every_kept_row_once_with_equal_work_per_rank():
    kept = [0, 1, 2, 3, 5, 6, 7, 8, 9, 11]  # 10 rows; world 2 x gas 2 x micro 2 = 8 rows per step
    plans = [plan_epoch(kept, world=2, rank=rank, micro=2, gas=2, seed=7) for rank in (0, 1)]
    # ceil(10 / 8) = 2 steps of 5 real rows each, padded to 8 with zero-weight rows
    for plan in plans:
        assert [step.rows for step in plan] == [5, 5]
        assert all(len(step.micro_batches) == 2 for step in plan)
        assert all(len(mb.rows) == 2 for step in plan for mb in step.micro_batches)
    real = [r for plan in plans for step in plan for mb in step.micro_batches for r, w in zip(mb.rows, mb.weights) if w]
    assert sorted(real) == kept
    assert plan_epoch(kept, 2, 0, 2, 2, seed=7) == plans[0]  # deterministic: every rank computes the same plan
    assert plan_epoch(kept, 2, 0, 2, 2, seed=8) != plans[0]


def test_lr_schedules():
    def factors(schedule: str) -> list[float]:
        config = LearnerConfig(model="x", lr_schedule=schedule, warmup_steps=2, total_steps=6)
        return [lr_lambda(config)(s) for s in range(7)]

    # warmup (s + 1) / 2, then progress p = (s - 2) / 4
    assert factors("constant") == pytest.approx([0.5, 1, 1, 1, 1, 1, 1])
    assert factors("linear") == pytest.approx([0.5, 1, 1, 0.75, 0.5, 0.25, 0])
    # cosine: (1 + cos(pi p)) / 2 at p = 0, 1/4, 1/2, 3/4, 1
    assert factors("cosine") == pytest.approx([0.5, 1, 1, 0.853553, 0.5, 0.146447, 0], abs=1e-6)


def test_configs_reject_typos_and_impossible_combinations():
    with pytest.raises(ValidationError, match="zero_stag"):
        LearnerConfig(model="x", zero_stag=3)
    with pytest.raises(ValidationError, match="bf16 needs ZeRO stage"):
        LearnerConfig(model="x", precision="bf16", zero_stage=0)
    with pytest.raises(ValidationError, match="nccl"):
        LearnerConfig(model="x", dist_backend="nccl")
    with pytest.raises(ValidationError):
        GRPOConfig(dual_clip=0.5)  # must exceed 1
    ds = deepspeed_config(LearnerConfig(model="x", world_size=2, micro_batch_size=3, gradient_accumulation_steps=4,
                                        zero_stage=3, precision="bf16", device="cuda", dist_backend="nccl"))
    assert ds["train_batch_size"] == 24 and ds["zero_optimization"] == {"stage": 3} and ds["bf16"] == {"enabled": True}


def test_pack_unpack_round_trip_in_aligned_buckets():
    weights = {
        "a": torch.arange(10, dtype=torch.float32).reshape(2, 5),
        "b": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
        "c": torch.arange(300, dtype=torch.float32),  # 1200 bytes: bigger than the bucket, gets its own
        "d": torch.tensor([7], dtype=torch.int64),
    }
    manifest = make_manifest(param_specs(weights), bucket_limit=256)
    # a (40 B) and b (4 B at offset 64) share bucket 0; c alone in bucket 1; d starts bucket 2
    layout = [(s.name, s.bucket, s.offset) for s in manifest.slots]
    assert layout == [("a", 0, 0), ("b", 0, 64), ("c", 1, 0), ("d", 2, 0)]
    assert manifest.bucket_bytes == (68, 1200, 8) and manifest.total_bytes == 40 + 4 + 1200 + 8
    assert all(s.offset % ALIGN == 0 for s in manifest.slots)
    buffers = [torch.empty(size, dtype=torch.uint8) for size in manifest.bucket_bytes]
    for bucket, buffer in enumerate(buffers):
        pack_bucket(weights, manifest, bucket, buffer)
    out = unpack(buffers, manifest)
    for name, tensor in weights.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor)
    with pytest.raises(ValueError, match="no weights"):
        make_manifest({})


def test_loss_stats_add_up():
    a = LossStats(loss=1.0, tokens=2, ratio_max=1.5, ratio_min=0.9)
    b = LossStats(loss=0.5, tokens=3, ratio_max=1.1, ratio_min=0.7)
    total = a + b
    assert (total.loss, total.tokens, total.ratio_max, total.ratio_min) == (1.5, 5, 1.5, 0.7)


def test_one_update_raises_positive_and_lowers_negative_advantage_samples(tiny_model_dir):
    """One GRPO step with plain SGD on a fixed batch of the tiny AR model."""
    torch.manual_seed(0)
    paths = ModelPaths(tiny_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    model = load_ar_model(paths).train()
    prompts = [rollout_prompt_ids(tokenizer, c) for c in ("a red cat", "two dogs") for _ in range(4)]
    tokens = vocab.to_token_ids(torch.randint(0, vocab.codebook_size, (8, vocab.tokens_per_image)))  # [8, N]

    def logprobs() -> torch.Tensor:
        return sequence_image_logprobs(model, prompts, tokens, vocab, tokenizer.pad_token_id)  # [8, N]

    config = GRPOConfig(beta=0.0, tis_cap=None)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.3, 0.9, 0.0, 0.2, 1.0, 0.1]), [0] * 4 + [1] * 4, config)
    before = logprobs()
    out = GRPOLoss(config, vocab.tokens_per_image)(LossInputs(
        logprobs=before, old_logprobs=before.detach(), sampler_logprobs=before.detach(),
        advantages=advantages.advantages, row_weight=torch.ones(8), denominator=8 * vocab.tokens_per_image,
    ))
    out.loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        change = (logprobs() - before.detach()).sum(-1)  # [8] per-sample log-prob change
    positive, negative = advantages.advantages > 0, advantages.advantages < 0
    assert bool((change[positive] > 0).all()), change
    assert bool((change[negative] < 0).all()), change


def test_all_finite_fast_path_is_exact():
    from policy.weights import all_finite

    assert all_finite(torch.randn(100))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(100)
        t[37] = bad
        assert not all_finite(t) and not all_finite(t.bfloat16())
    # finite values whose float32 sum overflows fall back to the exact check: still finite
    assert all_finite(torch.full((4,), 3e38))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))  # sum is NaN, not a cancellation
