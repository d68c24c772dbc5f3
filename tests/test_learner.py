"""The DeepSpeed learner: 2 ranks as Ray actors on the tiny model, ZeRO 1/2/3, and the weight sync.

ZeRO stages run one after another with the same config and batch; the stage-3 learner stays up
for the sync tests (its weights must be gathered from both ranks' shards before each publish).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
import torch

from policy.loading import load_ar_model, load_tokenizer, load_vocab
from policy.logprobs import Truncation, sequence_image_logprobs
from policy.model_dir import ModelPaths
from policy.prompt import rollout_prompt_ids
from policy.weights import UNSERVICEABLE
from rl.learners.ar_config import LearnerConfig
from rl.learners.ar_learner import LearnerMetrics, epoch_seed, plan_epoch
from rl.learners.group import LearnerGroup
from rl.objectives.grpo import GroupAdvantages, GRPOConfig, GRPOLoss, LossInputs, group_advantages
from rl.weight_sync import WeightSyncConfig, WeightSyncError
from rollout.records import RolloutBatch
from tests.support.receivers import TransformersReceiver

pytestmark = pytest.mark.slow

CAPTIONS = ["a red cat", "two dogs", "a blue clock on a wall"]
G = 4
# group 1 is all-equal: zero signal, dropped -> 8 rows train; 4 rows per optimizer step (2 ranks x
# 2 micro-batches of 1), 2 steps per epoch, 2 epochs = 4 optimizer steps.
REWARDS = [1.0, 0.0, 0.5, 0.2, 0.3, 0.3, 0.3, 0.3, 0.0, 1.0, 1.0, 0.0]
TRANSPORTS = ["object_store", "shared_memory", "broadcast"]


def learner_config(model_dir, stage: int) -> LearnerConfig:
    return LearnerConfig(
        model=str(model_dir), world_size=2, zero_stage=stage, micro_batch_size=1, gradient_accumulation_steps=2,
        epochs=2, lr=1e-3, torch_threads=1, grpo=GRPOConfig(beta=0.01, kl_estimator="k3", tis_cap=2.0),
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    paths = ModelPaths(tiny_model_dir)
    tokenizer = load_tokenizer(paths)
    return load_ar_model(paths), load_vocab(paths, tokenizer), tokenizer


def logprobs_under(model, tiny, batch: RolloutBatch) -> torch.Tensor:
    _, vocab, tokenizer = tiny
    with torch.no_grad():
        return sequence_image_logprobs(model, batch.prompt_ids, batch.image_tokens, vocab, tokenizer.pad_token_id)


def model_with(weights: dict[str, torch.Tensor], tiny_model_dir):
    model = load_ar_model(ModelPaths(tiny_model_dir))
    model.load_state_dict(weights)
    return model


@pytest.fixture(scope="module")
def rollout(tiny) -> tuple[RolloutBatch, GroupAdvantages]:
    """Random image tokens scored by the initial model (on-policy, version 0)."""
    model, vocab, tokenizer = tiny
    prompts = [rollout_prompt_ids(tokenizer, c) for c in CAPTIONS for _ in range(G)]
    codes = torch.randint(0, vocab.codebook_size, (len(prompts), vocab.tokens_per_image),
                          generator=torch.Generator().manual_seed(0))  # [B*G, N]
    batch = RolloutBatch(prompts, [b for b in range(len(CAPTIONS)) for _ in range(G)], vocab.to_token_ids(codes),
                         torch.zeros(codes.shape), policy_version=0, seed=0)
    batch.logprobs = logprobs_under(model, tiny, batch)
    return batch, group_advantages(torch.tensor(REWARDS), batch.group_index, GRPOConfig(filter_zero_signal_groups=True))


@dataclass
class ZeroRun:
    metrics: LearnerMetrics
    weights: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def zero_runs(ray_cluster, tiny_model_dir, rollout):
    """One train_step at ZeRO 1, 2 and 3 on the same batch; yields the runs and the live stage-3 group."""
    runs = {}
    for stage in (1, 2, 3):
        group = LearnerGroup(learner_config(tiny_model_dir, stage), timeout_s=600)
        runs[stage] = ZeroRun(group.train_step(*rollout), group.gather_weights())
        if stage != 3:
            group.shutdown()
    yield runs, group
    group.shutdown()


def test_one_update_changes_the_weights_and_bumps_the_version(zero_runs, tiny):
    runs, _ = zero_runs
    initial = tiny[0].state_dict()
    metrics, weights = runs[1].metrics, runs[1].weights
    assert set(weights) == set(initial)
    changed = [name for name in initial if not torch.equal(initial[name], weights[name])]
    assert len(changed) == len(initial)  # AdamW moves every parameter that had a gradient
    assert metrics.policy_version == 1 and metrics.sampler_version == 0
    assert metrics.optimizer_steps == 4 and len(metrics.losses) == 4
    assert metrics.rows == 8 and metrics.zero_signal_share == pytest.approx(1 / 3)
    assert 0 < metrics.entropy <= math.log(1024) + 1e-6
    # on-policy batch: the proximal policy is the sampler, so no IS weight differs from 1 (beyond float noise)
    assert metrics.is_weight_mean == pytest.approx(1.0, abs=1e-4) and metrics.is_truncated_frac == 0.0


def test_zero_stages_1_2_3_give_the_same_losses_and_weights(zero_runs):
    runs, _ = zero_runs
    for stage in (2, 3):
        assert runs[stage].metrics.losses == pytest.approx(runs[1].metrics.losses, abs=1e-4)
        assert runs[stage].metrics.grad_norms == pytest.approx(runs[1].metrics.grad_norms, rel=1e-4)
        for name, tensor in runs[1].weights.items():
            torch.testing.assert_close(runs[stage].weights[name], tensor, atol=1e-4, rtol=0)
    # the later steps see updated weights, so equal losses there mean equal updates too
    assert len(set(round(x, 3) for x in runs[1].metrics.losses)) == 4


def test_first_step_loss_and_gradient_match_one_process_on_the_whole_step(zero_runs, rollout, tiny_model_dir, tiny):
    """DeepSpeed divides by gas and averages over ranks; the learner undoes both, so 2 ranks x 2
    micro-batches must give exactly the loss and gradient of one process on the step's 4 rows."""
    runs, _ = zero_runs
    config = learner_config(tiny_model_dir, 1)
    batch, advantages = rollout
    plans = [plan_epoch(advantages.kept_rows(), 2, rank, 1, 2, epoch_seed(config, 0, 0)) for rank in (0, 1)]
    rows = sorted(r for plan in plans for mb in plan[0].micro_batches for r, w in zip(mb.rows, mb.weights) if w > 0)
    assert len(rows) == 4
    model, vocab, tokenizer = load_ar_model(ModelPaths(tiny_model_dir)), tiny[1], tiny[2]
    logprobs = sequence_image_logprobs(model, [batch.prompt_ids[r] for r in rows], batch.image_tokens[rows], vocab,
                                       tokenizer.pad_token_id)  # [4, N]
    out = GRPOLoss(config.grpo, vocab.tokens_per_image)(LossInputs(
        logprobs=logprobs, old_logprobs=logprobs.detach(), sampler_logprobs=batch.logprobs[rows],
        advantages=advantages.advantages[rows], row_weight=torch.ones(4), denominator=4 * vocab.tokens_per_image,
        ref_logprobs=logprobs.detach(),
    ))
    out.loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    assert runs[1].metrics.losses[0] == pytest.approx(out.loss.item(), abs=1e-6)
    assert runs[1].metrics.grad_norms[0] == pytest.approx(float(grad_norm), rel=1e-4)


