"""Tiny random-weight models in the real BLIP3o-NEXT shapes, built locally (no hub, no download).

`make_tiny(directory, spec)` writes a complete model directory (see `policy.model_dir`): a Qwen3 AR
model whose tokenizer has the extended image vocabulary and a chat template, the connector, a tiny
SanaTransformer2DModel + AutoencoderDC and the flow-matching scheduler config, and (the `sana`
preset) a tiny TA-Tok image tokenizer in upstream's layout (SigLIP vision tower + SimVQ codebook).
Tests, benchmarks and the CPU demo all use it; the same loaders read a real checkpoint converted to
this layout.
The `blip3o-next-shape` preset has BLIP3o-NEXT's real widths and vocabulary with only the depth cut
(0.546B AR parameters, 1.7 GB on disk in bfloat16, ~25 s and 4.2 GB RSS to build here): the
rehearsal model of bench/bench_scale.py. Its widths and their sources are listed above the preset.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from policy.connector import Connector
from policy.image_tokenizer import WEIGHTS_STEM, TATokEncoder, TATokSpec, write_ta_tok_configs
from policy.model_dir import ModelLayout, ModelPaths
from policy.vocab import IM_END, IM_START, SCALE_TOKENS, image_token

# Qwen2/3-style chat template (no thinking block): what vLLM and transformers both render.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The bundled TRAINING prompt sets (never the evaluation sets under rl/prompts/data/eval/).
PROMPT_CORPUS = Path(__file__).resolve().parents[1] / "rl" / "prompts" / "data" / "train"


@dataclass(frozen=True)
class SanaSpec:
    """Widths of the SANA transformer and the DC-AE (defaults: the tiny f8 decoder of the CPU tests)."""

    num_heads: int = 2
    head_dim: int = 16
    cross_heads: int = 2
    cross_head_dim: int = 16
    cross_attention_dim: int = 32
    mlp_ratio: float = 2.0
    qk_norm: str | None = None
    latent_channels: int = 4
    vae_head_dim: int = 8
    vae_channels: tuple[int, ...] = (8, 16, 16, 32)
    """DC-AE block widths; the spatial compression is 2 ** (len - 1) (f8 here, f32 with 6 blocks)."""
    vae_layers: int = 1
    """Layers per DC-AE block (encoder and decoder)."""

    @property
    def compression(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


@dataclass(frozen=True)
class TATokTinySpec:
    """Widths of a tiny TA-Tok: TextAlignedTokenizer's parts (SigLIP encoder, task layers, bottleneck with a
    SimVQ codebook, Siglip2 feature decoder), random weights. Image side = patch_size * sqrt(tokens_per_image)."""

    hidden_size: int = 48
    """A multiple of 12: upstream's feature decoder keeps Siglip2VisionConfig's default 12 heads at this width."""
    intermediate_size: int = 64
    num_layers: int = 2
    """Encoder layers; the ids come from hidden_states[-2], the output of the second-to-last."""
    num_heads: int = 2
    patch_size: int = 7
    code_dim: int = 16
    """Codebook width (`bottleneck_dim`)."""
    decoder_depth: int = 1
    l2_normalized: bool = True
    stochastic: bool = True
    """With l2_normalized: cosine lookup (argmax of a softmax), the SimVQ mode TA-Tok's tower sets deterministic."""
    stochastic_temperature: float = 0.03


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model; defaults keep a CPU forward in milliseconds."""

    codebook_size: int = 1024
    """Image tokens <I0>..<I{K-1}>."""
    tokens_per_image: int = 16
    """Image tokens per sample (a 4x4 grid here; 729 = 27x27 in BLIP3o-NEXT)."""
    text_vocab_size: int = 512
    """Byte-level BPE vocabulary trained on the bundled training prompts."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    connector_dim: int = 64
    """SANA caption width (2304 in SANA1.5 1.6B)."""
    image_size: int = 64
    """Decoded image side in pixels."""
    sana_layers: int = 2
    seed: int = 0
    decoder: str = "sana"
    """Decoder kind recorded in the layout: "sana" or "glyph"."""
    text_vocab_rows: int = 0
    """Pad the text vocabulary with never-produced filler entries up to this many ids (Qwen3's
    151,669); 0 = the trained BPE vocabulary alone."""
    markers_first: bool = False
    """<im_start>, <im_end>, <S0..S2> before the image tokens (BLIP3o-NEXT's order) instead of after."""
    head_dim: int = 0
    """Attention head width; 0 = hidden_size // num_heads."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the output head (Qwen3-1.7B and BLIP3o-NEXT do)."""
    rope_theta: float | None = None
    """RoPE base; None = transformers' Qwen3Config default."""
    max_position_embeddings: int = 1024
    save_dtype: str = "float32"
    """dtype of the saved safetensors (the loaders cast to the dtype each role asks for)."""
    sana: SanaSpec = SanaSpec()
    """SANA transformer and DC-AE widths."""
    ta_tok: TATokTinySpec | None = None
    """A tiny TA-Tok image tokenizer (source images of edit prompts); None: none (tokens_per_image must be a square)."""
    extra: dict = field(default_factory=dict)


