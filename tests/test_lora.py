"""LoRA GRPO: the learner trains a peft adapter, publishes only it, the vLLM rollout worker serves it
as a LoRARequest per version and the SANA decoder serves it beside its AR copy (never merged: a
bfloat16 merge loses most of a small update, measured here by hand at the size of SANA's layers).

One learner (1 rank, ZeRO-1), one LoRA vLLM actor and one decoder actor are shared by the module
(`lora_run` runs the publish -> sample -> update -> publish -> sample sequence once, with an adapter
on every projection and on the head, as the CPU demo); the tests then check its records and
continue from its state, in file order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from policy.loading import load_ar_model
from policy.logprobs import ImageTokenLogits, codebook_token_logprobs, sequence_image_logprobs
from policy.lora import AdaptedHeadImageLogits, LoRAConfig, adapter_specs, vllm_max_lora_rank
from policy.model_dir import ModelPaths, resolve_model_dir
from policy.weights import WeightUpdateError
from rl.learners.ar_config import LearnerConfig
from rl.objectives.grpo import GroupAdvantages, GRPOConfig, group_advantages
from rl.run.config import ConfigError, load_config
from rl.weight_sync import SyncReport, WeightSyncConfig
from rollout.records import RolloutBatch

CAPTIONS = ["a red cat", "two dogs", "a blue clock on a wall"]
G = 4
REWARDS = [1.0, 0.0, 0.5, 0.2, 0.3, 0.9, 0.1, 0.6, 0.0, 1.0, 1.0, 0.0]
TOLERANCE = 1e-4
LORA = LoRAConfig(rank=4, alpha=8.0)  # rank 4: vLLM rounds max_lora_rank up to 8
LORA_HEAD = LoRAConfig(rank=4, alpha=8.0, target_modules=(*LORA.target_modules, "lm_head"))
"""The shared run's adapter: the seven projections and the output head (as the CPU demo)."""
CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "configs"


# ----- config (no models) ---------------------------------------------------------------------

def test_run_config_copies_learner_lora_to_every_worker_and_refuses_a_mismatch(tmp_path):
    config = load_config(CONFIGS / "tiny-cpu-glyph-ocr-lora.yaml")
    assert config.learner.lora == LoRAConfig(rank=16, alpha=32.0, target_modules=(*LORA.target_modules, "lm_head"))
    assert config.rollout.engine.lora == config.decoder.decoder.lora == config.learner.lora
    raw = yaml.safe_load((CONFIGS / "tiny-cpu-glyph-ocr-lora.yaml").read_text())
    raw["rollout"]["engine"]["lora"] = {"rank": 8}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="rollout.engine.lora .* must equal learner.lora"):
        load_config(tmp_path / "a.yaml")
    raw = yaml.safe_load((CONFIGS / "tiny-cpu-glyph-ocr-lora.yaml").read_text())
    raw["learner"]["lora"]["dropout"] = 0.1
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="dropout must be 0"):
        load_config(tmp_path / "b.yaml")
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 16, 17)] == [1, 8, 8, 16, 32]


