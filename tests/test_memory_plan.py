"""The memory planner: formulas on hand-computed cases, the real-shape preset's widths (meta device,
no weights), and `blip3o-rl plan` on the shipped configs."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rl.memory_plan import (
    GIB,
    Line,
    RolePlan,
    check_fit,
    layer_activation_elements,
    learner_state_lines,
    shape_from_configs,
    shape_from_preset,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"


def by_name(lines) -> dict[str, float]:
    return {line.what.split(" (")[0]: line.bytes for line in lines}


def test_zero_stages_split_as_derived_by_hand():
    # P = 1000 params, bf16 (d = 2), W = 4 ranks.
    # stage 1: weights 2 P = 2000; optimizer 12 P / 4 = 3000; grads 2 P + fp32 partition 4 P / 4 = 3000
    s1 = by_name(learner_state_lines(1000, 2, 4, 1, reference=True))
    assert s1 == {"weights": 2000, "optimizer": 3000, "gradients": 3000, "reference model": 2000}
    # stage 2: gradients sharded too: 2 P / 4 + 4 P / 4 = 500 + 1000 = 1500
    s2 = by_name(learner_state_lines(1000, 2, 4, 2, reference=False))
    assert s2 == {"weights": 2000, "optimizer": 3000, "gradients": 1500}
    # stage 3: weights and the reference sharded: 2 P / 4 = 500 each
    s3 = by_name(learner_state_lines(1000, 2, 4, 3, reference=True))
    assert s3 == {"weights": 500, "optimizer": 3000, "gradients": 1500, "reference model": 500}
    # stage 0, fp32, one rank: weights 4 P, Adam m + v 2 x 4 P, grads 4 P = 16 P
    s0 = by_name(learner_state_lines(1000, 4, 1, 0, reference=False))
    assert s0 == {"weights": 4000, "optimizer": 8000, "gradients": 4000}


def test_parameter_count_of_a_hand_sized_qwen3():
    from transformers import Qwen3Config

    # vocab 10, h 4, 1 layer, 2 heads x 2, 1 KV head x 2, MLP 8, tied:
    # embedding 10*4 = 40; q 4*4 = 16, k 4*2 = 8, v 8, o 16, q/k norms 2 + 2, MLP 3*4*8 = 96,
    # 2 layer norms 4 + 4, final norm 4: 40 + 156 + 4 = 200
    config = Qwen3Config(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=2, tie_word_embeddings=True)
    shape = shape_from_configs(config, {"tokens_per_image": 3, "image_size": 8, "codebook_size": 4}, None, None, None)
    assert shape.ar_params == 200
    # per layer and token kept for backward: 4h + 3q + 3kv + 4I = 16 + 12 + 6 + 32 = 66; + heads x L probs
    assert layer_activation_elements(shape, seq=5, probs=False) == 66
    assert layer_activation_elements(shape, seq=5, probs=True) == 66 + 2 * 5


def test_blip3o_next_shape_preset_has_the_published_widths():
    """Every width against the numbers stated in policy/tiny.py (configs on the meta device, no weights)."""
    from policy.tiny import PRESETS, ar_config, sana_configs

    spec = PRESETS["blip3o-next-shape"]
    rows = 151_669 + 5 + 65_536  # Qwen3 text + <im_start> <im_end> <S0..S2> + image block
    config = ar_config(spec, rows)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size, config.tie_word_embeddings) == (2048, 6144, 16, 8, 128, 217_210, True)
    assert config.to_dict()["rope_parameters"]["rope_theta"] == 1_000_000.0
    assert config.num_hidden_layers == 2 and spec.tokens_per_image == 729 and spec.connector_dim == 2304
    vae, transformer = sana_configs(spec)
    assert transformer["num_attention_heads"] * transformer["attention_head_dim"] == 2240
    assert (transformer["num_cross_attention_heads"], transformer["cross_attention_head_dim"],
            transformer["cross_attention_dim"], transformer["caption_channels"]) == (20, 112, 2240, 2304)
    assert (transformer["in_channels"], transformer["patch_size"], transformer["sample_size"]) == (32, 1, 32)
    assert transformer["mlp_ratio"] == 2.5 and transformer["qk_norm"] == "rms_norm_across_heads"
    assert vae["decoder_block_out_channels"] == (128, 256, 512, 512, 1024, 1024) and vae["latent_channels"] == 32
    assert spec.image_size // 2 ** (len(vae["decoder_block_out_channels"]) - 1) == 32  # f32: 32 x 32 latent
    shape = shape_from_preset("blip3o-next-shape")
    assert shape.ar_params == 545_520_128  # DESIGN.md's 2-layer probe: 0.546B
    full = shape_from_preset("blip3o-next-3b")
    assert 1.85e9 < full.ar_params < 1.86e9 and 1.60e9 < full.sana_params < 1.61e9 and 0.31e9 < full.vae_params < 0.32e9


def test_real_shape_tokenizer_puts_the_image_block_at_upstreams_offset():
    from policy.tiny import PRESETS, build_tokenizer
    from policy.vocab import ImageVocab

    tokenizer = build_tokenizer(PRESETS["blip3o-next-shape"])
    vocab = ImageVocab.from_tokenizer(tokenizer, 729)
    assert len(tokenizer) == 217_210
    assert (vocab.im_start_id, vocab.im_end_id, vocab.scale_ids) == (151_669, 151_670, (151_671, 151_672, 151_673))
    assert (vocab.image_token_start, vocab.codebook_size) == (151_674, 65_536)
    # the filler rows are never produced by text
    ids = tokenizer("a photo of a cat <|unused_5000|>").input_ids
    assert max(ids) < 4096


def test_check_fit_sums_cpu_roles_and_checks_each_gpu():
    cpu = RolePlan("a", [Line("x", 10 * GIB)], "cpu", count=2)
    gpu = RolePlan("b", [Line("x", 50 * GIB)], "cuda")
    assert check_fit([cpu, gpu], device_gib=80, host_gib=24).fits
    verdict = check_fit([cpu, gpu], device_gib=40, host_gib=19)
    assert not verdict.fits and len(verdict.problems) == 2


def run_cli(*args, env=None):
    """`blip3o-rl plan ARGS`: in this process (its exit code and output, as a subprocess would show them,
    without a second interpreter's imports each time), or in a subprocess when `env` is given."""
    if env is not None:
        return subprocess.run([sys.executable, "-m", "deploy.cli", "plan", *args], capture_output=True, text=True,
                              cwd=REPO, env=env)
    from deploy.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["plan", *args])
        except SystemExit as exit:
            code = exit.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


