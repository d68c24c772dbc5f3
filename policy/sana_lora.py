"""LoRA on SANA's transformer (the diffusion learner's adapter): its config and its merged export.

The AR adapter's pieces (policy/lora.py) on another module: the same PEFT saved names
(`base_model.model.<module>.lora_A.weight` [r, in], `...lora_B.weight` [out, r]), the same
W = W_base + (alpha / r) B @ A, the same adapter directory. Only the targeted layer names and the
defaults differ. Decoder workers serve it unmerged beside the base (`policy.lora.UnmergedAdapter`,
rollout/decoder_weights.py); only an export merges it, with the adapted layers in float32 (why:
policy/lora.py's module docstring).

Targets: Flow-GRPO's SD3 adapter (yifan123/flow_grpo `scripts/train_sd3.py`, r 32, alpha 64) sits on
the attention projections only: `attn.to_q/to_k/to_v/to_out.0` and SD3's joint-attention context
projections `attn.add_q_proj/add_k_proj/add_v_proj/to_add_out`. SANA (diffusers 0.42
`SanaTransformer2DModel`) has no joint attention; its equivalents are the self-attention `attn1`
and the cross-attention to the caption `attn2`, each `to_q, to_k, to_v, to_out.0`. SANA's
feed-forward (GLUMBConv: `ff.conv_inverted`, `ff.conv_depth`, `ff.conv_point`) is convolutions, not
linears, so, as in Flow-GRPO, it is not adapted.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import torch

from policy.lora import (
    LoRAConfig,
    LoRAMerger,
    check_adapter_fits,
    find_adapter,
    linear_adapter_specs,
    linear_shapes,
    merge_record,
    read_adapter,
)
from policy.weights import ParamSpec

SANA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
"""attn1 (self) and attn2 (cross) projections of every SANA block, by peft's suffix rule."""


class TransformerLoRAConfig(LoRAConfig):
    """A LoRA adapter on SANA's transformer (None in a config = full fine-tuning of the transformer).
    Defaults: Flow-GRPO's SD3 adapter (r 32, alpha 64) on SANA's attention projections."""

    task_type: ClassVar[str | None] = None  # a plain module for peft, not a causal LM

    rank: int = 32
    """Adapter rank r (Flow-GRPO: 32)."""
    alpha: float = 64.0
    """Scale numerator: the update is (alpha / r) * B @ A (Flow-GRPO: 64)."""
    target_modules: tuple[str, ...] = SANA_TARGET_MODULES
    """Linear layers of the transformer that get an adapter, by name or name suffix (peft's rule);
    SANA's attn1/attn2 to_q, to_k, to_v, to_out.0 by default."""


def transformer_linears(transformer_dir: Path) -> dict[str, tuple[int, int]]:
    """Every `nn.Linear` of the SANA transformer in `transformer_dir` -> (out, in), built on the meta
    device (no weights read)."""
    from diffusers import SanaTransformer2DModel

    config = SanaTransformer2DModel.load_config(transformer_dir)
    with torch.device("meta"):
        model = SanaTransformer2DModel.from_config(config)
    return linear_shapes(model)


def transformer_adapter_specs(transformer_dir: Path, lora: LoRAConfig, dtype: torch.dtype) -> dict[str, ParamSpec]:
    """What a published transformer adapter must contain: PEFT name -> shape, served dtype."""
    return linear_adapter_specs(transformer_linears(transformer_dir), lora, dtype, transformer_dir)


def _stored_dtype(transformer_dir: Path) -> torch.dtype:
    """The dtype of the first weight stored in a diffusers directory (an export keeps it)."""
    from safetensors import safe_open

    file = sorted(Path(transformer_dir).glob("*.safetensors"))[0]
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(next(iter(handle.keys()))).dtype


def export_merged_transformer(source: Path, out: Path, base: str | None = None) -> Path:
    """A diffusers transformer directory (what the diffusion learner's full fine-tuning export
    writes: a model directory's sana/transformer) holding the base transformer with the adapter of
    `source` merged in: the adapted layers in float32 (merged into bfloat16, most of a small update
    would round away), the rest in the base's stored dtype. `source`: an adapter directory, or a
    checkpoint whose `policy/` holds one; `base`: the model directory (default: the one the adapter
    names). Loaded in float32 it is the function a decoder serves with the adapter published to it
    (beside the base); loaded in bfloat16 the merge is rounded again. The output appears only when complete."""
    from diffusers import SanaTransformer2DModel

    from policy.model_dir import resolve_model_dir

    raw, adapter, named_base = read_adapter(find_adapter(source))
    lora = TransformerLoRAConfig(**raw.model_dump())
    if not (base or named_base):
        raise ValueError(f"the adapter in {source} names no base model: pass base=MODEL_DIR")
    transformer_dir = resolve_model_dir(base or named_base).sana_transformer
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new directory")
    dtype = _stored_dtype(transformer_dir)
    check_adapter_fits(transformer_adapter_specs(transformer_dir, lora, dtype), adapter, transformer_dir)
    model = SanaTransformer2DModel.from_pretrained(transformer_dir, torch_dtype=dtype)
    merged = LoRAMerger.from_module(model, lora, dtype).merged(adapter)
    with torch.no_grad():
        for name, weight in merged.items():
            model.get_parameter(name).data = weight  # float32, not copied into the base's dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; decoders of other users read it
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "merged_lora.json").write_text(json.dumps(merge_record(source, transformer_dir, lora), indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
