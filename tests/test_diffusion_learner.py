"""The diffusion learner (Flow-GRPO on the tiny SANA transformer; one DeepSpeed rank as a Ray actor)
with a decoder actor: sampler/learner log-prob agreement at step 0, the versioned transformer
stream to the decoder (only the published version serves), checkpoints, and a measured learning
signal on JPEG compressibility. Then the same under LoRA (a second learner and decoder actor pair):
only the adapter trains and travels, the decoder merges it, the reference is the adapter switched off.
Last, a LoRA pair keeping an EMA of the adapter: its values by hand, exports, checkpoints, serving it.

Noise level 0 = the ODE sampler is tests/test_flow_sde.py::test_noise_level_zero_reproduces_the_ode_sampler.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from policy.sana_lora import TransformerLoRAConfig
from policy.weights import TRANSFORMER_STREAM, WeightUpdateError
from rewards.compressibility import jpeg_size_kb
from rl.learners.diffusion_config import (
    DiffusionLearnerConfig,
    EMAConfig,
    FlowGRPOConfig,
)
from rl.learners.diffusion_learner import DiffusionLearnerGroup, DiffusionLearnerMetrics
from rl.objectives.grpo import GRPOConfig, group_advantages
from rl.weight_sync import SyncReport, WeightSyncConfig
from rollout.decoder_config import DecoderConfig
from rollout.decoder_worker import decoder_actor
from rollout.diffusion_rollout import DiffusionRollout, SdeSampling
from tests.test_decoder import assert_images_close, random_codes, rollout_batch

pytestmark = pytest.mark.slow

SAMPLING = SdeSampling(steps=4, noise_level=0.7)
PROMPTS = ["a cat", "two red buses on a road"]
G = 4
LR = 1e-3
"""Large on purpose: a few updates must move a measurable reward (Flow-GRPO trains LoRA at 3e-4;
3e-3 here dropped the reward faster but then oscillated)."""


def batch_of(model_dir, prompts: list[str], group: int, seed: int):
    """`group` rows per prompt with the same random image tokens per prompt (the AR part is fixed;
    only SANA's noise differs inside a group)."""
    codes = random_codes(model_dir, len(prompts), seed=seed).repeat_interleave(group, dim=0)  # [B*G, N]
    batch = rollout_batch(model_dir, [p for p in prompts for _ in range(group)], codes)
    batch.group_index = [b for b in range(len(prompts)) for _ in range(group)]
    return batch


def compressibility(images: np.ndarray) -> torch.Tensor:
    """Flow-GRPO's compressibility reward, -JPEG kB / 500, per image: -> [B]."""
    return torch.tensor([-jpeg_size_kb(image) / 500 for image in images])


def connected_pair(ray, model_dir, lr: float, lora, ema: EMAConfig | None = None):
    """A decoder actor (serving transformer adapters under `lora`) and a 1-rank diffusion learner
    publishing to it over shared memory; ended after the module's tests. KL beta 0.008: the step
    weighed most (-dt 0.5 of the 4 at shift 3: 0.1, 0.15, 0.25, 0.5) takes 0.004 of exact Gaussian KL,
    as every step did before the per-step weighting; 0.016 (0.004 on average) halved the learning below."""
    # half a CPU each (one thread either way): the module's three pairs fit the session's 4-CPU cluster
    decoder = decoder_actor(DecoderConfig(model=str(model_dir), num_inference_steps=SAMPLING.steps,
                                          num_threads=1, num_cpus=0.5, transformer_lora=lora))
    config = DiffusionLearnerConfig(
        model=str(model_dir), world_size=1, micro_batch_size=4, gradient_accumulation_steps=2, lr=lr,
        num_cpus_per_rank=0.5, torch_threads=1, sampling=SAMPLING, flow=FlowGRPOConfig(beta=0.008), lora=lora, ema=ema,
        sync=WeightSyncConfig(transport="shared_memory", timeout_s=120),
    )
    learner = DiffusionLearnerGroup(config, timeout_s=600)
    learner.connect_workers([decoder])
    yield ray, decoder, learner
    learner.shutdown()
    ray.kill(decoder)


@pytest.fixture(scope="module")
def actors(ray_cluster, tiny_model_dir):
    """A decoder actor and a 1-rank diffusion learner connected to it (shared memory)."""
    ray = ray_cluster
    yield from connected_pair(ray, tiny_model_dir, LR, lora=None)


@dataclasses.dataclass
class FirstUpdate:
    rollout: DiffusionRollout
    recomputed: torch.Tensor
    metrics: DiffusionLearnerMetrics
    eval_images: np.ndarray
    """ODE images of a fixed batch at transformer v0."""


@pytest.fixture(scope="module")
def first_update(actors, tiny_model_dir) -> FirstUpdate:
    """Step 0: sample 8 images with the SDE, recompute their log-probs in the learner, train once
    (8 images = one optimizer step of 2 micro-batches x 4)."""
    ray, decoder, learner = actors
    eval_batch = batch_of(tiny_model_dir, PROMPTS, 2, seed=5)
    eval_images = ray.get(decoder.decode.remote(eval_batch, 77)).images
    images, rollout = ray.get(decoder.decode_sde.remote(batch_of(tiny_model_dir, PROMPTS, G, seed=1), 100, SAMPLING))
    recomputed = learner.recompute_log_probs(rollout)
    advantages = group_advantages(compressibility(images.images), rollout.group_index, GRPOConfig())
    return FirstUpdate(rollout, recomputed, learner.train_step(rollout, advantages), eval_images)


def test_the_rollout_holds_what_the_learner_needs(first_update, tiny_model_dir):
    rollout = first_update.rollout
    n_tokens = 16
    assert len(rollout) == len(PROMPTS) * G and rollout.group_index == [0, 0, 0, 0, 1, 1, 1, 1]
    assert rollout.train_steps == [0, 1, 2, 3] and rollout.latent_steps == [0, 1, 2, 3, 4]
    assert rollout.latents.shape == (5, 8, 4, 8, 8) and rollout.log_probs.shape == (4, 8)
    assert rollout.hidden_states.shape == (8, n_tokens + 1, 128)
    assert rollout.sigmas[0] == 1.0 and rollout.sigmas[-1] == 0.0 and rollout.timesteps.shape == (4,)
    assert (rollout.policy_version, rollout.decoder_version, rollout.seed) == (0, 0, 100)
    # 17 x 128 hidden floats + 5 latents of 4 x 8 x 8 + 4 log-probs, float32
    assert rollout.bytes_per_image() == (17 * 128 + 5 * 256 + 4) * 4
    # an SDE window keeps only the latents around its steps
    window = SdeSampling(steps=4, noise_level=0.7, sde_window=(1, 2))
    assert window.sde_steps() == [1, 2]
    with pytest.raises(ValueError, match="inside the 4 steps"):
        SdeSampling(steps=4, sde_window=(3, 2))


def test_at_step_0_the_learner_recomputes_the_samplers_log_probs(first_update):
    """Same weights, recorded latents: the learner's per-step log-probs equal the decoder's (another
    process, other micro-batches), the first ratio is exactly 1 and the KL to the frozen copy is 0."""
    rollout, metrics = first_update.rollout, first_update.metrics
    diff = (first_update.recomputed - rollout.log_probs).abs().max().item()
    assert diff < 1e-5, diff
    assert metrics.logprob_max_abs_diff < 1e-5
    assert metrics.ratio_min == metrics.ratio_max == metrics.ratio_mean == 1.0
    assert metrics.kl == pytest.approx(0.0, abs=1e-10) and metrics.clip_fraction == 0.0
    assert (metrics.policy_version, metrics.sampler_version, metrics.optimizer_steps, metrics.rows) == (1, 0, 1, 8)
    assert np.isfinite(metrics.grad_norm) and metrics.grad_norm > 0


def test_only_the_published_transformer_serves(actors, first_update, tiny_model_dir):
    ray, decoder, learner = actors
    eval_batch = batch_of(tiny_model_dir, PROMPTS, 2, seed=5)
    # trained but not published: the decoder still serves v0 and renders the same images
    assert ray.get(decoder.served_decoder_version.remote()) == 0
    np.testing.assert_array_equal(ray.get(decoder.decode.remote(eval_batch, 77)).images, first_update.eval_images)
    report = learner.publish_weights()
    assert report.version == 1 and report.workers == 1
    assert ray.get(decoder.served_decoder_version.remote()) == 1
    assert ray.get(decoder.served_version.remote()) == 0  # the AR stream is separate
    served = ray.get(decoder.__ray_call__.remote(
        lambda worker: {n: p.detach().clone() for n, p in worker.decoder.transformer.named_parameters()}))
    for name, tensor in learner.gather_weights().items():
        assert torch.equal(served[name], tensor), name
    after = ray.get(decoder.decode.remote(eval_batch, 77)).images
    assert np.abs(after.astype(int) - first_update.eval_images.astype(int)).mean() > 0.5
    _, rollout = ray.get(decoder.decode_sde.remote(eval_batch, 3, SAMPLING))
    assert rollout.decoder_version == 1

    # a bad update is refused whole and v1 keeps serving; so is an older version
    name = next(iter(served))
    for version, weights, message in [
        (2, {**served, name: torch.zeros(3)}, "shape"),
        (2, {**served, name: torch.full_like(served[name], float("nan"))}, "NaN"),
        (2, {k: v for k, v in served.items() if k != name}, "missing"),
        (0, served, "older than the served 1"),
    ]:
        with pytest.raises(WeightUpdateError, match=message):
            ray.get(decoder.update_decoder_weights.remote(version, weights))
    assert ray.get(decoder.served_decoder_version.remote()) == 1
    np.testing.assert_array_equal(ray.get(decoder.decode.remote(eval_batch, 77)).images, after)
    # the learner (v1) refuses rollouts sampled by v0: on-policy by default
    advantages = group_advantages(torch.arange(8.0), first_update.rollout.group_index, GRPOConfig())
    with pytest.raises(ValueError, match="sampled by transformer v0, the learner is at v1"):
        learner.train_step(first_update.rollout, advantages)


def test_checkpoint_restores_the_transformer_and_export_loads(actors, first_update, tmp_path):
    from diffusers import SanaTransformer2DModel

    _, _, learner = actors
    saved_version, saved = learner.policy_version(), learner.gather_weights()
    learner.save_checkpoint(str(tmp_path / "ckpt"))
    # move the weights on (step 0's rollout, stamped as sampled by the current version), then restore
    on_policy = dataclasses.replace(first_update.rollout, decoder_version=saved_version)
    learner.train_step(on_policy, group_advantages(torch.arange(8.0), on_policy.group_index, GRPOConfig()))
    moved = learner.gather_weights()
    assert learner.policy_version() == saved_version + 1
    assert any(not torch.equal(moved[n], saved[n]) for n in saved)
    assert learner.load_checkpoint(str(tmp_path / "ckpt")) == saved_version
    restored = learner.gather_weights()
    assert all(torch.equal(restored[n], saved[n]) for n in saved)
    # the export is a diffusers transformer directory (a model directory's sana/transformer)
    learner.export_policy(str(tmp_path / "transformer"))
    exported = dict(SanaTransformer2DModel.from_pretrained(tmp_path / "transformer").named_parameters())
    assert all(torch.equal(exported[n].detach(), saved[n]) for n in saved)


TRAIN_PROMPTS = ["a cat", "two red buses on a road", "a blue clock", "a green apple"]
ROUNDS = 12


def test_a_few_updates_make_a_fixed_batch_more_compressible(actors, first_update, tiny_model_dir):
    """Flow-GRPO on JPEG compressibility with a large lr: the mean reward of a fixed batch (fixed AR
    tokens and noise seeds) rises, i.e. its images get smaller as JPEG. 16 images a round: two
    optimizer steps, so the second one runs at ratios away from 1 against the recomputed anchor."""
    ray, decoder, learner = actors
    learner.publish_weights()  # the decoder serves the learner's current weights
    eval_batch = batch_of(tiny_model_dir, PROMPTS, G, seed=5)
    train_batch = batch_of(tiny_model_dir, TRAIN_PROMPTS, G, seed=1)

    def mean_kb() -> float:
        images, _ = ray.get(decoder.decode_sde.remote(eval_batch, 999, SAMPLING))
        return float(np.mean([jpeg_size_kb(image) for image in images.images]))

    before, rewards = mean_kb(), []
    for round_ in range(ROUNDS):
        images, rollout = ray.get(decoder.decode_sde.remote(train_batch, 1000 + 16 * round_, SAMPLING))
        reward = compressibility(images.images)
        rewards.append(float(reward.mean()))
        metrics = learner.train_step(rollout, group_advantages(reward, rollout.group_index, GRPOConfig()))
        assert metrics.optimizer_steps == 2 and metrics.logprob_max_abs_diff < 1e-5
        assert metrics.ratio_max > 1.0 or metrics.ratio_min < 1.0  # the second step sees the first's update
        learner.publish_weights()
    after = mean_kb()
    print(f"fixed batch: {before:.3f} -> {after:.3f} kB; round rewards {[round(r * 500, 3) for r in rewards]}")
    # measured here: 3.727 -> 3.499 kB (-6.1%); the rounds' own rewards -3.730 -> -3.489 kB, almost monotone
    # (with the KL at beta 0.016: 3.727 -> 3.597 kB, -3.5%)
    assert after < 0.96 * before
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3])


