"""Tiny random-weight models in the real BLIP3o-NEXT shapes, built locally (no hub, no download).

`make_tiny(directory, spec)` writes a complete model directory (see `policy.model_dir`): a Qwen3 AR
model whose tokenizer has the extended image vocabulary and a chat template, the connector, a tiny
SanaTransformer2DModel + AutoencoderDC and the flow-matching scheduler config. Tests, benchmarks and
the CPU demo all use it; the same loaders read a real checkpoint converted to this layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from policy.connector import Connector
from policy.model_dir import ModelLayout, ModelPaths
from policy.vocab import IM_END, IM_START, SCALE_TOKENS, image_token

# Qwen2/3-style chat template (no thinking block): what vLLM and transformers both render.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT_CORPUS = Path(__file__).resolve().parents[1] / "rl" / "data"


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model; defaults keep a CPU forward in milliseconds."""

    codebook_size: int = 1024
    """Image tokens <I0>..<I{K-1}>."""
    tokens_per_image: int = 16
    """Image tokens per sample (a 4x4 grid here; 729 = 27x27 in BLIP3o-NEXT)."""
    text_vocab_size: int = 512
    """Byte-level BPE vocabulary trained on the bundled prompts."""
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
    extra: dict = field(default_factory=dict)


PRESETS = {
    "sana": TinySpec(),
    # The CPU learning demo (DESIGN.md): 64 image tokens (36 glyphs + 28 blank), 8 per image.
    "glyph": TinySpec(codebook_size=64, tokens_per_image=8, decoder="glyph"),
}


def build_tokenizer(spec: TinySpec):
    """A byte-level BPE tokenizer trained on the bundled prompts, extended like BLIP3o-NEXT's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        line
        for name in ("ocr_prompts.txt", "geneval_metadata.jsonl")
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
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    # Image tokens first (contiguous block), then the image markers, as an extension of the text vocab.
    tokenizer.add_tokens([image_token(i) for i in range(spec.codebook_size)])
    tokenizer.add_tokens([IM_START, IM_END, *SCALE_TOKENS], special_tokens=True)
    return tokenizer


def build_ar_model(spec: TinySpec, vocab_size: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    return Qwen3ForCausalLM(config)


def build_sana(spec: TinySpec):
    """Tiny SanaTransformer2DModel + AutoencoderDC (f8 here; f32c32 in SANA1.5) + scheduler."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

    latent_channels = 4
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 16, 32),
        decoder_block_out_channels=(8, 16, 16, 32),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    latent_size = spec.image_size // 8
    transformer = SanaTransformer2DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=spec.sana_layers,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=spec.connector_dim,
        mlp_ratio=2.0,
        sample_size=latent_size,
        patch_size=1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return transformer, vae, scheduler


def make_tiny(directory: Path, spec: TinySpec = PRESETS["sana"]) -> ModelPaths:
    """Build and save a complete tiny model directory; returns its paths."""
    directory = Path(directory)
    torch.manual_seed(spec.seed)
    paths = ModelPaths.in_directory(directory)
    tokenizer = build_tokenizer(spec)
    tokenizer.save_pretrained(paths.ar)
    ar = build_ar_model(spec, vocab_size=len(tokenizer))
    ar.save_pretrained(paths.ar, safe_serialization=True)
    Connector(spec.hidden_size, spec.connector_dim).save(paths.connector)
    if spec.decoder == "sana":
        transformer, vae, scheduler = build_sana(spec)
        transformer.save_pretrained(paths.sana_transformer)
        vae.save_pretrained(paths.sana_vae)
        scheduler.save_pretrained(paths.sana_scheduler)
    layout = ModelLayout(
        tokens_per_image=spec.tokens_per_image,
        image_size=spec.image_size,
        decoder=spec.decoder,
        tiny_spec={k: v for k, v in asdict(spec).items() if k != "extra"},
    )
    layout.save(directory)
    return paths
