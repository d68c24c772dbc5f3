"""bfloat16 end to end (the GPU configs' precision; this CPU runs bf16 natively): every sampler serves
the learner's policy to within bf16 forward noise, at version 0 and after several published updates.

Two runs on the tiny SANA model, each in one fixture that starts its actors, records the gaps and
ends them (so the two never hold memory at once):
- LoRA, the joint topology: a bf16 vLLM rollout worker serving the AR adapter, a bf16 decoder
  serving the AR adapter (its AR copy conditions SANA) and a SANA transformer adapter, a bf16 AR
  learner and a bf16 diffusion learner, both broadcasting (gloo) into the decoder: two weight
  streams into one worker. Three rounds of sample -> score -> train both -> publish both.
- Full fine-tuning of the AR policy: a bf16 vLLM worker and a bf16 learner publishing whole weights.

Tolerances, each checked against the update's own effect so that agreement is not trivial:
- vLLM vs learner, VLLM_TOLERANCE 1e-2 (max |log-prob| difference per image token): two different
  implementations (vLLM's fused kernels, transformers) round at different places; bf16 keeps 8
  significant bits (2^-9 relative per rounding). Measured here: 4-5e-3 at version 0 (no update yet:
  implementation noise alone) and after updates alike, while each update moves the log-probs by
  more (asserted: 3x the tolerance; measured 0.06-0.17 under LoRA at lr 1e-3, ~1 under full
  fine-tuning).
- decoder vs learner, SAME_OPS_TOLERANCE 1e-4: the decoder runs the learner's own ops (transformers /
  diffusers modules, the adapter added as peft adds it: policy/lora.py UnmergedAdapter), in the same
  dtypes. Measured: 5e-7 (AR copy: fp32 log-softmax of differently batched rows) and 0 (SDE steps).
  A bf16 merge of the adapter (the code before UnmergedAdapter) drifted by 5-6.5e-3 (AR copy, lr
  1e-3) and 8.4e-4 (SDE, Flow-GRPO's lr 3e-4), 8x and more above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from policy.lora import LoRAConfig
from policy.sana_lora import TransformerLoRAConfig
from rewards.compressibility import jpeg_size_kb
from rl.learners.ar_config import LearnerConfig
from rl.learners.diffusion_config import DiffusionLearnerConfig, FlowGRPOConfig
from rl.objectives.grpo import GRPOConfig, group_advantages
from rl.weight_sync import WeightSyncConfig
from rollout.config import RolloutConfig
from rollout.decoder_config import DecoderConfig
from rollout.diffusion_rollout import SdeSampling
from tests.test_lora import decoder_logprobs

pytestmark = pytest.mark.slow

CAPTIONS = ["a red cat", "two dogs"]
G = 4
"""8 rows a round: one optimizer step of each learner."""
ROUNDS = 3
"""Updates published; gaps are measured at versions 0..ROUNDS."""
AR_LR = 1e-3
"""One Adam step moves every adapter entry by ~1e-3: the log-probs move by 0.06 per update."""
DIFFUSION_LR = 3e-4
"""Flow-GRPO's LoRA lr: B entries ~3e-4 per update, the size a bf16 merge rounds mostly away."""
AR_LORA = LoRAConfig(rank=4, alpha=8.0)
TRANSFORMER_LORA = TransformerLoRAConfig(rank=4, alpha=8.0)
SAMPLING = SdeSampling(steps=4, noise_level=0.7)
BROADCAST = WeightSyncConfig(transport="broadcast", timeout_s=120)
VLLM_TOLERANCE = 1e-2
SAME_OPS_TOLERANCE = 1e-4


@dataclass
class Gaps:
    """Max |learner - sampler| log-prob of each version's samples (index = version)."""

    vllm: list[float] = field(default_factory=list)
    """AR: vLLM's processed log-probs vs the AR learner's, per image token."""
    effect: list[float] = field(default_factory=list)
    """AR: the learner with its update vs without (the adapter off / the weights on disk)."""
    decoder_ar: list[float] = field(default_factory=list)
    """AR: the decoder's AR copy vs the AR learner."""
    sde: list[float] = field(default_factory=list)
    """Diffusion: the decoder's SDE step log-probs vs the diffusion learner's recomputation."""
    sde_versions: list[int] = field(default_factory=list)
    """Transformer version each SDE rollout was sampled with."""


def rewards(images: np.ndarray) -> torch.Tensor:
    """-JPEG kB / 500 per image (Flow-GRPO's compressibility): one reward for both policies."""
    return torch.tensor([-jpeg_size_kb(image) / 500 for image in images])


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def rollout_actor(ray, model_dir, tmp_path_factory, lora: LoRAConfig | None):
    from rollout.ar_worker import ARRolloutActor

    return ARRolloutActor.options(num_cpus=1).remote(RolloutConfig(
        model=str(model_dir), dtype="bfloat16", kv_cache_gib=0.25, max_model_len=256, num_threads=1, lora=lora,
        adapter_dir=str(tmp_path_factory.mktemp("adapters"))))


def ar_learner(model_dir, lora: LoRAConfig | None):
    from rl.learners.group import LearnerGroup

    # beta > 0: the learner keeps the reference (the base) to measure the update's effect against
    return LearnerGroup(LearnerConfig(
        model=str(model_dir), world_size=1, zero_stage=1, precision="bf16", micro_batch_size=len(CAPTIONS) * G,
        lr=AR_LR, torch_threads=1, grpo=GRPOConfig(beta=0.01), lora=lora, sync=BROADCAST), timeout_s=600)


