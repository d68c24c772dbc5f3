"""SANA's transformer and DC-AE in the memory planner (rl/memory_plan.py): the bytes one row keeps
for the diffusion learner's backward, and the peaks of the decoder's SANA sampling and DC-AE decode.

Counted from diffusers 0.42's `SanaTransformerBlock` (linear self-attention, cross-attention to the
caption, GLUMBConv feed-forward) and `AutoencoderDC`; tests/test_sana_memory.py checks every formula
against the library: the saved-tensor ones to the byte (autograd's saved tensors counted by storage,
at small widths that are all distinct, bfloat16 and float32, full, LoRA and checkpointed), the two
peaks within 1% (a counter of live tensors, at SANA1.5's real widths).

Symbols: T latent tokens per image (latent_side^2 = 1024 at 1024 px), Tc caption tokens (N + 1 =
730: the AR states at <S0> and the image tokens), D SANA's width (2240), F = int(mlp_ratio D) (5600;
the feed-forward's 1x1 conv makes 2F channels), H self-attention heads of width e (70 x 32), Hc
cross-attention heads (20), C latent channels (32), cc caption channels (2304), n blocks (20), r
LoRA rank, d bytes per element of the compute dtype, f = 1 below float32 (the float32 copies that
the linear attention and the RMSNorms make are new tensors) and 0 in float32 (they are the tensors
themselves). A row is one transformer input: CFG runs every image as two rows (null and real
caption, rollout/sana_decoder.py `guided_velocity`). LayerNorm statistics are counted in the input's
dtype, as the CPU keeps them (CUDA keeps them in float32: a few bytes a token more).

Kept for backward, per row (one forward with grad):
  per block and latent token   d (20 D + 8 F + 4) + 4 (4 D + 3 H + Hc + 3) + 12 f D
      compute dtype: both LayerNorms' inputs and modulated outputs, q/k/v around their RMSNorms and
      ReLUs, attention outputs and their projections, the gates' operands; the feed-forward's 2F conv
      output, its SiLU, the depthwise conv's output, SiLU(gate) and the F-wide product. float32: the
      linear attention's q and k, its padded v and output ((e+1)/e D each), the RMSNorms' statistics
  per block and caption token  4 d D + 4 + 4 f D      cross-attention k and v around their RMSNorm
  per block                    8 d D + 4 H (e + 1) e  modulation; the linear attention's [H, e+1, e] scores
  outside the blocks           T d (3 D + C + 2) + Tc (d (cc + 5 D) + 4 + 4 f D) + d (256 + 5 D)
  LoRA on the attention projections (the base frozen): per latent token d (18 D + 6 F + a r + 4) plus
      the same float32 terms (frozen layers keep 2 D + 2 F less; each of the a adapters on a
      latent-side projection keeps its r-wide A x), per caption token d (3 D + c r) + 4 + 4 f D (c
      adapters on the caption side: attn2.to_k / to_v), the per-block terms as above; outside the
      blocks Tc d D (the caption states, kept by the k / v adapters) + T d (D + 2) + d D (the final
      norm's input, statistics and scale), as much less in the first block (its input needs no gradient)
  gradient checkpointing (diffusers checkpoints every block): n T d D (each block's input) + 6 d D
      (the blocks' timestep input) + one block recomputed in the backward + outside the blocks

Peaks without grad (the decoders' sampling, the learner's reference forward), per row:
  SANA guided forward   T d (4 D + 4 F) + Tc d (D + cc): at the feed-forward's first SiLU the block
      input, the attention output, the modulated norm and its contiguous copy, the 2F conv output and its SiLU
DC-AE decode, per image of H x W px: H W C0 x (4.5 d in float32: four maps at full resolution and the
      stage input at half resolution and twice the width; 2.5 d + 8 below: two maps, that input, and
      an RMSNorm's float32 copy and square)
"""

from __future__ import annotations

from dataclasses import dataclass, field

CAPTION_SIDE = ("attn2.to_k", "attn2.to_v")
"""The projections of the caption (cross-attention keys and values): their inputs are Tc tokens."""


@dataclass(frozen=True)
class SanaShape:
    """The widths of a SANA transformer and its DC-AE that the plan reads."""

    hidden: int
    """D = heads x head width."""
    ff: int
    """F = int(mlp_ratio D)."""
    layers: int
    heads: int
    head_dim: int
    cross_heads: int
    caption_channels: int
    latent_channels: int
    latent_side: int
    """The latent's side (image size / the DC-AE's compression)."""
    vae_first_width: int
    """C0, the DC-AE decoder's full-resolution width."""
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Every nn.Linear of the transformer -> (out, in) (LoRA targets and adapter sizes)."""

    @property
    def tokens(self) -> int:
        return self.latent_side ** 2


def shape_from_sana_configs(transformer: dict, vae: dict, image_size: int, linears: dict[str, tuple[int, int]]) -> SanaShape:
    """A SanaShape from the SanaTransformer2DModel and AutoencoderDC constructor configs."""
    hidden = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    return SanaShape(
        hidden=hidden, ff=int(hidden * transformer.get("mlp_ratio", 2.5)), layers=transformer["num_layers"],
        heads=transformer["num_attention_heads"], head_dim=transformer["attention_head_dim"],
        cross_heads=transformer["num_cross_attention_heads"], caption_channels=transformer["caption_channels"],
        latent_channels=transformer["in_channels"],
        latent_side=image_size // 2 ** (len(vae["decoder_block_out_channels"]) - 1),
        vae_first_width=vae["decoder_block_out_channels"][0], linears=dict(linears),
    )


def adapted_linears(sana: SanaShape, lora) -> dict[str, tuple[int, int]]:
    """The Linears `lora` adapts -> (out, in), by peft's rule (policy/lora.py `linear_adapter_specs`)."""
    import torch

    from policy.lora import linear_adapter_specs, lora_keys

    specs = linear_adapter_specs(sana.linears, lora, torch.float32, "the SANA transformer")
    return {name: shape for name, shape in sana.linears.items() if lora_keys(name)[0] in specs}