GPU_CONFIGS = sorted(path.stem for path in CONFIGS.glob("gpu-*.yaml"))


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_plan_with_the_real_shape_and_refuse_without_it(name):
    out = run_cli("--config", str(CONFIGS / f"{name}.yaml"), "--model-shape", "blip3o-next-3b")
    assert out.returncode == 0, out.stderr
    assert "learner rank x4 on cuda" in out.stdout and out.stdout.rstrip().endswith("fits")
    if "joint" in name:
        assert "diffusion learner rank x2 on cuda" in out.stdout and "SDE trajectory" in out.stdout
    missing = run_cli("--config", str(CONFIGS / f"{name}.yaml"))
    assert missing.returncode == 2 and "--model-shape" in missing.stderr
    small = run_cli("--config", str(CONFIGS / f"{name}.yaml"), "--model-shape", "blip3o-next-3b", "--device-gib", "24")
    assert small.returncode == 2 and "does not fit" in small.stderr and "GiB GPU" in small.stderr


def test_tiny_cpu_configs_plan_from_their_built_model_dirs(tmp_path, tiny_model_dir, glyph_model_dir):
    import os

    models = tmp_path / "runs" / "models"
    shutil.copytree(tiny_model_dir, models / "tiny-sana")
    shutil.copytree(glyph_model_dir, models / "tiny-glyph")
    env = {**os.environ, "BLIP3O_RL_ROOT": str(tmp_path), "PYTHONPATH": str(REPO)}
    for name, rows in (("tiny-cpu-sana", "4 rows"), ("tiny-cpu-glyph-ocr", "16 rows")):
        out = run_cli("--config", str(CONFIGS / f"{name}.yaml"), env=env)
        assert out.returncode == 0, out.stderr
        assert rows in out.stdout and out.stdout.rstrip().endswith("fits")
    # the real shape does not fit this machine with the demo's layout: exit 2 naming the roles
    refused = run_cli("--config", str(CONFIGS / "tiny-cpu-sana.yaml"), "--model-shape", "blip3o-next-3b",
                      "--host-gib", "24", env=env)
    assert refused.returncode == 2 and "CPU roles together need" in refused.stderr