@pytest.fixture(scope="module")
def lora_gaps(ray_cluster, tiny_model_dir, tmp_path_factory) -> Gaps:
    from rl.learners.diffusion_learner import DiffusionLearnerGroup
    from rollout.decoder_worker import decoder_actor

    ray = ray_cluster
    vllm = rollout_actor(ray, tiny_model_dir, tmp_path_factory, AR_LORA)
    decoder = decoder_actor(DecoderConfig(model=str(tiny_model_dir), dtype="bfloat16", num_inference_steps=SAMPLING.steps,
                                          num_threads=1, num_cpus=0.5, lora=AR_LORA, transformer_lora=TRANSFORMER_LORA))
    learners = []
    try:
        learner = ar_learner(tiny_model_dir, AR_LORA)
        learners.append(learner)
        diffusion = DiffusionLearnerGroup(DiffusionLearnerConfig(
            model=str(tiny_model_dir), world_size=1, zero_stage=1, precision="bf16", micro_batch_size=4,
            gradient_accumulation_steps=2, lr=DIFFUSION_LR, torch_threads=1, sampling=SAMPLING,
            flow=FlowGRPOConfig(beta=0.0), lora=TRANSFORMER_LORA, sync=BROADCAST), timeout_s=600)
        learners.append(diffusion)
        learner.connect_workers([vllm, decoder])  # the decoder joins the AR group...
        diffusion.connect_workers([decoder])  # ...and the transformer's, keeping both
        learner.publish_weights()
        diffusion.publish_weights()
        gaps = Gaps()
        for version in range(ROUNDS + 1):
            batch = ray.get(vllm.generate.remote(CAPTIONS, G, 100 + version), timeout=300)
            logprobs = learner.logprobs(batch)  # [8, N]
            gaps.vllm.append(max_gap(logprobs, batch.logprobs))
            gaps.effect.append(max_gap(logprobs, learner.logprobs(batch, reference=True)))
            gaps.decoder_ar.append(max_gap(logprobs, ray.get(decoder.__ray_call__.remote(decoder_logprobs, batch),
                                                             timeout=120)))
            images, rollout = ray.get(decoder.decode_sde.remote(batch, 200 + version, SAMPLING), timeout=300)
            gaps.sde.append(max_gap(diffusion.recompute_log_probs(rollout), rollout.log_probs))
            gaps.sde_versions.append(rollout.decoder_version)
            if version == ROUNDS:
                break
            reward = rewards(images.images)
            learner.train_step(batch, group_advantages(reward, batch.group_index, GRPOConfig()))
            diffusion.train_step(rollout, group_advantages(reward, rollout.group_index, GRPOConfig()))
            learner.publish_weights()
            diffusion.publish_weights()
        print(f"bf16 LoRA gaps by version: {gaps}")
        return gaps
    finally:
        for group in learners:
            group.shutdown()
        ray.kill(vllm)
        ray.kill(decoder)


def test_vllm_serves_the_bf16_learners_adapter_before_and_after_updates(lora_gaps):
    assert len(lora_gaps.vllm) == ROUNDS + 1
    assert max(lora_gaps.vllm) < VLLM_TOLERANCE, lora_gaps.vllm
    assert lora_gaps.effect[0] == 0.0  # version 0: B = 0, the adapter is the base exactly
    assert min(lora_gaps.effect[1:]) > 3 * VLLM_TOLERANCE, lora_gaps.effect  # each update moved the policy


def test_the_decoders_ar_copy_is_the_bf16_learners_policy_after_updates(lora_gaps):
    """The decoder serves the AR adapter beside its base weights: the learner's own function."""
    assert max(lora_gaps.decoder_ar) < SAME_OPS_TOLERANCE, lora_gaps.decoder_ar


def test_the_decoders_sde_logprobs_are_the_bf16_diffusion_learners_after_updates(lora_gaps):
    """Flow-GRPO's per-step log-probs of the decoder's samples, recomputed by the diffusion learner,
    with the transformer adapter at versions 0..3 (published over the second broadcast stream)."""
    assert lora_gaps.sde_versions == list(range(ROUNDS + 1))
    assert max(lora_gaps.sde) < SAME_OPS_TOLERANCE, lora_gaps.sde


@pytest.fixture(scope="module")
def full_gaps(ray_cluster, tiny_model_dir, tmp_path_factory) -> Gaps:
    """Full fine-tuning: whole bf16 weights published to vLLM (broadcast, streamed into its reload)."""
    ray = ray_cluster
    vllm = rollout_actor(ray, tiny_model_dir, tmp_path_factory, None)
    learner = None
    try:
        learner = ar_learner(tiny_model_dir, None)
        learner.connect_workers([vllm])
        learner.publish_weights()
        gaps = Gaps()
        for version in range(ROUNDS + 1):
            batch = ray.get(vllm.generate.remote(CAPTIONS, G, 100 + version), timeout=300)
            logprobs = learner.logprobs(batch)
            gaps.vllm.append(max_gap(logprobs, batch.logprobs))
            gaps.effect.append(max_gap(logprobs, learner.logprobs(batch, reference=True)))
            if version == ROUNDS:
                break
            reward = torch.arange(len(batch), dtype=torch.float32)  # AR only: no images needed
            learner.train_step(batch, group_advantages(reward, batch.group_index, GRPOConfig()))
            learner.publish_weights()
        print(f"bf16 full fine-tuning gaps by version: {gaps}")
        return gaps
    finally:
        if learner is not None:
            learner.shutdown()
        ray.kill(vllm)


def test_vllm_serves_the_bf16_learners_full_weights_before_and_after_updates(full_gaps):
    assert max(full_gaps.vllm) < VLLM_TOLERANCE, full_gaps.vllm
    assert full_gaps.effect[0] == 0.0
    assert min(full_gaps.effect[1:]) > 3 * VLLM_TOLERANCE, full_gaps.effect