def test_top_k_rollouts_train_with_ratio_one_finite_weights_and_an_untruncated_kl(ray_cluster, tiny_model_dir, tiny,
                                                                                  rollout):
    """A batch sampled with top-k 8 of 1024 (the random tokens mostly lie OUTSIDE the top 8, the
    boundary case at its worst): one optimizer step, so logp_old is this forward and every ratio is
    exactly 1; every IS weight and the KL (on the untruncated distributions) stay finite."""
    model, vocab, tokenizer = tiny
    base, _ = rollout
    truncation = Truncation(top_k=8, top_p=0.95)
    batch = RolloutBatch(base.prompt_ids, base.group_index, base.image_tokens, torch.zeros(base.logprobs.shape),
                         policy_version=0, seed=0, truncation=truncation)
    with torch.no_grad():
        batch.logprobs = sequence_image_logprobs(model, batch.prompt_ids, batch.image_tokens, vocab,
                                                 tokenizer.pad_token_id, truncation=truncation)
    assert bool(torch.isfinite(batch.logprobs).all())
    config = LearnerConfig(model=str(tiny_model_dir), world_size=2, zero_stage=1, micro_batch_size=6, epochs=1,
                           lr=1e-3, torch_threads=1, grpo=GRPOConfig(beta=0.01, tis_cap=2.0))
    advantages = group_advantages(torch.tensor(REWARDS), batch.group_index, config.grpo)  # 12 rows, 1 step
    group = LearnerGroup(config, timeout_s=600)
    try:
        metrics = group.train_step(batch, advantages)
    finally:
        group.shutdown()
    assert metrics.optimizer_steps == 1 and metrics.rows == 12
    assert metrics.ratio_min == 1.0 and metrics.ratio_max == 1.0
    assert metrics.is_weight_mean == pytest.approx(1.0, abs=1e-4) and metrics.is_truncated_frac == 0.0
    # the reference is the initial model: KL 0 at the first step, computed on finite numbers
    assert metrics.kl == pytest.approx(0.0, abs=1e-5) and math.isfinite(metrics.loss)
    # the entropy of the scored distribution: the top 8 plus the sampled token where it lies outside
    assert 0 < metrics.entropy <= math.log(9) + 1e-4