def test_adapter_specs_name_every_targeted_projection_in_peft_format(tiny_model_dir):
    """2 layers x 7 projections x (A, B), shapes from the model's widths (hidden 128, 4 heads x 32,
    2 KV heads, MLP 256), so the workers know exactly what a publish must hold."""
    specs = adapter_specs(ModelPaths(tiny_model_dir).ar, LORA, torch.float32)
    assert len(specs) == 2 * 7 * 2
    q_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert specs[q_a].shape == (4, 128)
    assert specs[q_a.replace("lora_A", "lora_B")].shape == (4 * 32, 4)
    assert specs["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (2 * 32, 4)
    assert specs["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 256)
    only_q = adapter_specs(ModelPaths(tiny_model_dir).ar, LoRAConfig(rank=2, target_modules=("q_proj",)),
                           torch.float32)
    assert sorted(only_q) == sorted(f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{m}.weight"
                                    for i in (0, 1) for m in "AB")


def test_an_adapter_on_the_head_covers_the_whole_vocabulary_and_a_tied_head_is_refused(tiny_model_dir, tmp_path):
    """lm_head [V, 128] gets A [r, 128] and B [V, r] (vLLM's LogitsProcessorWithLoRA adds B A h over
    the whole vocabulary); a model whose head is its input embedding has no head of its own to merge into."""
    import json

    ar = ModelPaths(tiny_model_dir).ar
    config = json.loads((ar / "config.json").read_text())
    specs = adapter_specs(ar, LORA_HEAD, torch.float32)
    assert len(specs) == 2 * 7 * 2 + 2
    assert specs["base_model.model.lm_head.lora_A.weight"].shape == (4, 128)
    assert specs["base_model.model.lm_head.lora_B.weight"].shape == (config["vocab_size"], 4)
    tied = tmp_path / "tied"  # the same model with its head tied (only the config is read)
    tied.mkdir()
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    assert len(adapter_specs(tied, LORA, torch.float32)) == 2 * 7 * 2  # the projections alone are fine
    with pytest.raises(ValueError, match="ties its head to the input embedding"):
        adapter_specs(tied, LORA_HEAD, torch.float32)
    with pytest.raises(ValueError, match="not embed_tokens"):
        LoRAConfig(target_modules=("q_proj", "embed_tokens"))


def test_adapted_head_logits_are_the_peft_models_and_the_base_with_the_adapter_off(tiny_model_dir):
    """`AdaptedHeadImageLogits` (image rows of W + s B A, never the full [V] logits) gives the
    numbers of the peft model's own forward through its LoRA head, and with the adapter switched
    off (the KL reference) the base model's up to float rounding (two loads of the base)."""
    from peft import get_peft_model

    from policy.loading import load_tokenizer, load_vocab
    from policy.logprobs import sequence_logits
    from policy.prompt import rollout_prompt_ids

    paths = ModelPaths(tiny_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    prompts = [rollout_prompt_ids(tokenizer, c) for c in CAPTIONS]
    tokens = vocab.to_token_ids(torch.randint(0, vocab.codebook_size, (len(prompts), vocab.tokens_per_image),
                                              generator=torch.Generator().manual_seed(0)))  # [3, N]
    peft_model = get_peft_model(load_ar_model(paths), LORA_HEAD.peft_config())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if ".lora_" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        lm = peft_model.base_model.model
        head = AdaptedHeadImageLogits(lm, vocab).image_logits(prompts, tokens, tokenizer.pad_token_id)  # [3, N, K]
        full, _ = sequence_logits(lm, prompts, tokens, tokenizer.pad_token_id)  # [3, N, V]
        torch.testing.assert_close(head, full[..., vocab.image_token_start : vocab.image_token_end], rtol=1e-5,
                                   atol=1e-5)
        skipping = ImageTokenLogits(lm, vocab).image_logits(prompts, tokens, tokenizer.pad_token_id)
        assert float((head - skipping).abs().max()) > 0.1  # the head's adapter moves the logits
        with peft_model.disable_adapter():
            off = AdaptedHeadImageLogits(lm, vocab).image_logits(prompts, tokens, tokenizer.pad_token_id)
        base = ImageTokenLogits(load_ar_model(paths), vocab).image_logits(prompts, tokens, tokenizer.pad_token_id)
    # two loads of the base: other addresses may take other CPU kernel paths (summation orders,
    # ~1e-7 relative); the adapter moves these logits by more than 0.1
    torch.testing.assert_close(off, base, rtol=1e-5, atol=1e-5)


def test_a_bf16_merge_loses_a_small_update_and_the_unmerged_adapter_serves_the_learners_layer():
    """A 2240 x 2240 bf16 layer (SANA 1.6B's width; weights ~ N(0, 0.02)), rank 32, alpha 64, A as
    peft initialises it (U(+-1/sqrt(2240))), B ~ N(0, b^2) for b = 1e-4, 3e-4, 1e-3 (a few Adam steps
    at Flow-GRPO's lr 3e-4), the learner's layer in bf16 as DeepSpeed casts it.

    Weights, by hand: a bf16 merge keeps round_bf16(W + dW) - W of dW = s B A. W is on bf16's grid,
    so an entry of dW under half a unit in the last place of its W (|W| 2^-9) rounds back to W:
    lost = ||kept - dW|| / ||dW|| is 0.86 / 0.61 / 0.24. The export's float32 merge keeps all of it.
    Outputs, on 64 inputs: the decoder's `UnmergedAdapter` gives the learner's peft layer (bit for bit
    here; asserted to 1% of the learner's output update, as separate tensors may take other CPU kernel
    paths), the bf16-merged layer misses a multiple of that update (2.8 / 1.3 / 0.47)."""
    from peft import get_peft_model

    from policy.lora import UnmergedAdapter, lora_keys, module_adapter_specs

    width, lora = 2240, LoRAConfig(rank=32, alpha=64.0, target_modules=("proj",))

    def layer() -> torch.nn.Module:
        module = torch.nn.Module()
        module.proj = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            module.proj.weight.copy_(0.02 * torch.randn(width, width, generator=torch.Generator().manual_seed(0)))
        return module.bfloat16()

    torch.manual_seed(1)  # peft's A
    learner = get_peft_model(layer(), lora.peft_config()).bfloat16().base_model.model.proj
    base, served = layer(), layer()
    adapter = UnmergedAdapter(served, module_adapter_specs(served, lora, torch.bfloat16), lora)
    x = torch.randn(64, width, generator=torch.Generator().manual_seed(2)).bfloat16()  # [64, 2240]
    w = base.proj.weight.detach().double()  # [out, in], bf16 values
    lost, missed, unmerged_missed = [], [], []
    for b in (1e-4, 3e-4, 1e-3):
        with torch.no_grad():
            learner.lora_B["default"].weight.copy_(b * torch.randn(width, 32, generator=torch.Generator().manual_seed(3)))
        published = {key: getattr(learner, f"lora_{m}")["default"].weight.detach().clone()
                     for key, m in zip(lora_keys("proj"), "AB")}  # PEFT names, bf16 as a bf16 learner publishes
        key_a, key_b = lora_keys("proj")
        update = lora.scale * published[key_b].double() @ published[key_a].double()  # dW = s B A [out, in]
        merged = (w + update).to(torch.bfloat16)  # the old decoder's merge
        lost.append(float(((merged.double() - w) - update).norm() / update.norm()))
        float32_merge = (w.float() + update.float()).double()  # the export's
        assert float(((float32_merge - w) - update).norm() / update.norm()) < 1e-3
        adapter.load(iter(published.items()))
        with torch.no_grad():
            learner_out, served_out, base_out = learner(x), served.proj(x), base.proj(x)  # [64, 2240] bf16
            merged_out = torch.nn.functional.linear(x, merged)
        learner_update = learner_out.double() - base_out.double()  # [64, 2240]

        def miss(out: torch.Tensor) -> float:
            return float(((out.double() - base_out.double()) - learner_update).norm() / learner_update.norm())

        missed.append(miss(merged_out))
        unmerged_missed.append(miss(served_out))
    print(f"bf16 merge: update lost {[round(v, 3) for v in lost]}, learner's output update missed "
          f"{[round(v, 2) for v in missed]}; unmerged: adapter kept whole, output update missed {unmerged_missed}")
    assert lost == pytest.approx([0.86, 0.61, 0.24], abs=0.02)
    assert missed[0] > 1.0 and missed[1] > 0.5 and missed[2] > 0.2
    assert max(unmerged_missed) < 0.01


def test_a_merged_export_of_a_bf16_model_holds_the_update_in_float32_layers(tiny_model_dir, tmp_path):
    """`blip3o-rl export --merge` on a bfloat16 base: the adapted layers are W + s B A in float32,
    exactly (a bf16 merge would lose a good part of this small update: B ~3e-4); every other tensor
    is the base's, still bfloat16."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from policy.lora import export_merged, lora_keys, write_adapter

    base_dir = tmp_path / "bf16-base"
    shutil.copytree(tiny_model_dir, base_dir)
    for shard in (base_dir / "ar").glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(shard).items()}, str(shard), metadata={"format": "pt"})
    base = {k: v for shard in (base_dir / "ar").glob("*.safetensors") for k, v in load_file(shard).items()}
    generator = torch.Generator().manual_seed(0)
    adapter = {key: (3e-4 if "lora_B" in key else 0.1) * torch.randn(spec.shape, generator=generator)
               for key, spec in adapter_specs(base_dir / "ar", LORA, torch.float32).items()}
    write_adapter(tmp_path / "adapter", LORA, adapter, str(base_dir))
    export_merged(tmp_path / "adapter", tmp_path / "merged")
    merged = {k: v for shard in (tmp_path / "merged" / "ar").glob("*.safetensors") for k, v in load_file(shard).items()}
    assert merged.keys() == base.keys()
    adapted, lost_in_bf16 = set(), []
    for key in adapter:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            key_a, key_b = lora_keys(module)
            update = LORA.scale * adapter[key_b] @ adapter[key_a]  # [out, in] float32
            name = f"{module}.weight"
            assert merged[name].dtype == torch.float32
            assert torch.equal(merged[name], base[name].float() + update)
            kept_in_bf16 = (base[name].float() + update).bfloat16().float() - base[name].float()
            lost_in_bf16.append(float((kept_in_bf16 - update).norm() / update.norm()))
            adapted.add(name)
    print(f"a bf16 export would lose {min(lost_in_bf16):.2f}-{max(lost_in_bf16):.2f} of each layer's update")
    assert len(adapted) == 2 * 7 and min(lost_in_bf16) > 0.1  # what a bf16 export would have lost
    assert all(merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], base[k]) for k in base if k not in adapted)
    assert json.loads((tmp_path / "merged" / "merged_lora.json").read_text())["adapted_layers_dtype"] == "float32"


def test_adapter_folders_of_dead_workers_are_removed(tmp_path):
    """A killed rollout actor never cleans up: the next worker removes folders of dead pids only."""
    import os

    from rollout.ar_worker import ADAPTER_DIR_PREFIX, remove_orphaned_adapter_dirs

    dead, alive = tmp_path / f"{ADAPTER_DIR_PREFIX}999999999-abc", tmp_path / f"{ADAPTER_DIR_PREFIX}{os.getpid()}-def"
    for directory in (dead, alive, tmp_path / "other"):
        (directory / "v1-1").mkdir(parents=True)
    remove_orphaned_adapter_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "other"])


@pytest.mark.parametrize("lora", [LORA, LORA_HEAD], ids=["projections", "projections+head"])
def test_gradient_checkpointing_gives_the_adapter_the_same_gradients(tiny_model_dir, lora):
    """peft's LoRA layers under transformers' non-reentrant checkpointing (the learner's
    `gradient_checkpointing`) and `ImageTokenLogits` (`AdaptedHeadImageLogits` with the head
    adapted): the adapter gets the gradients it gets without checkpointing, every one non-zero,
    and the frozen base none."""
    from peft import get_peft_model

    from policy.loading import load_tokenizer, load_vocab
    from policy.prompt import rollout_prompt_ids

    paths = ModelPaths(tiny_model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    prompts = [rollout_prompt_ids(tokenizer, c) for c in CAPTIONS]
    codes = torch.randint(0, vocab.codebook_size, (len(prompts), vocab.tokens_per_image),
                          generator=torch.Generator().manual_seed(0))  # [3, N]
    grads = []
    for checkpointing in (False, True):
        model = load_ar_model(paths).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = get_peft_model(model, lora.peft_config())
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the same adapter both times, B non-zero so A gets gradients too
            for name, param in sorted(peft_model.named_parameters()):
                if ".lora_" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        head = (AdaptedHeadImageLogits if lora.adapts_head else ImageTokenLogits)(peft_model.base_model.model, vocab)
        logits = head.image_logits(prompts, vocab.to_token_ids(codes), tokenizer.pad_token_id)  # [3, N, K]
        codebook_token_logprobs(logits, codes).sum().backward()
        assert all(p.grad is None for p in head.parameters() if not p.requires_grad)
        grads.append({name: p.grad for name, p in head.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2 + 2 * lora.adapts_head
    for name, grad in grads[0].items():
        assert bool(grad.abs().max() > 0), name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-8)

# ----- the shared run: learner + vLLM + SANA decoder ------------------------------------------

def base_logprobs_in_learner_process(rank, batch: RolloutBatch) -> torch.Tensor:
    """The base model from disk scored in the learner rank's own process, micro-batch for
    micro-batch as `LearnerRank.logprobs` does: same threads and shapes, so the reference must
    agree up to float rounding (a second load of the base, whose tensors sit at other addresses)."""
    from rl.learners.ar_learner import plan_epoch

    head = ImageTokenLogits(load_ar_model(rank.paths).train(), rank.vocab)
    plan = plan_epoch(list(range(len(batch))), rank.world, rank.rank, rank.config.micro_batch_size, 1, seed=0)
    out = torch.zeros(batch.logprobs.shape)
    with torch.no_grad():
        for mb in (mb for step in plan for mb in step.micro_batches):
            tokens = batch.image_tokens[mb.rows]
            logits = head.image_logits([batch.prompt_ids[r] for r in mb.rows], tokens, rank.pad_id)
            out[mb.rows] = codebook_token_logprobs(logits, rank.vocab.to_codebook(tokens))
    return out


def decoder_logprobs(worker, batch: RolloutBatch) -> torch.Tensor:
    """Log-probs under the AR copy a SANA decoder worker conditions on (its base weights with the
    served adapter beside them)."""
    decoder = worker.decoder
    with torch.no_grad():
        return sequence_image_logprobs(decoder.ar, batch.prompt_ids, batch.image_tokens, decoder.vocab,
                                       decoder.pad_id)


@dataclass
class LoRARun:
    learner: object
    ar: object
    decoder: object
    before: RolloutBatch
    """Sampled by vLLM serving the version-0 adapter."""
    before_learner: torch.Tensor
    update_report: SyncReport
    initial_report: SyncReport
    after: RolloutBatch
    """Sampled by vLLM serving the adapter after one update."""
    after_learner: torch.Tensor
    advantages: GroupAdvantages
    kl_at_first_update: float


@pytest.fixture(scope="module")
def lora_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    from rl.learners.group import LearnerGroup
    from rollout.ar_worker import ARRolloutActor
    from rollout.config import RolloutConfig
    from rollout.decoder_config import DecoderConfig
    from rollout.decoder_worker import decoder_actor

    ray = ray_cluster
    ar = ARRolloutActor.options(num_cpus=1).remote(RolloutConfig(
        model=str(tiny_model_dir), kv_cache_gib=0.25, max_model_len=256, num_threads=1, lora=LORA_HEAD,
        adapter_dir=str(tmp_path_factory.mktemp("adapters"))))  # a killed actor leaves its folder: not in /dev/shm
    decoder = decoder_actor(DecoderConfig(model=str(tiny_model_dir), num_inference_steps=2, num_cpus=0.5,
                                          lora=LORA_HEAD))
    # lr 0.05: one Adam step moves every B entry by ~0.05, so the adapter is far from zero afterwards
    learner = LearnerGroup(LearnerConfig(
        model=str(tiny_model_dir), world_size=1, zero_stage=1, micro_batch_size=len(CAPTIONS) * G, lr=0.05,
        torch_threads=1, grpo=GRPOConfig(beta=0.01), lora=LORA_HEAD), timeout_s=600)
    try:
        learner.connect_workers([ar, decoder], WeightSyncConfig(transport="shared_memory", timeout_s=300))
        initial = learner.publish_weights()  # version 0: the adapter as peft initialised it (B = 0)
        before = ray.get(ar.generate.remote(CAPTIONS, G, 7), timeout=300)
        before_learner = learner.logprobs(before)
        advantages = group_advantages(torch.tensor(REWARDS), before.group_index, GRPOConfig())
        metrics = learner.train_step(before, advantages)
        report = learner.publish_weights()
        after = ray.get(ar.generate.remote(CAPTIONS, G, 8), timeout=300)
        yield LoRARun(learner, ar, decoder, before, before_learner, report, initial, after, learner.logprobs(after),
                      advantages, metrics.kl)
    finally:
        learner.shutdown()
        ray.kill(ar)
        ray.kill(decoder)


@pytest.mark.slow
def test_learner_logprobs_equal_vllm_serving_the_adapter_before_and_after_an_update(lora_run):
    run = lora_run
    assert run.before.policy_version == 0 and run.after.policy_version == 1
    assert float((run.before_learner - run.before.logprobs).abs().max()) < TOLERANCE
    assert float((run.after_learner - run.after.logprobs).abs().max()) < TOLERANCE
    # the update really moved the served policy: the base model no longer fits vLLM's numbers
    base_now = run.learner.logprobs(run.after, reference=True)
    assert float((base_now - run.after.logprobs).abs().max()) > 100 * TOLERANCE
    assert run.kl_at_first_update == pytest.approx(0.0, abs=1e-7)  # version 0 is the base model exactly


@pytest.mark.slow
def test_reference_is_the_base_model_exactly_with_the_adapter_switched_off(lora_run):
    import ray

    run = lora_run
    reference = run.learner.logprobs(run.after, reference=True)
    base = ray.get(run.learner.ranks[0].__ray_call__.remote(base_logprobs_in_learner_process, run.after), timeout=300)
    # not bit for bit: DeepSpeed's copy of the base and a fresh load are separate tensors, and CPU
    # kernels may sum in another order for another alignment (~1e-7 relative, log-probs ~ -7); the
    # adapter moves the policy away from the reference by more than 100 * TOLERANCE (the test above)
    torch.testing.assert_close(reference, base, rtol=0, atol=1e-5)
    assert float((reference - run.after_learner).abs().max()) > 1e-3  # ...while the adapter is non-zero


@pytest.mark.slow
def test_a_publish_sends_only_the_adapter_and_every_worker_serves_its_version(lora_run, tiny_model_dir):
    import ray

    run = lora_run
    adapter = run.learner.gather_weights()
    assert set(adapter) == set(adapter_specs(ModelPaths(tiny_model_dir).ar, LORA_HEAD, torch.float32))
    assert all(bool(adapter[name].abs().max() > 0.01) for name in adapter if "lora_B" in name)  # trained
    assert run.update_report.bytes == run.initial_report.bytes == sum(t.numel() * 4 for t in adapter.values())
    full_bytes = sum(t.numel() * 4 for t in load_ar_model(ModelPaths(tiny_model_dir)).parameters())
    assert run.update_report.bytes < full_bytes / 10
    assert run.update_report.version == 1 and run.update_report.workers == 2
    assert ray.get([run.ar.served_version.remote(), run.decoder.served_version.remote()]) == [1, 1]
    assert ray.get(run.ar.served_adapter.remote()).startswith("policy-v1-")
    served_dirs = ray.get(run.ar.__ray_call__.remote(lambda w: sorted(p.name for p in w._adapter_root.iterdir())))
    assert len(served_dirs) == 1 and served_dirs[0].startswith("v1-")  # version 0's folder is gone
    # the base weights are bit-identical to the model directory's, in the learner...
    on_disk = load_ar_model(ModelPaths(tiny_model_dir)).state_dict()
    base = run.learner.gather_base_weights()
    assert base.keys() == on_disk.keys() and all(torch.equal(base[k], on_disk[k]) for k in on_disk)
    # ...and the decoder's AR copy is the base with this adapter beside it (same numbers as the learner)
    decoded_with = ray.get(run.decoder.__ray_call__.remote(decoder_logprobs, run.after), timeout=120)
    assert float((decoded_with - run.after_learner).abs().max()) < TOLERANCE


@pytest.mark.slow
def test_a_bad_adapter_is_refused_and_the_served_version_keeps_serving(lora_run, tiny_model_dir):
    import ray

    run = lora_run
    adapter = run.learner.gather_weights()
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    wrong_rank = {**adapter, name: torch.zeros(8, adapter[name].shape[1])}
    nan = {**adapter, name: torch.full_like(adapter[name], float("nan"))}
    full_weights = load_ar_model(ModelPaths(tiny_model_dir)).state_dict()  # what a full fine-tuning publish sends
    for bad, says in ((wrong_rank, f"{name}: shape (8, 128)"), (nan, f"{name}: contains NaN"),
                      (full_weights, "unknown names")):
        for worker in (run.ar, run.decoder):
            with pytest.raises(WeightUpdateError, match="weight update refused") as refused:
                ray.get(worker.update_weights.remote(2, bad), timeout=120)
            assert says in str(refused.value)
    with pytest.raises(WeightUpdateError, match="older than the served 1"):
        ray.get(run.ar.update_weights.remote(0, adapter), timeout=120)
    assert ray.get([run.ar.served_version.remote(), run.decoder.served_version.remote()]) == [1, 1]
    again = ray.get(run.ar.generate.remote(CAPTIONS, G, 8), timeout=300)
    assert again.policy_version == 1 and torch.equal(again.image_tokens, run.after.image_tokens)


@pytest.mark.slow
def test_resume_of_a_lora_learner_is_exact_and_its_checkpoint_holds_only_the_adapter(lora_run, tmp_path):
    run = lora_run
    learner = run.learner
    version, saved = learner.policy_version(), learner.gather_weights()
    learner.save_checkpoint(str(tmp_path / "learner"))
    first = learner.train_step(run.after, run.advantages)
    trained = learner.gather_weights()
    assert learner.load_checkpoint(str(tmp_path / "learner")) == version == learner.policy_version()
    restored = learner.gather_weights()
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    second = learner.train_step(run.after, run.advantages)
    assert second.losses == first.losses and second.grad_norms == first.grad_norms
    assert all(torch.equal(learner.gather_weights()[k], trained[k]) for k in trained)
    assert not torch.equal(trained[next(iter(trained))], saved[next(iter(saved))])
    # the module states hold the adapter only (the base is the model directory's), plus its optimizer state
    module = torch.load(next((tmp_path / "learner").rglob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    assert module and all(".lora_" in name for name in module)
    assert list((tmp_path / "learner").rglob("*optim_states.pt"))


@pytest.mark.slow
def test_merged_export_reproduces_the_adapters_logprobs(lora_run, tmp_path, tiny_model_dir, capsys):
    from deploy.cli import main as cli_main

    run = lora_run
    run.learner.export_policy(str(tmp_path / "step-000001" / "policy"))  # as a checkpoint holds it
    cli_main(["export", "--merge", str(tmp_path / "step-000001"), str(tmp_path / "merged")])
    assert "wrote the merged model directory" in capsys.readouterr().out
    paths = resolve_model_dir(str(tmp_path / "merged"))  # our layout: the loaders and vLLM read it as any model dir
    assert paths.layout() == ModelPaths(tiny_model_dir).layout() and paths.sana_transformer.is_dir()
    expected = run.learner.logprobs(run.after)  # the learner's adapter now (after the resume test's update)
    with torch.no_grad():
        merged = sequence_image_logprobs(load_ar_model(paths), run.after.prompt_ids, run.after.image_tokens,
                                         *_vocab_and_pad(paths))
    assert float((merged - expected).abs().max()) < TOLERANCE
    with pytest.raises(SystemExit) as exit_info:  # an existing output is never overwritten
        cli_main(["export", "--merge", str(tmp_path / "step-000001"), str(tmp_path / "merged")])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err


def _vocab_and_pad(paths: ModelPaths):
    from policy.loading import load_tokenizer, load_vocab

    tokenizer = load_tokenizer(paths)
    return load_vocab(paths, tokenizer), tokenizer.pad_token_id


def test_memory_plan_counts_the_adapter_and_no_reference_copy(tiny_model_dir):
    """`blip3o-rl plan` under LoRA: the adapter count equals the tensors a publish holds; the base is
    frozen weights only (no optimizer, gradient or reference copy)."""
    from rl.memory_plan import lora_params, plan_learner, shape_from_model_dir

    shape = shape_from_model_dir(tiny_model_dir)
    specs = adapter_specs(ModelPaths(tiny_model_dir).ar, LORA, torch.float32)
    adapter = sum(math.prod(spec.shape) for spec in specs.values())
    assert lora_params(shape, LORA) == adapter == 16384
    config = LearnerConfig(model=str(tiny_model_dir), world_size=2, zero_stage=1, grpo=GRPOConfig(beta=0.01), lora=LORA)
    lines = {line.what: line.bytes for line in plan_learner(shape, config, on_gpu=False).lines}
    assert lines["frozen base weights"] == 4 * shape.ar_params
    assert lines["adapter optimizer (fp32 master + Adam m, v)"] == 12 * adapter / 2
    assert not any("reference" in what or "tied head" in what for what in lines)