def sana_adapter_params(sana: SanaShape, lora) -> int:
    """Parameters of a transformer LoRA adapter: r (in + out) per adapted Linear (policy/sana_lora.py)."""
    return sum(lora.rank * (out + inp) for out, inp in adapted_linears(sana, lora).values())


def block_adapters(sana: SanaShape, lora) -> tuple[int, int]:
    """(latent-side, caption-side) adapted projections of one block (block 0 stands for all)."""
    names = [n.removeprefix("transformer_blocks.0.") for n in adapted_linears(sana, lora)
             if n.startswith("transformer_blocks.0.")]
    caption = sum(n in CAPTION_SIDE for n in names)
    return len(names) - caption, caption


def saved_per_block(sana: SanaShape, captions: int, d: int, lora=None) -> float:
    """Bytes one block keeps for backward per row (module docstring)."""
    D, F, f = sana.hidden, sana.ff, int(d < 4)
    float32_latent = 4 * (4 * D + 3 * sana.heads + sana.cross_heads + 3) + 12 * f * D
    float32_caption = 4 + 4 * f * D
    per_block = 8 * d * D + 4 * sana.heads * (sana.head_dim + 1) * sana.head_dim
    if lora is None:
        latent, caption = d * (20 * D + 8 * F + 4), 4 * d * D
    else:
        a, c = block_adapters(sana, lora)
        latent, caption = d * (18 * D + 6 * F + a * lora.rank + 4), d * (3 * D + c * lora.rank)
    return sana.tokens * (latent + float32_latent) + captions * (caption + float32_caption) + per_block


def saved_outside_blocks(sana: SanaShape, captions: int, d: int, lora=None) -> float:
    """Bytes the embeddings, the timestep embedding and the output layers keep per row (module
    docstring). Under LoRA: the caption states that every block's k / v adapters keep (one tensor),
    and the final norm's input, statistics and scale."""
    D, f = sana.hidden, int(d < 4)
    if lora is not None:
        return captions * d * D + final_norm_bytes(sana, d)
    return (sana.tokens * d * (3 * D + sana.latent_channels + 2)
            + captions * (d * (sana.caption_channels + 5 * D) + 4 + 4 * f * D) + d * (256 + 5 * D))


def saved_per_row(sana: SanaShape, captions: int, d: int, lora=None, checkpointing: bool = False) -> float:
    """Bytes one row keeps for the backward of one forward with grad (module docstring)."""
    block = saved_per_block(sana, captions, d, lora)
    outside = saved_outside_blocks(sana, captions, d, lora)
    if checkpointing:  # every block's input, then one block at a time recomputed in the backward
        return sana.layers * sana.tokens * d * sana.hidden + 6 * d * sana.hidden + block + outside
    if lora is not None:  # the first block's input needs no gradient: its first norm keeps nothing
        outside -= final_norm_bytes(sana, d)
    return sana.layers * block + outside


def final_norm_bytes(sana: SanaShape, d: int) -> float:
    """T d (D + 2) + d D: a LayerNorm's input and statistics (in the input's dtype on the CPU; float32
    on CUDA, at most 4 bytes a token more) and its modulation's scale, per row."""
    return sana.tokens * d * (sana.hidden + 2) + d * sana.hidden


def guided_forward_peak(sana: SanaShape, captions: int, d: int) -> float:
    """Peak bytes of one row of a SANA forward without grad (module docstring)."""
    D = sana.hidden
    return sana.tokens * d * (4 * D + 4 * sana.ff) + captions * d * (D + sana.caption_channels)


def dc_ae_decode_peak(sana: SanaShape, image_size: int, d: int) -> float:
    """Peak bytes of decoding one image with the DC-AE (module docstring)."""
    per_channel = 4.5 * d if d == 4 else 2.5 * d + 8
    return image_size ** 2 * sana.vae_first_width * per_channel


def sde_trajectory_bytes(sana: SanaShape, steps: int) -> float:
    """Per image: the float32 latents x_0..x_S an SDE sample keeps on the device, twice (the list
    `sample_sde` appends to and its stacked copy before it moves to the CPU)."""
    return 2 * (steps + 1) * sana.latent_channels * sana.tokens * 4