def test_checkpoint_restores_weights_and_version_and_exports_a_loadable_policy(zero_runs, rollout, tiny_model_dir,
                                                                               tmp_path):
    _, group = zero_runs  # ZeRO-3: every rank saves and loads its own shards
    saved_version, saved = group.policy_version(), group.gather_weights()
    group.save_checkpoint(str(tmp_path / "learner"))
    group.export_policy(str(tmp_path / "policy"))
    group.train_step(*rollout)
    assert group.policy_version() == saved_version + 1
    assert group.load_checkpoint(str(tmp_path / "learner")) == saved_version == group.policy_version()
    restored = group.gather_weights()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").state_dict()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "policy")) == exported["lm_head.weight"].shape[0]
    for name, tensor in saved.items():
        assert torch.equal(restored[name], tensor), name
    assert exported.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(exported[name], tensor), name


def start_receiver(ray, model_dir):
    """A receiving actor with the worker contract (validates the whole update, then loads)."""
    return ray.remote(TransformersReceiver).options(num_cpus=0).remote(str(model_dir))


def test_every_transport_delivers_the_gathered_weights_and_each_version_is_confirmed(
    zero_runs, rollout, tiny_model_dir, ray_cluster
):
    _, group = zero_runs
    receivers = [start_receiver(ray_cluster, tiny_model_dir) for _ in range(2)]
    try:
        for transport in TRANSPORTS:
            group.connect_workers(receivers, WeightSyncConfig(transport=transport, bucket_mb=1, timeout_s=120))
            metrics = group.train_step(*rollout)
            report = group.publish_weights()
            assert report.version == metrics.policy_version == group.policy_version()
            assert report.transport == transport and report.workers == 2 and report.seconds > 0
            gathered = group.gather_weights()
            # every parameter once: a tied lm_head (the embedding) is not sent again
            tied = model_with(gathered, tiny_model_dir).config.tie_word_embeddings
            assert report.bytes == sum(t.numel() * 4 for name, t in gathered.items()
                                       if not (tied and name == "lm_head.weight"))
            assert ray_cluster.get([r.served_version.remote() for r in receivers]) == [report.version] * 2
            for state in ray_cluster.get([r.state_dict.remote() for r in receivers]):
                for name, tensor in gathered.items():
                    assert torch.equal(state[name], tensor), f"{transport}: {name} differs from the learner's"
    finally:
        for receiver in receivers:
            ray_cluster.kill(receiver)


def test_a_refused_update_names_the_worker(zero_runs, tiny_model_dir, glyph_model_dir, ray_cluster):
    _, group = zero_runs
    good = start_receiver(ray_cluster, tiny_model_dir)
    wrong_model = start_receiver(ray_cluster, glyph_model_dir)  # other vocabulary: embedding shapes differ
    try:
        group.connect_workers([good, wrong_model], WeightSyncConfig(transport="shared_memory", timeout_s=60))
        refusal = r"^worker 1 refused weight version \d+: WeightUpdateError: .*embed_tokens.weight: shape"
        with pytest.raises(WeightSyncError, match=refusal):
            group.publish_weights()
        assert ray_cluster.get(wrong_model.served_version.remote()) == 0
    finally:
        ray_cluster.kill(good)
        ray_cluster.kill(wrong_model)


