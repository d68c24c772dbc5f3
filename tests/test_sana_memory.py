"""SANA's memory formulas (rl/sana_memory.py) against the library: the bytes autograd keeps for a
SANA forward (exactly, counted by storage), the peaks of a forward without grad and of a DC-AE decode
(a counter of live tensors), the adapter's size; and the DC-AE decode in micro-batches (the same images)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rl import sana_memory
from rl.sana_memory import SanaShape, shape_from_sana_configs

# SANA1.5's structure at small widths, every width distinct so a wrong symbol shows: D = 8 x 16 =
# 128, F = 320, 4 cross heads of 32, 64 caption channels, 32 latent channels; 2 blocks, an 8 x 8
# latent, 16 caption tokens, 2 rows.
SMALL = dict(in_channels=32, out_channels=32, num_attention_heads=8, attention_head_dim=16, num_layers=2,
             num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128, caption_channels=64,
             mlp_ratio=2.5, sample_size=8, patch_size=1, qk_norm="rms_norm_across_heads")
ROWS, CAPTIONS = 2, 16


def sana_module(config: dict, dtype: torch.dtype, lora=None, checkpointing: bool = False):
    """A random SanaTransformer2DModel as the diffusion learner trains it: in `dtype` (DeepSpeed's bf16
    casts the adapter too), the adapter by peft (the base frozen), diffusers' checkpointing."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(**config)
    if checkpointing:
        model.enable_gradient_checkpointing()
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config()).base_model.model
    return model.to(dtype).train()


def sana_shape(config: dict, side: int) -> SanaShape:
    """The plan's shape of `config` at a side x side latent (built on the meta device)."""
    from diffusers import SanaTransformer2DModel

    from policy.lora import linear_shapes

    with torch.device("meta"):
        model = SanaTransformer2DModel(**config)
    vae = {"decoder_block_out_channels": (128, 256)}  # f2: side 2 x side px
    return shape_from_sana_configs(model.config, vae, 2 * side, linear_shapes(model))


def inputs(config: dict, dtype: torch.dtype, rows: int, side: int, captions: int):
    latents = torch.randn(rows, config["in_channels"], side, side, dtype=dtype)
    caption = torch.randn(rows, captions, config["caption_channels"], dtype=dtype)
    return latents, caption, torch.full((rows,), 500.0)


def saved_bytes(model, latents, caption, timestep) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(latents, encoder_hidden_states=caption, timestep=timestep, return_dict=False)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", ["full", "lora", "checkpointing", "lora-checkpointing"])
def test_saved_tensors_equal_autograds_to_the_byte(dtype, case):
    """The formula is exact: it is the count of what diffusers 0.42's SANA saves (any change in the
    library shows here first). Checkpointing is counted in the forward (each block's input); the
    recomputed block of the backward is the formula's `saved_per_block` on top."""
    from policy.sana_lora import TransformerLoRAConfig

    lora = TransformerLoRAConfig(rank=8, alpha=16) if case.startswith("lora") else None
    checkpointing = case.endswith("checkpointing")
    model = sana_module(SMALL, dtype, lora, checkpointing)
    shape, d = sana_shape(SMALL, 8), dtype.itemsize
    measured = saved_bytes(model, *inputs(SMALL, dtype, ROWS, 8, CAPTIONS))
    planned = ROWS * sana_memory.saved_per_row(shape, CAPTIONS, d, lora, checkpointing)
    if checkpointing:
        planned -= ROWS * sana_memory.saved_per_block(shape, CAPTIONS, d, lora)  # recomputed in the backward only
    assert measured == planned