def test_decode_sde_is_row_seeded_and_refuses_other_ar_versions(tiny_model_dir):
    """In process: micro-batches of 3 give the rows of one call of 8 (row r: seed + r), the images
    are the decoded final latents, and tokens of another AR version are refused before any work."""
    from rollout.decoder_worker import DecoderVersionError, DiffusionDecoderWorker

    config = DecoderConfig(model=str(tiny_model_dir), num_inference_steps=SAMPLING.steps)
    whole = DiffusionDecoderWorker(config)
    micro = DiffusionDecoderWorker(config.model_copy(update={"micro_batch_size": 3}))
    batch = batch_of(tiny_model_dir, PROMPTS, G, seed=1)
    images, rollout = whole.decode_sde(batch, 100, SAMPLING)
    micro_images, micro_rollout = micro.decode_sde(batch, 100, SAMPLING)
    torch.testing.assert_close(micro_rollout.latents, rollout.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(micro_rollout.log_probs, rollout.log_probs, atol=1e-5, rtol=1e-5)
    assert micro_rollout.seed == rollout.seed == 100 and micro_rollout.group_index == rollout.group_index
    assert_images_close(micro_images.images, images.images)
    assert_images_close(whole.decoder.decode_latents(rollout.latent(SAMPLING.steps)), images.images)
    # the condition is the AR hidden states, as in `decode`
    torch.testing.assert_close(rollout.hidden_states,
                               whole.decoder.ar_hidden_states(batch.prompt_ids, batch.image_tokens), atol=0, rtol=0)
    with pytest.raises(DecoderVersionError, match="decoder serves v0, the tokens were sampled at v1"):
        whole.decode_sde(dataclasses.replace(batch, policy_version=1), 100, SAMPLING)


# ----- LoRA on the transformer (Flow-GRPO's way): a LoRA learner and a LoRA decoder actor ----------

LORA = TransformerLoRAConfig(rank=4, alpha=8.0)
LORA_LR = 0.02
"""One Adam step moves every B entry by ~lr: the adapter is then far from zero (the images move)."""
ADAPTER_PARAMS = 2 * 8 * (4 * 32 + 32 * 4)
"""2 SANA blocks x 8 projections (attn1, attn2: to_q, to_k, to_v, to_out.0), each 32 -> 32:
A [4, 32] + B [32, 4]."""
TRANSFORMER_PARAMS = 51332
"""Every parameter of the tiny SANA transformer (what a full fine-tuning publish sends)."""


def test_transformer_adapter_specs_and_the_unmerged_stream(tiny_model_dir):
    """No actors: the adapter's names and shapes from SANA's directory (meta device) equal those of
    the module; the decoder's stream refuses a bad adapter whole and serves each version beside the
    base weights (W x + s B (A x)), which it never changes."""
    from diffusers import SanaTransformer2DModel

    from policy.lora import module_adapter_specs
    from policy.model_dir import ModelPaths
    from policy.sana_lora import SANA_TARGET_MODULES, transformer_adapter_specs
    from rollout.decoder_weights import transformer_stream

    default = TransformerLoRAConfig()
    assert (default.rank, default.alpha, default.target_modules) == (32, 64.0, SANA_TARGET_MODULES)
    assert default.adapter_config_json("m")["task_type"] is None  # a plain module for peft, not CAUSAL_LM
    directory = ModelPaths(tiny_model_dir).sana_transformer
    specs = transformer_adapter_specs(directory, LORA, torch.float32)
    model = SanaTransformer2DModel.from_pretrained(directory).requires_grad_(False)
    assert specs == module_adapter_specs(model, LORA, torch.float32)
    assert len(specs) == 32 and sum(int(np.prod(s.shape)) for s in specs.values()) == ADAPTER_PARAMS
    key = "base_model.model.transformer_blocks.1.attn2.to_out.0.lora_A.weight"
    assert specs[key].shape == (4, 32) and specs[key.replace("lora_A", "lora_B")].shape == (32, 4)
    with pytest.raises(ValueError, match="match no linear layer"):
        transformer_adapter_specs(directory, TransformerLoRAConfig(target_modules=("q_proj",)), torch.float32)

    contract, served = transformer_stream(model, LORA)
    base = {name: p.clone() for name, p in model.named_parameters()}
    q = "transformer_blocks.0.attn1.to_q"
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))  # [3, 32]
    base_out = model.get_submodule(q)(x)  # version 0: the base layer

    generator = torch.Generator().manual_seed(0)
    adapter = {name: torch.randn(spec.shape, generator=generator) for name, spec in specs.items()}
    assert contract.update(1, adapter, served.load) == 1
    assert contract.update(2, adapter, served.load) == 2  # the same adapter again: the same layer, not twice the update
    a, b = adapter[f"base_model.model.{q}.lora_A.weight"], adapter[f"base_model.model.{q}.lora_B.weight"]
    torch.testing.assert_close(model.get_submodule(q)(x), base_out + 2.0 * (x @ a.T) @ b.T, rtol=0, atol=1e-5)
    with pytest.raises(WeightUpdateError, match="shape"):
        contract.update(3, {**adapter, key: torch.zeros(8, 32)}, served.load)
    with pytest.raises(WeightUpdateError, match="unknown names"):
        contract.update(3, base, served.load)  # a full fine-tuning publish
    assert contract.version == 2 and served.served().keys() == adapter.keys()
    assert all(torch.equal(served.served()[n], adapter[n]) for n in adapter)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())  # never merged into the base