def test_lora_params_count_the_adapter_the_learner_trains(glyph_model_dir):
    """The planner's adapter size equals the tensors policy/lora.py specifies for that adapter, the
    head's (r x (hidden + vocabulary rows), an untied head) included."""
    import torch

    from policy.lora import LoRAConfig, adapter_specs
    from rl.memory_plan import lora_params, shape_from_model_dir

    shape = shape_from_model_dir(glyph_model_dir)
    for targets in (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                    ("q_proj", "v_proj", "lm_head"), ("lm_head",)):
        lora = LoRAConfig(rank=16, alpha=32, target_modules=targets)
        specs = adapter_specs(glyph_model_dir / "ar", lora, torch.float32)
        assert lora_params(shape, lora) == sum(torch.Size(spec.shape).numel() for spec in specs.values()), targets


def test_a_streamed_update_costs_a_bucket_or_the_embedding_not_the_whole_model():
    from rl.learners.ar_config import LearnerConfig
    from rl.memory_plan import MIB, plan_weight_buffer, received_update
    from rl.weight_sync import WeightSyncConfig

    shape = shape_from_preset("blip3o-next-shape")
    embedding = shape.vocab_rows * shape.hidden  # 217,210 x 2048: the largest tensor
    whole = LearnerConfig(model="x", sync=WeightSyncConfig(transport="shared_memory"))
    # read from the sender's buffer (planned once, as its own line); vLLM rebuilds the layer it loads
    assert received_update(shape, whole, 2, vllm=True).bytes == 2 * embedding
    assert received_update(shape, whole, 2, vllm=False).bytes == 0
    assert plan_weight_buffer(whole, shape.ar_params).total == 4 * shape.ar_params  # float32 learner
    assert plan_weight_buffer(LearnerConfig(model="x", sync=WeightSyncConfig(transport="broadcast")), 1) is None
    streamed = LearnerConfig(model="x", sync=WeightSyncConfig(transport="broadcast", bucket_mb=256))
    # the float32 embedding (1.78 GB) is bigger than a 256 MiB bucket: it arrives whole; vLLM builds
    # the bfloat16 embedding layer anew while loading it
    assert received_update(shape, streamed, 2, vllm=True).bytes == 4 * embedding + 2 * embedding
    assert received_update(shape, streamed, 2, vllm=False).bytes == 4 * embedding
    huge_buckets = LearnerConfig(model="x", sync=WeightSyncConfig(transport="broadcast", bucket_mb=4096))
    assert received_update(shape, huge_buckets, 2, vllm=False).bytes == 4096 * MIB
    assert received_update(shape, None, 2, vllm=True).bytes == 0  # a frozen AR policy receives nothing


# ----- the diffusion learner and the decoders' SDE rollouts ----------------------------------------

def real_plans(name: str, **updates) -> dict[str, "RolePlan"]:
    """plan_config of a shipped config at the real shape, with `updates` ({"section.key": value})."""
    from rl.memory_plan import plan_config
    from rl.run.config import load_config

    config = load_config(str(CONFIGS / f"{name}.yaml"))
    for dotted, value in updates.items():
        *path, key = dotted.split(".")
        owner = config
        for part in path:
            owner = getattr(owner, part)
        object.__setattr__(owner, key, value)
    return {plan.role: plan for plan in plan_config(config, real_shape())}


_REAL = {}