def test_formula_by_hand_on_a_toy_shape():
    # D 4, F 10, H 2 heads of e 2, Hc 1, one latent token, one caption token, bfloat16 (d 2, f 1):
    # latent  2 (20*4 + 8*10 + 4) = 328, float32 4 (4*4 + 3*2 + 1 + 3) = 104, 12 f D = 48   -> 480
    # caption 4 d D = 32, + 4, + 4 f D = 16                                                    ->  52
    # block   8 d D = 64, 4 H (e + 1) e = 4*2*3*2 = 48                                         -> 112
    toy = SanaShape(hidden=4, ff=10, layers=3, heads=2, head_dim=2, cross_heads=1, caption_channels=6,
                    latent_channels=2, latent_side=1, vae_first_width=3)
    assert sana_memory.saved_per_block(toy, captions=1, d=2) == 480 + 52 + 112
    # outside the blocks: 1 token x 2 (3*4 + 2 + 2) = 32; caption 2 (6 + 20) + 4 + 16 = 72; 2 (256 + 20) = 552
    assert sana_memory.saved_per_row(toy, captions=1, d=2) == 3 * 644 + 32 + 72 + 552
    # checkpointed: 3 blocks' inputs 3 x 1 x 2 x 4 = 24, timestep input 6 d D = 48, one block, outside
    assert sana_memory.saved_per_row(toy, captions=1, d=2, checkpointing=True) == 24 + 48 + 644 + 656
    # no grad: 1 token x 2 (16 + 40) = 112, + 1 caption x 2 (4 + 6) = 20
    assert sana_memory.guided_forward_peak(toy, captions=1, d=2) == 132
    # DC-AE, 10 px: 100 px x 3 ch x (2.5 x 2 + 8) = 3900 in bfloat16, x 4.5 x 4 = 5400 in float32
    assert sana_memory.dc_ae_decode_peak(toy, 10, 2) == 3900 and sana_memory.dc_ae_decode_peak(toy, 10, 4) == 5400