@pytest.fixture(scope="module")
def lora_actors(ray_cluster, tiny_model_dir):
    """A decoder actor serving transformer adapters and a 1-rank LoRA diffusion learner."""
    ray = ray_cluster
    yield from connected_pair(ray, tiny_model_dir, LORA_LR, lora=LORA)


@dataclasses.dataclass
class LoRAUpdate:
    initial: SyncReport
    """The publish of version 0 (the adapter as peft initialised it: B = 0)."""
    eval_images_v0: np.ndarray
    """The fixed ODE batch decoded at adapter v0."""
    rollout: DiffusionRollout
    recomputed: torch.Tensor
    metrics: DiffusionLearnerMetrics
    update: SyncReport
    """The publish of version 1."""
    after: DiffusionRollout
    """Sampled by the decoder serving adapter v1."""
    after_learner: torch.Tensor


@pytest.fixture(scope="module")
def lora_update(lora_actors, tiny_model_dir) -> LoRAUpdate:
    """publish v0 -> sample 8 images -> recompute -> train once -> publish v1 -> sample again."""
    ray, decoder, learner = lora_actors
    initial = learner.publish_weights()
    eval_images = ray.get(decoder.decode.remote(batch_of(tiny_model_dir, PROMPTS, 2, seed=5), 77)).images
    images, rollout = ray.get(decoder.decode_sde.remote(batch_of(tiny_model_dir, PROMPTS, G, seed=1), 100, SAMPLING))
    recomputed = learner.recompute_log_probs(rollout)
    advantages = group_advantages(compressibility(images.images), rollout.group_index, GRPOConfig())
    metrics = learner.train_step(rollout, advantages)
    update = learner.publish_weights()
    _, after = ray.get(decoder.decode_sde.remote(batch_of(tiny_model_dir, PROMPTS, G, seed=2), 200, SAMPLING))
    return LoRAUpdate(initial, eval_images, rollout, recomputed, metrics, update, after,
                      learner.recompute_log_probs(after))