def real_shape():
    if not _REAL:
        _REAL["shape"] = shape_from_preset("blip3o-next-3b")
    return _REAL["shape"]


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_every_gpu_role_plans_within_three_quarters_of_an_80_gib_device(name):
    """The quarter left: the CUDA caching allocator's fragmentation and what the plan does not count
    (kernels' workspaces, NCCL's buffers)."""
    for plan in real_plans(name).values():
        if plan.device.startswith("cuda"):
            assert plan.total <= 0.75 * 80 * GIB, (plan.role, plan.total / GIB)


def test_the_joint_configs_former_sizing_is_what_the_plan_refuses_room_for():
    """Micro-batch 8 at CFG 2 without checkpointing and 32 images in one DC-AE call: the diffusion
    learner and the decoders would each fill most of an 80 GiB device (78.6 and 64.5 GiB planned);
    the shipped sizing (4 images a micro-batch, DC-AE calls of 4) plans 41.5 and 19.0 GiB."""
    former = real_plans("gpu-blip3o-next-joint-geneval", **{"diffusion_learner.micro_batch_size": 8,
                                                            "decoder.decoder.vae_micro_batch_size": None})
    shipped = real_plans("gpu-blip3o-next-joint-geneval")
    assert former["diffusion learner rank"].total > 0.95 * 80 * GIB and former["decoder worker"].total > 0.75 * 80 * GIB
    assert shipped["diffusion learner rank"].total < 0.55 * 80 * GIB and shipped["decoder worker"].total < 0.25 * 80 * GIB
    assert by_name(former["decoder worker"].lines)["DC-AE decode"] > 50 * GIB  # 32 x 1.63 GiB
    assert by_name(shipped["decoder worker"].lines)["DC-AE decode"] == 4 * 1024**2 * 128 * 13  # 4 images, bf16
    checkpointed = real_plans("gpu-blip3o-next-joint-geneval", **{"diffusion_learner.micro_batch_size": 8,
                                                                  "diffusion_learner.gradient_checkpointing": True})
    assert checkpointed["diffusion learner rank"].total < 0.2 * 80 * GIB