# BLIP3o-NEXT-3B's widths with only the depth cut (2 AR layers, 2 SANA layers, 1 DC-AE layer per
# block). Sources (read 2026-11-30):
# - AR = Qwen3-1.7B: hidden 2048, intermediate 6144, 28 layers, 16 query / 8 KV heads, head_dim 128,
#   rope_theta 1e6, tied embeddings, 40,960 positions (the Qwen3-1.7B config as quoted by model
#   cards built on it, e.g. g023/qwen3-tiny-v1 "base_model: Qwen/Qwen3-1.7B", apxml.com/models/qwen3-1-7b).
# - Vocabulary: BLIP3o-NEXT's `initialize_vision_tokenizer` (blip3o/model/blip3o_arch.py, branch
#   BLIP3o-NEXT, l.356-383) resizes to len(tokenizer) + new tokens, added in this order: <im_start>,
#   <im_end> (mm_use_im_start_end), <S0..S2> (num_scale_tokens 3), <I0..I65535> (num_image_tokens
#   65536, scripts/sft.sh). Qwen3's len(tokenizer) is 151,669, so <I0> = 151,674 and the embedding
#   has 151,669 + 5 + 65,536 = 217,210 rows.
# - Connector: Linear(2048, 2304) -> GELU(tanh) -> Linear(2304, 2304) -> RMSNorm(2304) (blip3o_arch.py l.32-40).
# - SANA1.5 1.6B (Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers transformer/config.json and
#   diffusers' scripts/convert_sana_to_diffusers.py): 70 heads x 32 = 2240, cross-attention 20 x 112
#   = 2240, caption_channels 2304, mlp_ratio 2.5, 32 latent channels, patch 1, sample 32, qk_norm
#   rms_norm_across_heads (SANA 1.5), 20 layers.
# - DC-AE f32c32 (mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers, vae/config.json of the SANA repos):
#   widths (128, 256, 512, 512, 1024, 1024), ResBlock x3 + EfficientViTBlock x3 (multiscale 5),
#   head dim 32, 32 latent channels, scaling 0.41407; layers per block encoder (2,2,2,3,3,3), decoder 3.
# - 1024 px through f32: a 32 x 32 latent; 729 = 27 x 27 image tokens per image.
BLIP3O_NEXT_SHAPE = TinySpec(
    codebook_size=65536, tokens_per_image=729, text_vocab_size=4096, text_vocab_rows=151669, markers_first=True,
    hidden_size=2048, num_layers=2, num_heads=16, num_kv_heads=8, head_dim=128, intermediate_size=6144,
    tie_word_embeddings=True, rope_theta=1_000_000.0, max_position_embeddings=40960,
    connector_dim=2304, image_size=1024, sana_layers=2, save_dtype="bfloat16",
    sana=SanaSpec(num_heads=70, head_dim=32, cross_heads=20, cross_head_dim=112, cross_attention_dim=2240,
                  mlp_ratio=2.5, qk_norm="rms_norm_across_heads", latent_channels=32, vae_head_dim=32,
                  vae_channels=(128, 256, 512, 512, 1024, 1024), vae_layers=1),
)

PRESETS = {
    "sana": TinySpec(ta_tok=TATokTinySpec()),
    # The CPU learning demo (DESIGN.md): 64 image tokens (36 glyphs + 28 blank), 8 per image.
    "glyph": TinySpec(codebook_size=64, tokens_per_image=8, decoder="glyph"),
    "blip3o-next-shape": BLIP3O_NEXT_SHAPE,
}


