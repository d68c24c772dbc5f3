"""The tiny glyph model written as a BLIP3o-NEXT checkpoint, for BLIP3o-NEXT's own GRPO trainer.

The layout is the hub's GRPO one that policy/convert.py reads (and tests/test_convert.py writes):
one transformers save of `blip3oQwenForCausalLM` = the Qwen3 tensors under their own names, a
config.json with model_type `blip3o_qwen` and the token-id fields `initialize_vision_tokenizer`
writes (blip3o/model/blip3o_arch.py, branch BLIP3o-NEXT, l.356-383), and the tokenizer. Differences,
each forced by the tiny glyph model:
- no `mm_vision_tower` field: with it, `blip3oMetaModel.__init__` builds the TA-Tok tower and SANA
  from the hub (blip3o_arch.py l.26-44); the glyph model has neither, and the patched
  `generate_images` draws glyphs instead (bench/upstream/blip3o-next-cpu.patch);
- config.json and tokenizer_config.json in transformers 4.x spelling (`rope_theta`, `torch_dtype`;
  `PreTrainedTokenizerFast`, `additional_special_tokens`), which the fork's pinned transformers 4.54.1
  reads, where our 5.x save writes `rope_parameters`, `dtype`, `TokenizersBackend`, `extra_special_tokens`;
- a generation_config.json that samples image tokens only (`suppress_tokens` = every other id) with
  no top-k / top-p cut: the fork calls `generate(do_sample=True, temperature=1.0)` on the model's
  generation config (blip3o_qwen_grpo.py l.168-174), and samples the whole vocabulary there; the
  released checkpoints emit image tokens after `<im_start><S0>` because they were trained to, a
  random tiny model does not. blip3o-rl's rollout samples the same way (`allowed_token_ids`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench.upstream.job import non_image_ids

TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja")


def blip3o_config(ar_config: dict, token_ids: dict[str, int]) -> dict:
    """Our ar/config.json (transformers 5.x) -> BLIP3o-NEXT's config.json (transformers 4.x keys)."""
    config = {k: v for k, v in ar_config.items() if k not in ("rope_parameters", "dtype", "transformers_version")}
    rope = ar_config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE maps to transformers 4.x here, got {rope}")
    return {**config, "rope_theta": rope.get("rope_theta", ar_config.get("rope_theta", 10000.0)), "rope_scaling": None,
            "torch_dtype": ar_config.get("dtype", "float32"), "model_type": "blip3o_qwen",
            "architectures": ["blip3oQwenForCausalLM"], "mm_use_im_start_end": True, **token_ids}


def tokenizer_config_4x(config: dict) -> dict:
    """Our tokenizer_config.json (transformers 5.x) -> the keys transformers 4.54 reads."""
    kept = {k: v for k, v in config.items() if k not in ("backend", "extra_special_tokens")}
    return {**kept, "tokenizer_class": "PreTrainedTokenizerFast",
            "additional_special_tokens": list(config.get("extra_special_tokens") or [])}


def token_id_fields(vocab) -> dict[str, int]:
    """BLIP3o-NEXT's token-id config fields from an `ImageVocab`."""
    return {"image_start_tag_id": vocab.im_start_id, "image_end_tag_id": vocab.im_end_id,
            "scale_start_token_id": vocab.scale_ids[0], "scale_end_token_id": vocab.scale_ids[-1],
            "num_scale_tokens": len(vocab.scale_ids), "image_start_token_id": vocab.image_token_start,
            "image_end_token_id": vocab.image_token_end - 1, "num_image_tokens": vocab.codebook_size,
            "num_new_tokens": vocab.codebook_size}


def image_only_generation_config(vocab, vocab_rows: int, pad_id: int | None) -> dict:
    """Sample image tokens only, the whole softmax over them (no top-k, no top-p)."""
    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "pad_token_id": pad_id,
            "suppress_tokens": non_image_ids(vocab, vocab_rows)}


def write_blip3o_checkpoint(model_dir: Path, out: Path, tokens_per_image: int) -> Path:
    """Write `model_dir` (a blip3o-rl tiny glyph model) as a BLIP3o-NEXT GRPO checkpoint at `out`."""
    from transformers import AutoTokenizer

    from policy.vocab import ImageVocab

    ar = Path(model_dir) / "ar"
    tokenizer = AutoTokenizer.from_pretrained(ar)
    vocab = ImageVocab.from_tokenizer(tokenizer, tokens_per_image)
    ar_config = json.loads((ar / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(blip3o_config(ar_config, token_id_fields(vocab)), indent=2))
    generation = image_only_generation_config(vocab, ar_config["vocab_size"], tokenizer.pad_token_id)
    (out / "generation_config.json").write_text(json.dumps(generation))
    shutil.copy2(ar / "model.safetensors", out / "model.safetensors")  # Qwen3 names are BLIP3o's names
    tokenizer_config = tokenizer_config_4x(json.loads((ar / "tokenizer_config.json").read_text()))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    for name in TOKENIZER_FILES:
        if (ar / name).is_file():
            shutil.copy2(ar / name, out / name)
    return out