def test_lora_at_step_0_the_learner_recomputes_the_samplers_log_probs(lora_update, first_update):
    """Adapter v0 (B = 0) is the base exactly: the decoder's merge renders the full decoder's images
    (up to float rounding), the learner's log-probs equal the sampler's, the ratio is 1 and the KL
    to the adapter-off reference is 0."""
    run = lora_update
    # two decoder actors, two loads of the same weights: CPU kernels may sum in another order for
    # tensors at other addresses, which moves a uint8 value by at most 1 (assert_images_close)
    assert_images_close(run.eval_images_v0, first_update.eval_images)
    diff = (run.recomputed - run.rollout.log_probs).abs().max().item()
    print(f"LoRA step 0: max |learner - sampler| log-prob {diff:.3g}")
    assert diff < 1e-5, diff
    metrics = run.metrics
    assert metrics.logprob_max_abs_diff < 1e-5
    assert metrics.ratio_min == metrics.ratio_max == metrics.ratio_mean == 1.0
    assert metrics.kl == 0.0 and metrics.clip_fraction == 0.0
    assert (metrics.policy_version, metrics.sampler_version, metrics.optimizer_steps, metrics.rows) == (1, 0, 1, 8)
    assert np.isfinite(metrics.grad_norm) and metrics.grad_norm > 0