def build_tokenizer(spec: TinySpec):
    """A byte-level BPE tokenizer trained on the bundled training prompts, extended like BLIP3o-NEXT's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        line
        for name in ("ocr_train.txt", "geneval_train_metadata.jsonl")
        for line in (PROMPT_CORPUS / name).read_text().splitlines()
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.text_vocab_size,
        special_tokens=TEXT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    if spec.text_vocab_rows:
        bpe = pad_text_vocab(bpe, spec.text_vocab_rows)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    # A contiguous block of image tokens and the image markers, as an extension of the text vocab
    # (BLIP3o-NEXT adds the markers first; the tiny presets keep their original order).
    markers = [IM_START, IM_END, *SCALE_TOKENS]
    if spec.markers_first:
        tokenizer.add_tokens(markers, special_tokens=True)
    tokenizer.add_tokens([image_token(i) for i in range(spec.codebook_size)])
    if not spec.markers_first:
        tokenizer.add_tokens(markers, special_tokens=True)
    return tokenizer


def pad_text_vocab(bpe, rows: int):
    """The trained BPE with filler entries `<|unused_{n}|>` appended up to `rows` ids.

    The fillers are in the BPE vocabulary but in no merge rule, so no text ever tokenizes to them:
    they only give the text block Qwen3's size, so the embedding has the real row count and the
    image block sits at the real offset. Cheaper than training a 151k BPE on a small corpus (which
    runs out of pairs long before) or adding 151k added tokens (slow to load).
    """
    import json

    from tokenizers import Tokenizer

    state = json.loads(bpe.to_str())
    vocab = state["model"]["vocab"]
    if len(vocab) > rows:
        raise ValueError(f"the trained text vocabulary has {len(vocab)} entries, more than text_vocab_rows={rows}")
    vocab.update({f"<|unused_{n}|>": n for n in range(len(vocab), rows)})
    return Tokenizer.from_str(json.dumps(state))


def build_ar_model(spec: TinySpec, vocab_size: int):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM(ar_config(spec, vocab_size))


def ar_config(spec: TinySpec, vocab_size: int):
    """The Qwen3 config of `spec` (no weights: tests check the widths on it, or on a meta-device model)."""
    from transformers import Qwen3Config

    optional = {} if spec.rope_theta is None else {"rope_theta": spec.rope_theta}
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim or spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        torch_dtype=spec.save_dtype,
        **optional,
    )


def sana_configs(spec: TinySpec) -> tuple[dict, dict]:
    """Constructor arguments of the AutoencoderDC and the SanaTransformer2DModel of `spec`."""
    sana = spec.sana
    stages = len(sana.vae_channels)
    resnet_stages = min(3, stages - 1)  # ResBlocks, then EfficientViT blocks (SANA's DC-AE: 3 + 3)
    block_types = ("ResBlock",) * resnet_stages + ("EfficientViTBlock",) * (stages - resnet_stages)
    multiscales = ((),) * resnet_stages + ((5,),) * (stages - resnet_stages)
    vae = dict(
        in_channels=3,
        latent_channels=sana.latent_channels,
        attention_head_dim=sana.vae_head_dim,
        encoder_block_types=block_types,
        decoder_block_types=block_types,
        encoder_block_out_channels=sana.vae_channels,
        decoder_block_out_channels=sana.vae_channels,
        encoder_layers_per_block=(sana.vae_layers,) * stages,
        decoder_layers_per_block=(sana.vae_layers,) * stages,
        encoder_qkv_multiscales=multiscales,
        decoder_qkv_multiscales=multiscales,
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    transformer = dict(
        in_channels=sana.latent_channels,
        out_channels=sana.latent_channels,
        num_attention_heads=sana.num_heads,
        attention_head_dim=sana.head_dim,
        num_layers=spec.sana_layers,
        num_cross_attention_heads=sana.cross_heads,
        cross_attention_head_dim=sana.cross_head_dim,
        cross_attention_dim=sana.cross_attention_dim,
        caption_channels=spec.connector_dim,
        mlp_ratio=sana.mlp_ratio,
        sample_size=spec.image_size // sana.compression,
        patch_size=1,
    )
    if sana.qk_norm is not None:
        transformer["qk_norm"] = sana.qk_norm
    return vae, transformer


def build_sana(spec: TinySpec):
    """SanaTransformer2DModel + AutoencoderDC (tiny f8, or SANA1.5's f32c32 widths) + scheduler."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

    vae_args, transformer_args = sana_configs(spec)
    vae = AutoencoderDC(**vae_args)  # built first: the tiny presets' random weights depend on the order
    transformer = SanaTransformer2DModel(**transformer_args)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return transformer, vae, scheduler


def make_tiny(directory: Path, spec: TinySpec = PRESETS["sana"]) -> ModelPaths:
    """Build and save a complete tiny model directory; returns its paths."""
    directory = Path(directory)
    torch.manual_seed(spec.seed)
    paths = ModelPaths.in_directory(directory)
    tokenizer = build_tokenizer(spec)
    tokenizer.save_pretrained(paths.ar)
    dtype = getattr(torch, spec.save_dtype)
    cast = (lambda module: module.to(dtype)) if dtype != torch.float32 else (lambda module: module)  # noqa: E731
    ar = build_ar_model(spec, vocab_size=len(tokenizer))
    cast(ar).save_pretrained(paths.ar, safe_serialization=True)
    del ar  # the real-shape AR model is 2.2 GB in float32: free it before SANA is built
    cast(Connector(spec.hidden_size, spec.connector_dim)).save(paths.connector)
    if spec.decoder == "sana":
        transformer, vae, scheduler = build_sana(spec)
        cast(transformer).save_pretrained(paths.sana_transformer)
        cast(vae).save_pretrained(paths.sana_vae)
        scheduler.save_pretrained(paths.sana_scheduler)
    if spec.ta_tok is not None:
        torch.manual_seed(spec.seed + 1)  # its own seed: the other parts' weights stay what they were without it
        args, encoder_config, state = build_ta_tok(spec)
        write_ta_tok_configs(paths.image_tokenizer, args, encoder_config)
        weights = {name: cast(tensor).contiguous() for name, tensor in state.items()}
        save_file(weights, str(paths.image_tokenizer / f"{WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})
    layout = ModelLayout(
        tokens_per_image=spec.tokens_per_image,
        image_size=spec.image_size,
        decoder=spec.decoder,
        tiny_spec={k: v for k, v in asdict(spec).items() if k != "extra"},
    )
    layout.save(directory)
    return paths


def ta_tok_args(spec: TinySpec) -> tuple[dict, dict]:
    """TextAlignedTokenizer's constructor arguments (ta_tok.pth's ["model"]["args"] form) and the SigLIP vision
    config of the tiny TA-Tok of `spec`."""
    tok = spec.ta_tok
    side = math.isqrt(spec.tokens_per_image)
    if side * side != spec.tokens_per_image:
        raise ValueError(f"a TA-Tok gives a square grid of ids: tokens_per_image {spec.tokens_per_image} is not a square")
    encoder_config = {"model_type": "siglip_vision_model", "hidden_size": tok.hidden_size,
                      "intermediate_size": tok.intermediate_size, "num_hidden_layers": tok.num_layers,
                      "num_attention_heads": tok.num_heads, "image_size": side * tok.patch_size,
                      "patch_size": tok.patch_size}
    simvq = {"codebook_size": spec.codebook_size, "l2_normalized": tok.l2_normalized, "stochastic": tok.stochastic,
             "stochastic_temperature": tok.stochastic_temperature}
    args = {"bottleneck": {"name": "bottleneck", "args": {"bottleneck_dim": tok.code_dim,
                                                          "regularizer": {"name": "simvq", "args": simvq}}},
            "bottleneck_token_num": spec.tokens_per_image, "input_size": side * tok.patch_size,
            "teacher": "tiny random SigLIP (google/siglip2-so400m-patch14-384's architecture)",
            "pool_scale": 1, "decoder_depth": tok.decoder_depth, "select_layer_id": -2}
    return args, encoder_config


def build_ta_tok(spec: TinySpec) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """A tiny TA-Tok: (args, encoder config, TextAlignedTokenizer's full state dict under upstream's names:
    the encode path, and the decoder side as transformers 4.5x names it, `decoder.vision_model.*`)."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    tok = spec.ta_tok
    args, encoder_config = ta_tok_args(spec)
    state = dict(TATokEncoder(TATokSpec.from_args(args), encoder_config).state_dict())
    decoder_config = Siglip2VisionConfig()  # upstream's: the defaults, four fields updated (tok/ta_tok.py)
    decoder_config.update({"patch_size": 1, "num_hidden_layers": tok.decoder_depth, "num_channels": tok.code_dim,
                           "hidden_size": tok.hidden_size})
    decoder = Siglip2VisionModel(decoder_config)
    decode_task_layer = nn.Sequential(nn.Linear(tok.hidden_size, tok.hidden_size), nn.Tanh(),
                                      nn.Linear(tok.hidden_size, tok.hidden_size))
    out_linear = nn.Linear(tok.code_dim, tok.code_dim)  # upstream passes output_dim = bottleneck_dim
    for prefix, module in (("decoder.vision_model.", decoder), ("decode_task_layer.", decode_task_layer),
                           ("bottleneck.out_linear.", out_linear)):
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    # TextAlignedTokenizer's ScalingLayer buffers (mean 0.5, std 0.5), saved with the module upstream
    state["scale_layer.shift"] = torch.full((1, 3, 1, 1), 0.5)
    state["scale_layer.scale"] = torch.full((1, 3, 1, 1), 0.5)
    return args, encoder_config, state