def test_diffusion_learner_lines_by_hand():
    """A toy SANA (every width small) through plan_diffusion_learner: which lines appear and what they hold."""
    from policy.sana_lora import TransformerLoRAConfig
    from rl.learners.diffusion_config import DiffusionLearnerConfig, FlowGRPOConfig
    from rl.memory_plan import ModelShape, plan_diffusion_learner
    from rl.sana_memory import SanaShape, guided_forward_peak, saved_per_block, saved_per_row

    linears = {f"transformer_blocks.0.attn{a}.{p}": (8, 8) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    sana = SanaShape(hidden=8, ff=20, layers=1, heads=2, head_dim=4, cross_heads=1, caption_channels=8,
                     latent_channels=4, latent_side=2, vae_first_width=4, linears=linears)
    shape = ModelShape(ar_params=0, vocab_rows=0, hidden=8, layers=1, heads=1, kv_heads=1, head_dim=8, intermediate=8,
                       tied=False, codebook=4, tokens_per_image=3, image_size=8, decoder="sana", connector_params=100,
                       sana_params=1000, sana=sana)
    captions = 4  # N + 1
    full = DiffusionLearnerConfig(model="x", world_size=2, zero_stage=2, precision="bf16", micro_batch_size=3)
    lines = by_name(plan_diffusion_learner(shape, full, guidance_scale=2.0, on_gpu=True).lines)
    # full fine-tuning, beta > 0 by default: weights 2 P, optimizer 12 P / 2, grads 2 P / 2 + 4 P / 2, a frozen copy
    assert (lines["weights"], lines["optimizer"], lines["gradients"], lines["reference model"]) == (2000, 6000, 3000, 2000)
    assert lines["connector"] == 200 and "EMA of the trained weights" not in lines
    rows = 2 * 3  # CFG: two rows an image
    assert lines["activations: one SDE step"] == rows * saved_per_row(sana, captions, 2)
    assert lines["backward working set"] == rows * saved_per_block(sana, captions, 2)
    assert lines["reference forward"] == rows * guided_forward_peak(sana, captions, 2)
    # LoRA r 2 on the 8 projections of 8 x 8: 8 x 2 x (8 + 8) = 256 adapter params; the reference is the
    # adapter off (no copy); EMA 4 B an adapter param; guidance 1 runs one row an image; checkpointing
    lora = full.model_copy(update={"lora": TransformerLoRAConfig(rank=2, alpha=4), "gradient_checkpointing": True,
                                   "flow": FlowGRPOConfig(beta=0.0), "ema": {"decay": 0.9, "update_interval": 1}})
    lines = by_name(plan_diffusion_learner(shape, lora, guidance_scale=1.0, on_gpu=True).lines)
    assert lines["frozen base weights"] == 2000 and lines["adapter weights"] == 2 * 256
    assert "reference model" not in lines and "reference forward" not in lines
    assert lines["EMA of the trained weights"] == 4 * 256
    assert lines["activations: one SDE step"] == 3 * saved_per_row(sana, captions, 2, lora.lora, checkpointing=True)


def test_decoder_plans_its_call_its_dc_ae_micro_batch_and_the_sde_trajectory():
    from rl.memory_plan import plan_decoder
    from rl.sana_memory import dc_ae_decode_peak, guided_forward_peak, sde_trajectory_bytes
    from rollout.decoder_config import DecoderConfig

    shape, captions = real_shape(), 730
    per_image = dc_ae_decode_peak(shape.sana, 1024, 2)
    assert per_image == 1024**2 * 128 * 13  # 1.63 GiB an image in bfloat16
    decoder = DecoderConfig(model="x", dtype="bfloat16", device="cuda", micro_batch_size=8, vae_micro_batch_size=2)
    lines = by_name(plan_decoder(shape, decoder, None, batch=32, on_gpu=True, workers=1).lines)
    assert lines["SANA forward"] == 16 * guided_forward_peak(shape.sana, captions, 2)  # 8 images a call, CFG
    assert lines["DC-AE decode"] == 2 * per_image and "SDE trajectory + AR states" not in lines
    whole = decoder.model_copy(update={"micro_batch_size": None, "vae_micro_batch_size": None, "guidance_scale": 1.0})
    lines = by_name(plan_decoder(shape, whole, None, batch=32, on_gpu=True, workers=1).lines)
    assert lines["SANA forward"] == 32 * guided_forward_peak(shape.sana, captions, 2) and lines["DC-AE decode"] == 32 * per_image
    # the SDE sampler (10 steps) keeps 11 float32 latents of 32 x 32 x 32 twice, and the [730, 2048] AR states
    joint = real_plans("gpu-blip3o-next-joint-geneval")["decoder worker"]
    assert sde_trajectory_bytes(shape.sana, 10) == 2 * 11 * 32768 * 4
    assert by_name(joint.lines)["SDE trajectory + AR states"] == 32 * (2 * 11 * 32768 * 4 + 730 * 2048 * 2)


def test_an_edit_runs_learner_rows_hold_the_source_images_codes():
    """An edit prompt holds the source image's 729 codes: on GPU (no attention probabilities kept) a
    row's layer activations grow with its length, (64 + 729 + 729) / (64 + 729) over a text-to-image row."""
    from rl.memory_plan import PROMPT_TOKENS, plan_learner
    from rl.run.config import load_config

    edit = real_plans("gpu-blip3o-next-grpo-edit")["learner rank"]
    learner = load_config(str(CONFIGS / "gpu-blip3o-next-grpo-edit.yaml")).learner
    text = plan_learner(real_shape(), learner, on_gpu=True, prompt=PROMPT_TOKENS)
    n = real_shape().tokens_per_image
    assert n == 729
    ratio = by_name(edit.lines)["activations: layers"] / by_name(text.lines)["activations: layers"]
    assert ratio == pytest.approx((PROMPT_TOKENS + 2 * n) / (PROMPT_TOKENS + n), rel=1e-12)
    assert by_name(edit.lines)["activations: image logits"] == by_name(text.lines)["activations: image logits"]
    assert f"{learner.micro_batch_size} rows x {PROMPT_TOKENS + 2 * n} tokens" in str(edit.lines)