def test_lora_publish_sends_only_the_adapter_and_the_decoder_serves_it_unmerged(lora_actors, lora_update,
                                                                               tiny_model_dir):
    from diffusers import SanaTransformer2DModel

    from policy.model_dir import ModelPaths
    from policy.sana_lora import transformer_adapter_specs

    ray, decoder, learner = lora_actors
    run = lora_update
    adapter = learner.gather_weights()
    directory = ModelPaths(tiny_model_dir).sana_transformer
    assert set(adapter) == set(transformer_adapter_specs(directory, LORA, torch.float32))
    assert all(bool(adapter[n].abs().max() > LORA_LR / 2) for n in adapter if "lora_B" in n)  # trained
    # 16 KiB instead of 200 KiB: the adapter only, every publish
    assert run.update.bytes == run.initial.bytes == 4 * ADAPTER_PARAMS == 16384
    base_model = SanaTransformer2DModel.from_pretrained(directory)
    assert sum(p.numel() for p in base_model.parameters()) == TRANSFORMER_PARAMS
    assert run.update.bytes < 4 * TRANSFORMER_PARAMS / 12
    print(f"LoRA publish: {run.update.bytes} bytes (full: {4 * TRANSFORMER_PARAMS}), {run.update.seconds:.3f} s")
    assert (run.update.version, run.update.workers) == (1, 1)
    assert ray.get([decoder.served_decoder_version.remote(), decoder.served_version.remote()]) == [1, 0]
    # the decoder's transformer: the base weights untouched, this adapter served beside them
    served = ray.get(decoder.__ray_call__.remote(
        lambda worker: {n: p.detach().clone() for n, p in worker.decoder.transformer.named_parameters()}))
    base = {n: p.detach() for n, p in base_model.named_parameters()}
    assert served.keys() == base.keys() and all(torch.equal(served[n], base[n]) for n in base)
    served_adapter = ray.get(decoder.served_adapter.remote(TRANSFORMER_STREAM))
    assert served_adapter.keys() == adapter.keys() and all(torch.equal(served_adapter[n], adapter[n]) for n in adapter)
    # ...and the learner's peft forward scores what the decoder sampled
    assert run.after.decoder_version == 1
    diff = (run.after_learner - run.after.log_probs).abs().max().item()
    print(f"LoRA after one update: max |learner - sampler| log-prob {diff:.3g}")
    assert diff < 1e-5, diff
    # a bad adapter (or full weights) is refused whole; v1 keeps serving
    key = "base_model.model.transformer_blocks.0.attn1.to_v.lora_A.weight"
    for bad, says in (({**adapter, key: torch.zeros(8, 32)}, "shape (8, 32)"),
                      ({**adapter, key: torch.full_like(adapter[key], float("nan"))}, "NaN"),
                      (base, "unknown names")):
        with pytest.raises(WeightUpdateError, match=re.escape(says)):
            ray.get(decoder.update_decoder_weights.remote(2, bad))
    assert ray.get(decoder.served_decoder_version.remote()) == 1