class LivePeak(TorchDispatchMode):
    """The peak of the bytes held by tensors that ops create (distinct storages, parameters and
    their views excluded); kernels' internal buffers are not seen."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            key = tensor.untyped_storage().data_ptr()
            if key == 0 or key in self.params:
                continue
            if key not in self.refs:
                self.refs[key], self.sizes[key] = 0, tensor.untyped_storage().nbytes()
                self.live += self.sizes[key]
            self.refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


def test_forward_without_grad_peaks_at_the_feed_forward_as_planned():
    """SANA1.5's real widths, one block, a 32 x 32 latent (1024 tokens, as at 1024 px), bfloat16:
    the planned peak is the measured one within 1% (what the formula leaves out: the block's small
    per-row tensors)."""
    from policy.tiny import PRESETS, sana_configs

    _, config = sana_configs(PRESETS["blip3o-next-shape"])
    config = {**config, "num_layers": 1}
    model = sana_module(config, torch.bfloat16).eval()
    shape = sana_shape(config, 32)
    latents, caption, timestep = inputs(config, torch.bfloat16, ROWS, 32, CAPTIONS)
    with torch.no_grad(), LivePeak(model) as counter:
        model(latents, encoder_hidden_states=caption, timestep=timestep, return_dict=False)
    assert counter.peak == pytest.approx(ROWS * sana_memory.guided_forward_peak(shape, CAPTIONS, 2), rel=0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dc_ae_decode_peak_as_planned(dtype):
    """The DC-AE of SANA1.5's widths (one layer per block) decoding 2 latents of 2 x 2 to 64 px: the
    planned peak per image is the measured one within 1%."""
    from diffusers import AutoencoderDC

    from policy.tiny import PRESETS, sana_configs

    vae_config, transformer_config = sana_configs(PRESETS["blip3o-next-shape"])
    vae = AutoencoderDC(**vae_config).to(dtype).eval()
    shape = shape_from_sana_configs(transformer_config, vae_config, 64, {})
    with torch.no_grad(), LivePeak(vae) as counter:
        pixels = vae.decode(torch.randn(2, 32, 2, 2, dtype=dtype), return_dict=False)[0]
    assert pixels.shape == (2, 3, 64, 64)
    assert counter.peak == pytest.approx(2 * sana_memory.dc_ae_decode_peak(shape, 64, dtype.itemsize), rel=0.01)


def test_adapter_size_is_the_decoders_adapter_specs(tiny_model_dir):
    from policy.sana_lora import TransformerLoRAConfig, transformer_adapter_specs
    from rl.memory_plan import shape_from_model_dir

    shape = shape_from_model_dir(tiny_model_dir)
    for targets in (("to_q", "to_k", "to_v", "to_out.0"), ("attn2.to_k",), ("to_q",)):
        lora = TransformerLoRAConfig(rank=4, alpha=8, target_modules=targets)
        specs = transformer_adapter_specs(tiny_model_dir / "sana" / "transformer", lora, torch.float32)
        assert sana_memory.sana_adapter_params(shape.sana, lora) == sum(torch.Size(s.shape).numel() for s in specs.values())


def test_dc_ae_micro_batches_decode_the_same_images(tiny_model_dir):
    """5 latents decoded in DC-AE calls of 2 (2 + 2 + 1) equal one call of 5: a row's decode does not
    read the other rows. Tolerance: float reassociation (another batch size can take another kernel
    blocking) may move a pixel across a uint8 rounding boundary, at most 1 level on well under 1% of
    the pixels (measured here: identical)."""
    from policy.loading import load_tokenizer, load_vocab
    from policy.model_dir import resolve_model_dir
    from rollout.decoder_config import DecoderConfig
    from rollout.sana_decoder import SanaDecoder

    paths = resolve_model_dir(str(tiny_model_dir))
    tokenizer = load_tokenizer(paths)
    whole = SanaDecoder(paths, load_vocab(paths, tokenizer), tokenizer.pad_token_id, DecoderConfig(model=str(tiny_model_dir)))
    micro = SanaDecoder(paths, load_vocab(paths, tokenizer), tokenizer.pad_token_id,
                        DecoderConfig(model=str(tiny_model_dir), vae_micro_batch_size=2))
    calls = []
    decode = micro.vae.decode
    micro.vae.decode = lambda z, **kw: calls.append(z.shape[0]) or decode(z, **kw)
    latents = whole.initial_noise(5, seed=3)  # [5, C, h, w]
    a, b = whole.decode_latents(latents), micro.decode_latents(latents)
    assert calls == [2, 2, 1] and a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.slow
def test_the_diffusion_learner_checkpoints_and_trains_the_same(ray_cluster, tiny_model_dir):
    """gradient_checkpointing reaches the learner's transformer (diffusers' flag on its module) and
    changes no number: one update of the same 4 SDE rollouts, float32, gives the same losses and
    gradient norms as without it (recomputation runs the same ops: exact up to float reassociation,
    1e-6 relative)."""
    from policy.sana_lora import TransformerLoRAConfig
    from rl.learners.diffusion_config import DiffusionLearnerConfig
    from rl.learners.diffusion_learner import DiffusionLearnerGroup
    from rl.objectives.grpo import GRPOConfig, group_advantages
    from rollout.decoder_config import DecoderConfig
    from rollout.decoder_worker import DiffusionDecoderWorker
    from rollout.diffusion_rollout import SdeSampling
    from tests.test_decoder import random_codes, rollout_batch

    sampling = SdeSampling(steps=2, noise_level=0.7)
    decoder = DiffusionDecoderWorker(DecoderConfig(model=str(tiny_model_dir), num_threads=1))
    batch = rollout_batch(tiny_model_dir, ["a cat"] * 4, random_codes(tiny_model_dir, 1).repeat(4, 1))
    images, rollout = decoder.decode_sde(batch, 7, sampling)
    advantages = group_advantages(torch.tensor([0.0, 1.0, 2.0, 4.0]), [0, 0, 0, 0], GRPOConfig())
    results = {}
    for checkpointing in (False, True):
        config = DiffusionLearnerConfig(model=str(tiny_model_dir), world_size=1, micro_batch_size=2,
                                        gradient_accumulation_steps=2, torch_threads=1, sampling=sampling,
                                        lora=TransformerLoRAConfig(rank=4, alpha=8), gradient_checkpointing=checkpointing)
        learner = DiffusionLearnerGroup(config, timeout_s=600)
        try:
            flag = ray_cluster.get(learner.ranks[0].__ray_call__.remote(
                lambda rank: rank.engine.module.gradient_checkpointing))
            results[checkpointing] = (flag, learner.train_step(rollout, advantages))
        finally:
            learner.shutdown()
    (off_flag, off), (on_flag, on) = results[False], results[True]
    assert (off_flag, on_flag) == (False, True)
    assert on.losses == pytest.approx(off.losses, rel=1e-6) and on.grad_norms == pytest.approx(off.grad_norms, rel=1e-6)
    assert off.grad_norms[0] > 0