def test_a_restarted_worker_breaks_the_broadcast_group_until_it_is_connected_again(
    zero_runs, tiny_model_dir, ray_cluster
):
    """A process group holds processes: after a worker's restart a publish must fail at once (not at
    the timeout, and without leaving the other worker blocked), and connecting again must mend it."""
    _, group = zero_runs
    config = WeightSyncConfig(transport="broadcast", bucket_mb=1, timeout_s=600)
    survivor = start_receiver(ray_cluster, tiny_model_dir)
    restartable = ray_cluster.remote(TransformersReceiver).options(num_cpus=0, max_restarts=1)
    restarted = restartable.remote(str(tiny_model_dir))
    try:
        group.connect_workers([survivor, restarted], config)
        version = group.publish_weights().version
        ray_cluster.kill(restarted, no_restart=False)
        deadline = time.monotonic() + 120
        while True:  # the kill is asynchronous; the new process serves the weights on disk (version 0)
            try:
                if ray_cluster.get(restarted.served_version.remote(), timeout=30) == 0:
                    break
            except ray_cluster.exceptions.RayActorError:
                pass
            assert time.monotonic() < deadline, "the receiver did not come back"
            time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(WeightSyncError):
            group.publish_weights()
        assert time.monotonic() - started < 120  # sync.timeout_s is 600: it was not waited out
        # not stuck in a receive; if it had loaded a bucket when the broadcast broke, it is half-updated
        # and says so (the run's recovery restarts it: tests/test_fleet.py)
        assert ray_cluster.get(survivor.served_version.remote(), timeout=60) in (version, UNSERVICEABLE)
        with pytest.raises(WeightSyncError, match="closed or broken: connect the workers again"):
            group.publish_weights()  # the broken group is not used again
        group.connect_workers([survivor, restarted], config)
        report = group.publish_weights()
        assert report.version == version
        assert ray_cluster.get([survivor.served_version.remote(), restarted.served_version.remote()]) == [version] * 2
    finally:
        ray_cluster.kill(survivor)
        ray_cluster.kill(restarted)


def test_vllm_rollout_worker_serves_the_learners_new_weights_after_the_sync(zero_runs, rollout, tiny, tiny_model_dir,
                                                                            ray_cluster):
    """Proof the sync reached vLLM: its sampled log-probs equal the learner's new weights' (1e-4)."""
    from rollout.ar_worker import ARRolloutActor
    from rollout.config import RolloutConfig
    from rollout.decoder_config import DecoderConfig
    from rollout.decoder_worker import decoder_actor

    _, group = zero_runs
    ar = ARRolloutActor.options(num_cpus=1).remote(
        RolloutConfig(model=str(tiny_model_dir), kv_cache_gib=1, max_model_len=256, num_threads=1))
    decoder = decoder_actor(DecoderConfig(model=str(tiny_model_dir), num_inference_steps=2, num_cpus=0.5))
    try:
        # shared memory: the whole update from one mapped file; broadcast: streamed into vLLM's
        # loader bucket by bucket (1 MiB buckets: a layer's weights span several)
        for transport in ("shared_memory", "broadcast"):
            group.connect_workers([ar, decoder], WeightSyncConfig(transport=transport, bucket_mb=1, timeout_s=300))
            metrics = group.train_step(*rollout)
            report = group.publish_weights()
            assert report.version == metrics.policy_version and report.buckets > 2
            assert ray_cluster.get([ar.served_version.remote(), decoder.served_version.remote()]) == [report.version] * 2
            sampled = ray_cluster.get(ar.generate.remote(CAPTIONS, 2, 123), timeout=300)
            assert sampled.policy_version == report.version
            learner_model = model_with(group.gather_weights(), tiny_model_dir)
            expected = logprobs_under(learner_model, tiny, sampled)  # [6, N]
            assert (sampled.logprobs - expected).abs().max() < 1e-4, transport
            # ...and the initial weights would not match: the check can tell the versions apart
            assert (sampled.logprobs - logprobs_under(tiny[0], tiny, sampled)).abs().max() > 1e-3
    finally:
        ray_cluster.kill(ar)
        ray_cluster.kill(decoder)