def base_logprobs_in_learner_process(rank, rollout: DiffusionRollout) -> torch.Tensor:
    """[S, B] log-probs under SANA's transformer loaded from disk, in the learner rank's own process
    and micro-batches (`recompute_log_probs`'s): same threads and shapes, so the adapter-off
    reference must agree up to float rounding (a second load of the base, at other addresses)."""
    from diffusers import SanaTransformer2DModel

    from rollout.flow_sde import step_log_prob

    base = SanaTransformer2DModel.from_pretrained(rank.paths.sana_transformer, torch_dtype=rank.dtype).to(rank.device)
    micro, parts = rank.config.micro_batch_size, []
    with torch.no_grad():
        for first in range(0, len(rollout), micro):
            part = rollout.select(list(range(first, min(first + micro, len(rollout)))))
            captions = rank._captions(part)
            parts.append(torch.stack([step_log_prob(rank._transition(base, part, captions, t))
                                      for t in part.train_steps]))
    return torch.cat(parts, dim=1)  # [S, B]


def test_lora_reference_is_the_base_transformer_exactly(lora_actors, lora_update):
    ray, _, learner = lora_actors
    run = lora_update
    reference = learner.recompute_log_probs(run.after, reference=True)
    base = ray.get(learner.ranks[0].__ray_call__.remote(base_logprobs_in_learner_process, run.after))
    # not bit for bit: DeepSpeed's copy of the base and a fresh load are separate tensors, and CPU
    # kernels may sum in another order for another alignment; 1e-5 is the bound the sampler and the
    # learner (two processes) already meet, 100x below the adapter's gap asserted next
    torch.testing.assert_close(reference, base, rtol=0, atol=1e-5)
    gap = (reference - run.after_learner).abs().max().item()
    print(f"LoRA v1: max |policy - reference| log-prob {gap:.3g}")
    assert gap > 1e-3  # ...while the adapter is far from zero


