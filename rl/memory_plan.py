"""Memory planner: what every role of a run config needs on its device, before anything starts.

    blip3o-rl plan --config FILE [--model-shape NAME] [--device-gib N] [--host-gib N]

The model's shape comes from its config files (ar/config.json, connector/connector.json,
sana/transformer and sana/vae configs, blip3o_rl_model.json), instantiated on the meta device to
count parameters exactly; no weight is read. A config whose model directory does not exist (the
GPU configs point at a converted checkpoint) needs `--model-shape` (a `policy.tiny` preset, or
`blip3o-next-3b`: the full-depth real model).

Formulas (bytes; P = AR parameters, tied head counted once; d = bytes per element of the role's
dtype; W = learner.world_size; z = ZeRO stage; V = vocabulary rows, h = hidden, K = codebook,
N = tokens per image, L = prompt + N tokens (+ N for an edit: its prompt holds the source image's
N codes), I = MLP width, n_l = AR layers):

  learner rank (DeepSpeed, torch AdamW wrapped by ZeRO):
    weights        d P / (W if z = 3 else 1)
    optimizer      z >= 1: 12 P / W  (an fp32 master partition cloned from the weights even when
                   they are fp32, plus Adam's m and v in fp32; DeepSpeed stage_1_and_2.py /
                   stage3.py); z = 0: 2 d P (m and v in the weights' dtype, no master)
    gradients      d P / (W if z >= 2 else 1), plus the fp32 flat gradient of this rank's
                   partition at the step, 4 P / W (z >= 1)
    reference      beta > 0: d P / (W if z = 3 else 1)  (frozen, no optimizer)
    LoRA           (learner.lora) the base as frozen weights (no optimizer, gradient or reference
                   copy), and the lines above for the adapter's A = n_l r (in + out) parameters
    head transient tied head: the embedding's dense [V, h] gradient before it is summed, d V h
    activations    micro_batch_size * row, row = N K c  with c = 8 for float32 (the [N, K] logits
                   and the backward's one float32 gradient buffer, `head_bytes_per_logit`), or
                   2d + 8 below float32 (plus the float32 copy and the gradient in the logits' dtype)
                     + L n_l a d,  a = 4h + 3 q + 3 kv + 4I + heads L    saved per layer and token:
                   norms, q/k/v (q = heads x head_dim, kv = kv_heads x head_dim), attention output,
                   the SwiGLU's gate, up, silu(gate), product; attention probabilities (heads x L)
                   when the kernel materialises them (CPU); with gradient checkpointing only the
                   layer inputs are kept (L n_l h d) plus one layer recomputed (L a d).
    publish        full weights: at z = 3 one bucket of the weight sync gathered whole at a time;
                   over broadcast rank 0's packed bucket on `sync.broadcast_device` (a bucket is
                   `sync.bucket_mb`, or the largest tensor, the embedding V h, if bigger)
  diffusion learner rank (DeepSpeed on SANA's transformer, P_s its parameters): the lines above for
                   P_s (full fine-tuning: weights, optimizer, gradients, a frozen copy as the
                   reference when flow.beta > 0, the publish; LoRA: the frozen base and the
                   adapter's states, the reference is the base with the adapter off), + the frozen
                   connector, + the EMA (`ema`: float32, whole on every rank, of the trained weights
                   or the adapter), + activations of ONE SDE step (every step is its own backward):
                   micro_batch_size images, 2 rows each under CFG, x the bytes a row keeps
                   (rl/sana_memory.py, with or without gradient_checkpointing), + the backward's
                   working set (estimate: one more block's saved tensors), + the reference's forward
                   without grad, run while the policy's activations are held (beta > 0).
  received update (every worker serving the AR policy): over shared memory or the object store
                   nothing of its own (it reads the sender's buffer, planned once as `weight buffer`);
                   over broadcast one bucket (or the embedding, if bigger), streamed in; plus for
                   vLLM the layer it is loading, which its reload builds anew before copying it
                   back (at most the embedding, d V h); under LoRA the adapter, whole. The
                   decoders' transformer stream (from the diffusion learner) likewise, its largest
                   tensor SANA's feed-forward conv (2F x D_s) instead of the embedding.
  weight buffer (shared memory, object store): the packed update d_learner P, one copy in the
                   host's RAM (tmpfs / the object store) that every worker on the machine reads.
  rollout worker (vLLM):  weights d P (on CPU vLLM packs every linear layer for oneDNN in place,
                   but a tied embedding keeps its weight for lookups beside the head's packed copy:
                   + d V h) + kv_cache_gib + the received update + runtime. The update's rebuilt
                   layer is d V h on GPU; on CPU 3 d V h: the rebuilt layer, its new packed copy
                   and the transposed copy packing makes (inferred: the worker's start-up, which
                   packs the head once, peaks d V h above its steady state; bench_scale.py).
  decoder worker: AR copy, connector, SANA, whole DC-AE in its dtype (+ the transformer adapter,
                   served unmerged, under transformer_lora) + runtime + the larger of a received
                   update (the AR or the transformer stream; an actor runs one call at a time) and a
                   decode call's activations (rl/sana_memory.py), planned as if they coexisted:
                   SANA's forward without grad for the call's m images (decoder.micro_batch_size,
                   default the chunk, chunk_prompts x group_size), 2 rows each under CFG; with the
                   SDE sampler (train has diffusion) the trajectory's float32 latents and the AR
                   states; the DC-AE decode of vae_micro_batch_size images (default m) at a time.
  reward replica: per scorer, parameters + activations (constants below).

`runtime` is the process itself (Python, torch and the role's libraries): measured RSS of the
imports on this machine (CPU) or a CUDA context (GPU). On CPU every role shares one machine's RAM, so
the plan sums them against `--host-gib` (default: this machine's MemTotal); on GPU each role has its
own GPU of `--device-gib` (default 80, an A100/H100 80GB). The constants are estimates where marked;
bench/bench_scale.py reports them against measured peaks (`plan_vs_measured`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from rl.sana_memory import (
    SanaShape,
    dc_ae_decode_peak,
    guided_forward_peak,
    sana_adapter_params,
    saved_per_block,
    saved_per_row,
    sde_trajectory_bytes,
    shape_from_sana_configs,
)

GIB = 2**30
MIB = 2**20
PROMPT_TOKENS = 64
"""Rollout prompt length assumed for activations (system turn + instruction + caption + markers:
BLIP3o-NEXT's prompt is ~30-60 Qwen tokens for GenEval / OCR captions)."""
RUNTIME_GIB = {"learner": 0.6, "rollout": 0.8, "decoder": 0.6, "reward": 0.45}
"""CPU process baselines, calibrated on bench/bench_scale.py --preset sana (tiny weights, so the
process is nearly all of it; 2026-11-30): learner actor 0.62 GiB, decoder 0.58, vLLM worker 1.82
with a 1 GiB KV cache (so 0.8 without it), OCR-tiny reward process 0.54. Imports alone: torch +
transformers + deepspeed 0.27 GiB, + diffusers 0.40."""
CUDA_CONTEXT_GIB = 1.0
"""Per GPU process: CUDA context + allocator slack (estimate, not measured here: no GPU)."""
OCR_GIB = {"tiny": 0.1, "small": 0.2}
"""PP-OCRv6 det + rec sessions on onnxruntime above the process baseline: tiny measured (0.54 GiB
process in total, see RUNTIME_GIB); small estimated (its ONNX files are 30 MB against tiny's 6 MB)."""
GENEVAL_PARAMS = {"detector": 68_800_000, "clip": 427_600_000}
"""facebook/mask2former-swin-small-coco-instance and openai/clip-vit-large-patch14 (model cards)."""
GENEVAL_ACTIVATION_GIB = 1.5
"""Mask2Former at ~800 px + CLIP crops, per batch of images (estimate, unmeasured)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes the plan needs, read from a model directory or a preset."""

    ar_params: int
    vocab_rows: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    codebook: int
    tokens_per_image: int
    image_size: int
    decoder: str
    connector_params: int = 0
    sana_params: int = 0
    vae_params: int = 0
    sana: SanaShape | None = None
    """SANA's and the DC-AE's widths (rl/sana_memory.py); None without a SANA decoder."""


@dataclass(frozen=True)
class Line:
    """One row of a role's table."""

    what: str
    bytes: float
    note: str = ""


@dataclass(frozen=True)
class RolePlan:
    role: str
    lines: list[Line]
    device: str
    count: int = 1
    """Processes of this role (each on its own GPU on GPU; all on one machine on CPU)."""

    @property
    def total(self) -> float:
        return sum(line.bytes for line in self.lines)


# ----- the model's shape ------------------------------------------------------------------------

def _meta_params(build) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def shape_from_configs(ar_config, layout: dict, connector: tuple[int, int] | None,
                       transformer_config: dict | None, vae_config: dict | None) -> ModelShape:
    """A ModelShape from a Qwen3 config and the SANA / DC-AE constructor configs (meta device)."""
    from transformers import Qwen3ForCausalLM

    ar_params = _meta_params(lambda: Qwen3ForCausalLM(ar_config))
    fields = dict(
        ar_params=ar_params, vocab_rows=ar_config.vocab_size, hidden=ar_config.hidden_size,
        layers=ar_config.num_hidden_layers, heads=ar_config.num_attention_heads,
        kv_heads=ar_config.num_key_value_heads,
        head_dim=getattr(ar_config, "head_dim", None) or ar_config.hidden_size // ar_config.num_attention_heads,
        intermediate=ar_config.intermediate_size, tied=bool(ar_config.tie_word_embeddings),
        codebook=int(layout.get("codebook_size", 65536)), tokens_per_image=int(layout["tokens_per_image"]),
        image_size=int(layout["image_size"]), decoder=layout.get("decoder", "sana"),
    )
    if connector is not None:
        h, out = connector
        fields["connector_params"] = h * out + out + out * out + out + out
    if transformer_config and vae_config:
        import torch
        from diffusers import AutoencoderDC, SanaTransformer2DModel

        from policy.lora import linear_shapes

        clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        transformer_config, vae_config = clean(transformer_config), clean(vae_config)
        with torch.device("meta"):
            transformer = SanaTransformer2DModel(**transformer_config)
        fields["sana_params"] = sum(p.numel() for p in transformer.parameters())
        fields["vae_params"] = _meta_params(lambda: AutoencoderDC(**vae_config))
        fields["sana"] = shape_from_sana_configs(transformer.config, vae_config, fields["image_size"],
                                                 linear_shapes(transformer))
    return ModelShape(**fields)


def shape_from_model_dir(root: Path) -> ModelShape:
    """Read every config file of a blip3o-rl model directory (no weights)."""
    from transformers import AutoConfig

    from policy.model_dir import LAYOUT_FILE, ModelPaths

    paths = ModelPaths(root)
    raw_layout = json.loads((root / LAYOUT_FILE).read_text())
    layout = {**raw_layout.get("tiny_spec", {}), **raw_layout}
    ar_config = AutoConfig.from_pretrained(paths.ar)
    if "codebook_size" not in layout and getattr(ar_config, "num_image_tokens", None):
        layout["codebook_size"] = ar_config.num_image_tokens  # written by BLIP3o-NEXT's tokenizer setup
    connector_file = paths.connector / "connector.json"
    connector = None
    if connector_file.is_file():
        raw = json.loads(connector_file.read_text())
        connector = (raw["ar_hidden_size"], raw["out_dim"])
    transformer = vae = None
    if (paths.sana_transformer / "config.json").is_file():
        transformer = json.loads((paths.sana_transformer / "config.json").read_text())
        vae = json.loads((paths.sana_vae / "config.json").read_text())
    return shape_from_configs(ar_config, layout, connector, transformer, vae)


def shape_from_preset(name: str) -> ModelShape:
    """A policy.tiny preset, or `blip3o-next-3b` (the preset at full depth: 28 AR layers, 20 SANA
    layers, DC-AE with its published layers per block)."""
    from policy.tiny import PRESETS, ar_config, sana_configs

    if name == "blip3o-next-3b":
        spec = replace(PRESETS["blip3o-next-shape"], num_layers=28, sana_layers=20)
        encoder_layers, decoder_layers = (2, 2, 2, 3, 3, 3), (3, 3, 3, 3, 3, 3)
    elif name in PRESETS:
        spec, encoder_layers, decoder_layers = PRESETS[name], None, None
    else:
        raise ValueError(f"unknown model shape '{name}'; choose blip3o-next-3b or one of {sorted(PRESETS)}")
    rows = (spec.text_vocab_rows or spec.text_vocab_size) + 5 + spec.codebook_size  # text + markers + image block
    vae, transformer = sana_configs(spec)
    if encoder_layers:
        vae.update(encoder_layers_per_block=encoder_layers, decoder_layers_per_block=decoder_layers)
    layout = {"codebook_size": spec.codebook_size, "tokens_per_image": spec.tokens_per_image,
              "image_size": spec.image_size, "decoder": spec.decoder}
    sana = spec.decoder == "sana"
    return shape_from_configs(ar_config(spec, rows), layout, (spec.hidden_size, spec.connector_dim),
                              transformer if sana else None, vae if sana else None)


# ----- the formulas -----------------------------------------------------------------------------

def bytes_per_element(dtype: str) -> int:
    return {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2}[dtype]


def learner_state_lines(params: int, d: int, world: int, zero: int, reference: bool) -> list[Line]:
    """Weights, optimizer states, gradients and the reference model of one rank (see module docstring)."""
    shard_params = world if zero == 3 else 1
    shard_grads = world if zero >= 2 else 1
    lines = [Line("weights", d * params / shard_params, f"{d} B/param" + (f" / {world} ranks" if zero == 3 else ""))]
    if zero >= 1:
        lines.append(Line("optimizer (fp32 master + Adam m, v)", 12 * params / world, f"12 B/param / {world} ranks"))
        lines.append(Line("gradients", d * params / shard_grads + 4 * params / world,
                          f"{d} B/param" + (f" / {world}" if zero >= 2 else "") + f" + fp32 partition 4 B/param / {world}"))
    else:
        lines.append(Line("optimizer (Adam m, v)", 2 * d * params, f"2 x {d} B/param"))
        lines.append(Line("gradients", d * params, f"{d} B/param"))
    if reference:
        lines.append(Line("reference model", d * params / shard_params, "frozen copy" + (" (ZeRO-3 sharded)" if zero == 3 else "")))
    return lines


def lora_params(shape: ModelShape, lora) -> int:
    """Adapter parameters of `lora` (policy/lora.py): r (in + out) per targeted projection and
    layer, plus r (hidden + vocabulary rows) for an adapter on the (untied) head. Target names other
    than Qwen3's seven projections and `lm_head` are not counted."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    layers = shape.layers * sum(lora.rank * (a + b) for name, (a, b) in sizes.items() if name in lora.target_modules)
    head = lora.rank * (h + shape.vocab_rows) if "lm_head" in lora.target_modules else 0
    return layers + head


def lora_state_lines(params: int, adapter: int, d: int, world: int, zero: int) -> list[Line]:
    """Under LoRA: the frozen base (sharded at stage 3, no optimizer, no gradient, and no reference
    copy: the reference is the base with the adapter off), then the adapter's own states."""
    shard = world if zero == 3 else 1
    note = f"{d} B/param" + (f" / {world} ranks" if zero == 3 else "")
    lines = [Line("frozen base weights", d * params / shard, note)]
    return lines + [Line(f"adapter {line.what}", line.bytes, f"{adapter:,} params: {line.note}")
                    for line in learner_state_lines(adapter, d, world, zero, reference=False)]


def layer_activation_elements(shape: ModelShape, seq: int, probs: bool) -> int:
    """Elements one decoder layer keeps for backward per token (see module docstring)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return 4 * shape.hidden + 3 * q + 3 * kv + 4 * shape.intermediate + (shape.heads * seq if probs else 0)


def head_bytes_per_logit(d: int) -> int:
    """Bytes per [N, K] image logit a row keeps through the backward (policy/logprobs.py
    `codebook_token_logprobs`): the logits (d), their float32 copy when d < 4 (the log-prob is
    computed in float32), and the backward's one float32 gradient buffer, plus the gradient back to
    the logits' dtype when they are not float32. The entropy is computed in chunks: negligible."""
    return 8 if d == 4 else d + 4 + 4 + d


def prompt_tokens(shape: ModelShape, edits: bool) -> int:
    """A rollout prompt's length for the activations: an edit prompt also holds the source image's
    codes, as many as an image's tokens (policy/prompt.py `edit_prompt_ids`)."""
    return PROMPT_TOKENS + (shape.tokens_per_image if edits else 0)


def learner_row_bytes(shape: ModelShape, d: int, checkpointing: bool, probs: bool,
                      prompt: int = PROMPT_TOKENS) -> tuple[float, float]:
    """(head bytes, layer bytes) one micro-batch row needs for backward."""
    n, seq = shape.tokens_per_image, prompt + shape.tokens_per_image
    head = n * shape.codebook * head_bytes_per_logit(d)
    per_layer = layer_activation_elements(shape, seq, probs)
    if checkpointing:
        layers = seq * d * (shape.layers * shape.hidden + per_layer)
    else:
        layers = seq * d * shape.layers * per_layer
    return head, layers


def plan_learner(shape: ModelShape, learner, on_gpu: bool, prompt: int = PROMPT_TOKENS) -> RolePlan:
    d = bytes_per_element(learner.precision)
    if learner.lora is None:
        lines = learner_state_lines(shape.ar_params, d, learner.world_size, learner.zero_stage, learner.grpo.beta > 0)
    else:
        lines = lora_state_lines(shape.ar_params, lora_params(shape, learner.lora), d, learner.world_size,
                                 learner.zero_stage)
    if shape.tied and learner.lora is None:  # under LoRA the embedding is frozen: no gradient
        lines.append(Line("tied head gradient (transient)", d * shape.vocab_rows * shape.hidden, "[V, h] dense"))
    if learner.lora is None:
        lines += publish_lines(learner, d * shape.vocab_rows * shape.hidden, "the embedding")
    head, layers = learner_row_bytes(shape, d, learner.gradient_checkpointing, probs=not on_gpu, prompt=prompt)
    b = learner.micro_batch_size
    lines.append(Line("activations: image logits", b * head,
                      f"{b} rows x [{shape.tokens_per_image}, {shape.codebook}] x {head_bytes_per_logit(d)} B"))
    lines.append(Line("activations: layers", b * layers, f"{b} rows x {prompt + shape.tokens_per_image} tokens x "
                      f"{shape.layers} layers" + (" (checkpointed)" if learner.gradient_checkpointing else "")))
    lines.append(_runtime("learner", on_gpu))
    return RolePlan("learner rank", lines, learner.device, learner.world_size)


def publish_lines(learner, largest: float, largest_name: str) -> list[Line]:
    """What publishing full weights adds on the sender: at ZeRO-3 one bucket gathered whole at a
    time; over broadcast rank 0's packed bucket, on `sync.broadcast_device` (a bucket is
    `sync.bucket_mb`, or the largest tensor if bigger). An adapter (LoRA) is megabytes: not planned."""
    bucket = max(learner.sync.bucket_mb * MIB, largest)
    where = f"sync.bucket_mb {learner.sync.bucket_mb} or {largest_name}"
    lines = []
    if learner.zero_stage == 3:
        lines.append(Line("publish gather (one bucket)", bucket, f"{where}, gathered whole"))
    if learner.sync.transport == "broadcast":
        lines.append(Line("publish packed bucket (rank 0)", bucket, f"{where}, on {learner.sync.broadcast_device}"))
    return lines


def received_update(shape: ModelShape, learner, served_d: int, vllm: bool, on_gpu: bool = True) -> Line:
    """What a worker holds of one AR weight update while loading it (see module docstring)."""
    if learner is None:
        return Line("weight update received", 0, "the AR policy is frozen: no update")
    d = bytes_per_element(learner.precision)
    if learner.lora is not None:
        return Line("weight update received", d * lora_params(shape, learner.lora), "the LoRA adapter, whole")
    embedding = shape.vocab_rows * shape.hidden
    # vLLM's reload builds the layer anew, then copies it back; on CPU it also packs the head again
    layer = served_d * embedding * (1 if on_gpu else 3) if vllm else 0
    rebuilt = (", + the layer vLLM's reload is building" + ("" if on_gpu else " and its head packing (x3)")) if vllm else ""
    if learner.sync.transport != "broadcast":
        return Line("weight update received", layer, f"read from the sender's {learner.sync.transport} buffer{rebuilt}")
    bucket = max(learner.sync.bucket_mb * MIB, d * embedding)
    return Line("weight update received", bucket + layer,
                f"streamed: one {learner.sync.bucket_mb} MiB bucket or the embedding{rebuilt}")


def plan_weight_buffer(learner, params: int, role: str = "weight buffer (shared memory)") -> RolePlan | None:
    """The packed update (`params` parameters in the learner's precision) that the shared-memory and
    object-store transports keep in the host's RAM."""
    if learner is None or learner.sync.transport == "broadcast":
        return None
    d = bytes_per_element(learner.precision)
    return RolePlan(role, [Line("packed update", d * params, f"{learner.sync.transport}, one copy read by every worker")],
                    "cpu")


def published_ar_params(shape: ModelShape, learner) -> int:
    """Parameters an AR publish sends: the adapter under LoRA, else the model (a tied head once)."""
    return lora_params(shape, learner.lora) if learner.lora is not None else shape.ar_params


def plan_rollout(shape: ModelShape, engine, learner, on_gpu: bool, workers: int) -> RolePlan:
    d = bytes_per_element(engine.dtype)
    lines = [Line("weights", d * shape.ar_params, f"{d} B/param")]
    if not on_gpu and shape.tied:
        lines.append(Line("oneDNN copy of the tied head", d * shape.vocab_rows * shape.hidden,
                          "vLLM-cpu packs linear layers in place; the embedding keeps its weight too"))
    lines += [Line("KV cache", engine.kv_cache_gib * GIB, "rollout.engine.kv_cache_gib"),
              received_update(shape, learner, d, vllm=True, on_gpu=on_gpu),
              _runtime("rollout", on_gpu)]
    return RolePlan("rollout worker (vLLM)", lines, engine.device, workers)


def received_transformer_update(shape: ModelShape, diffusion) -> Line:
    """What a decoder holds of one SANA transformer update while loading it (the second stream)."""
    if diffusion is None:
        return Line("transformer update received", 0, "SANA is frozen: no update")
    d = bytes_per_element(diffusion.precision)
    if diffusion.lora is not None:
        return Line("transformer update received", d * sana_adapter_params(shape.sana, diffusion.lora),
                    "the LoRA adapter, whole")
    if diffusion.sync.transport != "broadcast":
        return Line("transformer update received", 0, f"read from the sender's {diffusion.sync.transport} buffer")
    bucket = max(diffusion.sync.bucket_mb * MIB, d * largest_sana_tensor(shape.sana))
    return Line("transformer update received", bucket, f"streamed: one {diffusion.sync.bucket_mb} MiB bucket "
                "or the feed-forward's conv, if bigger")


def largest_sana_tensor(sana: SanaShape) -> int:
    """Elements of SANA's largest weight: the feed-forward's 1x1 conv to 2F channels, or a Linear."""
    return max([2 * sana.ff * sana.hidden] + [out * inp for out, inp in sana.linears.values()])


def decode_lines(shape: ModelShape, decoder, images: int, sde_steps: int | None) -> list[Line]:
    """The activations of one decode call of `images` images (module docstring): SANA's guided
    forward (2 rows an image under CFG), with the SDE sampler its trajectory and the AR states, then
    the DC-AE in calls of `decoder.vae_micro_batch_size` images. Planned as if they coexisted."""
    sana, d = shape.sana, bytes_per_element(decoder.dtype)
    captions = shape.tokens_per_image + 1
    cfg = 1 if decoder.guidance_scale == 1.0 else 2
    rows = cfg * images
    lines = [Line(f"SANA forward ({rows} rows)", rows * guided_forward_peak(sana, captions, d),
                  f"{images} images{' x 2 (CFG)' if cfg == 2 else ''} x {sana.tokens} latent tokens, no grad")]
    if sde_steps is not None:
        kept = images * (sde_trajectory_bytes(sana, sde_steps) + captions * shape.hidden * d)
        lines.append(Line("SDE trajectory + AR states", kept, f"{sde_steps + 1} float32 latents (list and stack) "
                          f"and [{captions}, {shape.hidden}] states per image"))
    vae_images = min(decoder.vae_micro_batch_size or images, images)
    lines.append(Line(f"DC-AE decode ({vae_images} images per call)", vae_images * dc_ae_decode_peak(sana, shape.image_size, d),
                      f"{shape.image_size}^2 px x {sana.vae_first_width} ch x "
                      f"{dc_ae_decode_peak(sana, 1, d) / sana.vae_first_width:g} B"))
    return lines


def plan_decoder(shape: ModelShape, decoder, learner, batch: int, on_gpu: bool, workers: int,
                 diffusion=None) -> RolePlan:
    """`batch` images per chunk; `diffusion`: the diffusion learner (the SDE sampler, the transformer stream)."""
    d = bytes_per_element(decoder.dtype)
    lines = [Line("AR model copy", d * shape.ar_params, "hidden states for SANA")]
    update = received_update(shape, learner, d, vllm=False)
    decoding: list[Line] = []
    if (decoder.kind or shape.decoder) == "sana" and shape.sana is not None:
        lines.append(Line("connector + SANA + DC-AE", d * (shape.connector_params + shape.sana_params + shape.vae_params),
                          "frozen" if diffusion is None else "SANA's transformer trained by the diffusion learner"))
        if decoder.transformer_lora is not None:
            lines.append(Line("transformer adapter (served unmerged)", d * sana_adapter_params(shape.sana, decoder.transformer_lora),
                              f"rank {decoder.transformer_lora.rank}"))
        images = min(decoder.micro_batch_size or batch, batch)
        decoding = decode_lines(shape, decoder, images, diffusion.sampling.steps if diffusion is not None else None)
        update = max(update, received_transformer_update(shape, diffusion), key=lambda line: line.bytes)
    # an actor runs one call at a time: a weight update never coexists with a decode's activations
    if update.bytes >= sum(line.bytes for line in decoding):
        lines.append(Line(update.what, update.bytes, update.note + "; more than a decode's activations"))
    else:
        lines += decoding
    lines.append(_runtime("decoder", on_gpu))
    return RolePlan("decoder worker", lines, decoder.device, workers)


def plan_diffusion_learner(shape: ModelShape, diffusion, guidance_scale: float, on_gpu: bool) -> RolePlan:
    """One rank of the diffusion learner (module docstring); `guidance_scale` of the SDE rollouts."""
    sana, d = shape.sana, bytes_per_element(diffusion.precision)
    world, zero = diffusion.world_size, diffusion.zero_stage
    lora = diffusion.lora
    if lora is None:
        trained = shape.sana_params
        lines = learner_state_lines(trained, d, world, zero, reference=diffusion.flow.beta > 0)
        lines += publish_lines(diffusion, d * largest_sana_tensor(sana), "the feed-forward's conv")
    else:
        trained = sana_adapter_params(sana, lora)
        lines = lora_state_lines(shape.sana_params, trained, d, world, zero)
    lines.append(Line("connector (frozen)", d * shape.connector_params, "AR states -> SANA captions"))
    if diffusion.ema is not None:
        lines.append(Line("EMA of the trained weights", 4 * trained, "float32, whole on every rank"))
    captions = shape.tokens_per_image + 1
    rows = diffusion.micro_batch_size * (1 if guidance_scale == 1.0 else 2)
    checkpointing = diffusion.gradient_checkpointing
    row = saved_per_row(sana, captions, d, lora, checkpointing)
    lines.append(Line("activations: one SDE step", rows * row,
                      f"{rows} rows ({diffusion.micro_batch_size} images{' x 2 CFG' if rows > diffusion.micro_batch_size else ''}) "
                      f"x {row / GIB:.3f} GiB" + (" (checkpointed)" if checkpointing else "")))
    lines.append(Line("backward working set (estimate)", rows * saved_per_block(sana, captions, d, lora),
                      "one more block's saved tensors"))
    if diffusion.flow.beta > 0:
        lines.append(Line("reference forward (no grad)", rows * guided_forward_peak(sana, captions, d),
                          "beside the policy's activations" + (": adapter off" if lora is not None else "")))
    lines.append(_runtime("learner", on_gpu))
    return RolePlan("diffusion learner rank", lines, diffusion.device, world)


def geneval_params(server) -> int:
    """Detector + CLIP parameters: counted from their configs when they are local directories (the
    tiny CPU models), else the published models' counts."""
    from transformers import AutoConfig, AutoModel

    total = 0
    for key in ("detector", "clip"):
        path = Path(getattr(server.geneval, key))
        if (path / "config.json").is_file():
            config = AutoConfig.from_pretrained(path)
            total += _meta_params(lambda: AutoModel.from_config(config))
        else:
            total += GENEVAL_PARAMS[key]
    return total


def plan_reward(server, batch: int, on_gpu: bool) -> RolePlan:
    lines = []
    if "ocr" in server.scorers:
        lines.append(Line(f"OCR PP-OCRv6 {server.ocr.size}", OCR_GIB[server.ocr.size] * GIB,
                          "measured" if server.ocr.size == "tiny" else "estimate"))
    if "geneval" in server.scorers:
        d = bytes_per_element(server.geneval.dtype)
        lines.append(Line("GenEval detector + CLIP", d * geneval_params(server), "Mask2Former + CLIP parameters"))
        lines.append(Line("GenEval activations", GENEVAL_ACTIVATION_GIB * GIB, "estimate, unmeasured"))
    lines.append(_runtime("reward", on_gpu and "geneval" in server.scorers))
    device = server.geneval.device if "geneval" in server.scorers else "cpu"
    return RolePlan("reward replica", lines, device)


def _runtime(role: str, on_gpu: bool) -> Line:
    if on_gpu:
        return Line("CUDA context", CUDA_CONTEXT_GIB * GIB, "estimate")
    return Line("process runtime", RUNTIME_GIB[role] * GIB, "measured imports / calibrated")


def plan_config(config, shape: ModelShape) -> list[RolePlan]:
    """Every role of a TrainConfig."""
    learner = config.learner  # None: the AR policy is frozen (no AR learner, no AR update received)
    diffusion = config.diffusion_learner  # None: SANA is frozen (ODE sampling, no transformer stream)
    engine, decoder = config.rollout.engine, config.decoder.decoder
    batch = config.schedule.chunk_prompts * config.data.group_size
    plans = [plan_rollout(shape, engine, learner, engine.device != "cpu", config.rollout.workers),
             plan_decoder(shape, decoder, learner, batch, decoder.device != "cpu", config.decoder.workers, diffusion)]
    if learner is not None:
        plans.append(plan_learner(shape, learner, learner.device != "cpu", prompt_tokens(shape, config.data.edits)))
        plans.append(plan_weight_buffer(learner, published_ar_params(shape, learner)))
    if diffusion is not None:
        plans.append(plan_diffusion_learner(shape, diffusion, decoder.guidance_scale, diffusion.device != "cpu"))
        published = sana_adapter_params(shape.sana, diffusion.lora) if diffusion.lora is not None else shape.sana_params
        plans.append(plan_weight_buffer(diffusion, published, "transformer weight buffer (shared memory)"))
    if config.rewards.service == "serve":
        server = config.rewards.server
        plans.append(plan_reward(server, batch, "geneval" in server.scorers and server.geneval.device != "cpu"))
    return [plan for plan in plans if plan is not None]


# ----- fitting and printing ---------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    fits: bool
    problems: list[str]


def check_fit(plans: list[RolePlan], device_gib: float, host_gib: float) -> Verdict:
    """GPU roles: each process on its own GPU of device_gib. CPU roles: all processes share host_gib."""
    problems = []
    for plan in plans:
        if plan.device.startswith("cuda") and plan.total > device_gib * GIB:
            problems.append(f"{plan.role} needs {plan.total / GIB:.1f} GiB, more than its {device_gib:g} GiB GPU")
    cpu = [p for p in plans if not p.device.startswith("cuda")]
    host_total = sum(p.total * p.count for p in cpu)
    if cpu and host_total > host_gib * GIB:
        parts = ", ".join(f"{p.role} {p.count} x {p.total / GIB:.1f}" for p in cpu)
        problems.append(f"CPU roles together need {host_total / GIB:.1f} GiB ({parts}), more than the host's {host_gib:.1f} GiB")
    return Verdict(not problems, problems)


def format_plan(plans: list[RolePlan], shape: ModelShape, device_gib: float, host_gib: float) -> str:
    out = [f"model: AR {shape.ar_params / 1e9:.3f}B params (vocab {shape.vocab_rows}, h {shape.hidden}, "
           f"{shape.layers} layers, tied {shape.tied}), SANA {shape.sana_params / 1e9:.3f}B, DC-AE {shape.vae_params / 1e9:.3f}B, "
           f"{shape.tokens_per_image} tokens/image, {shape.image_size} px"]
    for plan in plans:
        where = f"its own {device_gib:g} GiB GPU" if plan.device.startswith("cuda") else f"host RAM ({host_gib:.1f} GiB shared)"
        out.append(f"\n{plan.role} x{plan.count} on {plan.device} ({where})")
        for line in plan.lines:
            out.append(f"  {line.what:<38} {line.bytes / GIB:8.2f} GiB  {line.note}")
        out.append(f"  {'total per process':<38} {plan.total / GIB:8.2f} GiB")
    return "\n".join(out)


def default_host_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("no MemTotal in /proc/meminfo: pass --host-gib")


def run_plan(config_path: str, model_shape: str | None, device_gib: float, host_gib: float | None) -> tuple[str, Verdict]:
    """Load the config, find the model's shape, plan every role; (report text, verdict)."""
    from rl.run.config import load_config

    config = load_config(config_path)
    root = Path(config.model.path)
    if model_shape:
        shape = shape_from_preset(model_shape)
    elif (root / "blip3o_rl_model.json").is_file():
        shape = shape_from_model_dir(root)
    elif config.model.make_tiny:
        shape = shape_from_preset(config.model.make_tiny)
    else:
        raise FileNotFoundError(f"model directory {root} does not exist here: pass --model-shape "
                                "(blip3o-next-3b for the real BLIP3o-NEXT, or a make-tiny preset)")
    host = host_gib if host_gib is not None else default_host_gib()
    plans = plan_config(config, shape)
    verdict = check_fit(plans, device_gib, host)
    return format_plan(plans, shape, device_gib, host), verdict