def test_lora_merged_export_decodes_the_images_the_decoder_serves(lora_actors, lora_update, tiny_model_dir,
                                                                 tmp_path):
    """export_policy writes the adapter (as the AR learner's LoRA export); `export_merged_transformer`
    folds it into a diffusers transformer (the adapted layers in float32: W + s B A); a model directory
    with that transformer decodes what the decoder serving the published adapter beside its base decodes."""
    import json
    import shutil

    from diffusers import SanaTransformer2DModel

    from policy.lora import lora_keys, read_adapter
    from policy.model_dir import ModelPaths
    from policy.sana_lora import export_merged_transformer
    from rl.checkpoint import policy_digest
    from rollout.decoder_worker import DiffusionDecoderWorker

    ray, decoder, learner = lora_actors
    learner.export_policy(str(tmp_path / "step" / "policy"))
    config = json.loads((tmp_path / "step" / "policy" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8.0, None)
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert learner.weights_digest() == policy_digest(tmp_path / "step" / "policy")
    model_dir = tmp_path / "merged-model"
    shutil.copytree(tiny_model_dir, model_dir, ignore=shutil.ignore_patterns("transformer"))
    export_merged_transformer(tmp_path / "step", model_dir / "sana" / "transformer")
    exported = dict(SanaTransformer2DModel.from_pretrained(model_dir / "sana" / "transformer").named_parameters())
    base = dict(SanaTransformer2DModel.from_pretrained(ModelPaths(tiny_model_dir).sana_transformer).named_parameters())
    adapter = read_adapter(tmp_path / "step" / "policy")[1]
    by_hand = {}
    for key in adapter:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = (adapter[k] for k in lora_keys(module))
            by_hand[f"{module}.weight"] = base[f"{module}.weight"] + LORA.scale * b @ a  # [out, in] float32
    assert exported.keys() == base.keys() and len(by_hand) == 16
    for name, weight in base.items():
        torch.testing.assert_close(exported[name], by_hand.get(name, weight), rtol=0, atol=1e-6)
    assert json.loads((model_dir / "sana" / "transformer" / "merged_lora.json").read_text())[
        "adapted_layers_dtype"] == "float32"
    with pytest.raises(FileExistsError):
        export_merged_transformer(tmp_path / "step", model_dir / "sana" / "transformer")

    eval_batch = batch_of(tiny_model_dir, PROMPTS, 2, seed=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the decoder actor's
    try:
        local = DiffusionDecoderWorker(DecoderConfig(model=str(model_dir), num_inference_steps=SAMPLING.steps))
        images = local.decode(eval_batch, 77).images
    finally:
        torch.set_num_threads(threads)
    # the same weights in two processes (merged here, the adapter beside its base there): equal up to
    # float rounding, which moves a uint8 value by at most 1 (assert_images_close)
    assert_images_close(images, ray.get(decoder.decode.remote(eval_batch, 77)).images)
    assert np.abs(images.astype(int) - lora_update.eval_images_v0.astype(int)).mean() > 0.5  # v1 moved


def test_lora_checkpoint_holds_the_adapter_and_restores_it(lora_actors, lora_update, tmp_path):
    _, _, learner = lora_actors
    version, saved = learner.policy_version(), learner.gather_weights()
    learner.save_checkpoint(str(tmp_path / "ckpt"))
    on_policy = dataclasses.replace(lora_update.after, decoder_version=version)
    advantages = group_advantages(torch.arange(8.0), on_policy.group_index, GRPOConfig())
    first = learner.train_step(on_policy, advantages)
    trained = learner.gather_weights()
    assert any(not torch.equal(trained[n], saved[n]) for n in saved)
    assert learner.load_checkpoint(str(tmp_path / "ckpt")) == version == learner.policy_version()
    restored = learner.gather_weights()
    assert restored.keys() == saved.keys() and all(torch.equal(restored[n], saved[n]) for n in saved)
    # the optimizer state came back too: the same update again gives the same numbers and weights
    second = learner.train_step(on_policy, advantages)
    assert second.losses == first.losses and second.grad_norms == first.grad_norms
    assert all(torch.equal(learner.gather_weights()[n], trained[n]) for n in trained)
    # the module states hold the adapter only (the base is the model directory's), plus its optimizer state
    module = torch.load(next((tmp_path / "ckpt").rglob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    assert len(module) == 32 and all(".lora_" in name for name in module)
    assert list((tmp_path / "ckpt").rglob("*optim_states.pt"))


# ----- an EMA of the adapter (Flow-GRPO's `train.ema`) ---------------------------------------------


@pytest.fixture(scope="module")
def ema_actors(ray_cluster, tiny_model_dir):
    """A LoRA decoder actor and a 1-rank LoRA learner keeping an EMA updated every optimizer step."""
    ray = ray_cluster
    yield from connected_pair(ray, tiny_model_dir, LORA_LR, lora=LORA, ema=EMAConfig(decay=0.9, update_interval=1))


def test_ema_by_hand_in_exports_checkpoints_and_on_the_decoders(ema_actors, tiny_model_dir, tmp_path):
    """Two updates, then the export holds e2 = lerp(lerp(w0, w1, 9/11), w2, 3/4) (d = 2/11, 3/12 after
    steps 1 and 2), the rollouts still sample the trained adapter, a checkpoint round trip restores the
    EMA with its step count, and `serve` puts the EMA on the decoder and then the trained adapter back."""
    from policy.lora import read_adapter
    from rl.checkpoint import policy_digest

    ray, decoder, learner = ema_actors
    learner.publish_weights()

    def exported(name: str) -> dict[str, torch.Tensor]:
        learner.export_policy(str(tmp_path / name))
        assert learner.weights_digest() == policy_digest(tmp_path / name)  # a rollback's proof: the EMA's
        return read_adapter(tmp_path / name)[1]

    def update(seed: int):
        """Sample with the served adapter, train once (8 images: one optimizer step), publish."""
        images, rollout = ray.get(decoder.decode_sde.remote(batch_of(tiny_model_dir, PROMPTS, G, seed=seed),
                                                            100 + seed, SAMPLING))
        metrics = learner.train_step(rollout, group_advantages(compressibility(images.images), rollout.group_index,
                                                               GRPOConfig()))
        assert metrics.optimizer_steps == 1
        learner.publish_weights()
        return rollout

    trained = [learner.gather_weights()]  # w0: B = 0
    assert all(torch.equal(exported("v0")[n], trained[0][n]) for n in trained[0])
    update(1)
    trained.append(learner.gather_weights())
    rollout = update(2)
    trained.append(learner.gather_weights())
    by_hand = {n: trained[0][n] + (9 / 11) * (trained[1][n] - trained[0][n]) for n in trained[0]}
    by_hand = {n: by_hand[n] + 0.75 * (trained[2][n] - by_hand[n]) for n in by_hand}
    ema = exported("v2")
    assert ema.keys() == by_hand.keys()
    for name in by_hand:  # float32 lerp vs the formula: rounding only (entries ~0.02, lr-sized)
        torch.testing.assert_close(ema[name], by_hand[name], rtol=1e-5, atol=1e-7)
    moved = [n for n in by_hand if "lora_B" in n]
    assert all(not torch.equal(ema[n], trained[2][n]) for n in moved)  # the EMA lags the trained adapter
    assert ray.get(decoder.served_decoder_version.remote()) == 2  # rollouts sample the trained adapter

    # a checkpoint round trip: the EMA and its step count come back with the weights and the optimizer
    learner.save_checkpoint(str(tmp_path / "ckpt"))
    on_policy = dataclasses.replace(rollout, decoder_version=learner.policy_version())
    advantages = group_advantages(torch.arange(8.0), on_policy.group_index, GRPOConfig())
    learner.train_step(on_policy, advantages)
    third = exported("v3")
    assert any(not torch.equal(third[n], ema[n]) for n in moved)
    assert learner.load_checkpoint(str(tmp_path / "ckpt")) == 2
    assert all(torch.equal(exported("restored")[n], ema[n]) for n in ema)
    learner.train_step(on_policy, advantages)  # again d = 4/13 (step 3), from the same e2 and w3
    assert all(torch.equal(exported("v3-again")[n], third[n]) for n in third)

    # serving the EMA for an evaluation, then the trained adapter again: each a new version
    learner.publish_weights()  # v3
    for ema_on, version, adapter in ((True, 4, third), (False, 5, learner.gather_weights())):
        report = learner.serve(ema_on)
        assert report.version == version == learner.policy_version()
        assert ray.get(decoder.served_decoder_version.remote()) == version
        now = ray.get(decoder.served_adapter.remote(TRANSFORMER_STREAM))  # beside the base weights
        assert now.keys() == adapter.keys() and all(torch.equal(now[n], adapter[n]) for n in adapter)

