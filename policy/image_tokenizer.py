"""Image -> image-token ids: BLIP3o-NEXT's TA-Tok tokenizer, for source images in edit prompts.

Upstream (JiuhaiChen/BLIP3o, branch BLIP3o-NEXT; TA-Tok from csuhan/Tar), one image, as
`TATokVisionTower.forward` -> `TextAlignedTokenizer.encode` -> `Bottleneck` -> `SimVectorQuantizer`:

    RGB -> bicubic resize to S x S -> x / 255 -> (x - 0.5) / 0.5        SiglipImageProcessor, S = input_size (384)
    -> SigLIP vision tower, hidden_states[select_layer_id] (-2)        [N, h]   N = (S / patch)^2 = 729, h = 1152
    -> encode_task_layer: Linear(h, h) -> Tanh                         [N, h]
    -> bottleneck.in_linear: Linear(h, d)                              [N, d]
    -> codebook lookup against embedding_proj(embedding.weight)        [N]      K = 65,536 codes

The lookup (`nearest_codes`) is SimVectorQuantizer's in eval mode with `eval_deterministic` set (the
tower sets it): with `stochastic` (a softmax over cosine similarities in training) it is
argmax_k softmax(inv_T z.e_k), else argmin_k |z|^2 + |e_k|^2 - 2 z.e_k; `l2_normalized` normalises z
and every e_k first. Which branch applies is in TA-Tok's own args (ta_tok.pth), read, not assumed.
BLIP3o-NEXT then adds `image_start_token_id` (the id of `<I0>`) and embeds the ids with the LM's own
embedding (`encode_images`, blip3o_arch.py): the prompt's image span is `ImageVocab.to_token_ids(codes)`.

"SigLIP2" tower: TA-Tok's encoder is `AutoModel.from_config(AutoConfig(teacher)).vision_model` with
teacher google/siglip2-so400m-patch14-384, whose config is a plain `siglip` one (the fixed-resolution
SigLIP2 checkpoints use the SigLIP architecture): transformers' `SiglipVisionModel`, same tensor
names. TA-Tok's decoder side (`decoder`, a Siglip2VisionModel, `decode_task_layer`,
`bottleneck.out_linear`) does not change the ids: it is kept on disk and not built here.

Deviations, on purpose: pooling is never applied (upstream passes pool_scale 1 for input images,
prepare_inputs_labels_for_multimodal; only the POOL_SCALE environment variable would change it);
the default dtype is float32 where upstream's inference runs the tower in the model's bf16, so ids of
near-tied features may differ from a bf16 run.

On disk (`ModelPaths.image_tokenizer`), upstream's layout: `model.safetensors` holds
TextAlignedTokenizer's state dict under its own names (in a hub checkpoint they sit under
`model.vision_tower.vision_tower.`; in ta_tok.pth under ["model"]["sd"]), `ta_tok_args.json` is
ta_tok.pth's ["model"]["args"] (TextAlignedTokenizer's constructor arguments) and
`encoder_config.json` the SigLIP vision config AutoConfig(teacher) gives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from policy.model_dir import ModelPaths
from policy.vocab import ImageVocab

WEIGHTS_STEM = "model"
WEIGHTS_GLOB = "model*.safetensors"
"""`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards as the converter writes a large tower."""
ARGS_FILE = "ta_tok_args.json"
ENCODER_CONFIG_FILE = "encoder_config.json"
DECODE_SIDE_PREFIXES = ("decoder.", "decode_task_layer.", "bottleneck.out_linear.", "scale_layer.")
"""TextAlignedTokenizer parts the ids do not depend on (feature decoder, the ScalingLayer that BLIP3o-NEXT
replaces by the identity because SiglipImageProcessor already normalises): kept on disk, not built."""
LOOKUP_ROWS = 1024
"""Features per block of the codebook lookup (a [rows, K] distance block; rows are independent)."""


class ImageTokenizerNotFoundError(FileNotFoundError):
    """The model directory has no image tokenizer; the message says how to get one."""


@runtime_checkable
class ImageToIds(Protocol):
    """Image -> codebook indices of its image tokens; the edit rollout takes any implementation."""

    tokens_per_image: int
    codebook_size: int

    def encode(self, images: Sequence) -> torch.Tensor:
        """B images (PIL or [H, W, 3] uint8 arrays) -> [B, tokens_per_image] codebook indices."""
        ...


@dataclass(frozen=True)
class VQSpec:
    """SimVectorQuantizer's arguments (ta_tok.pth args["bottleneck"]["args"]["regularizer"]["args"])."""

    codebook_size: int
    dim: int
    """Code width: the bottleneck's `bottleneck_dim`."""
    l2_normalized: bool = False
    stochastic: bool = False
    stochastic_temperature: float = 1.0
    """> 0: fixed; <= 0: learned (`stochastic_temperature_inv` is then a tensor of the state dict)."""


@dataclass(frozen=True)
class TATokSpec:
    """What of TextAlignedTokenizer's arguments the ids depend on."""

    input_size: int
    select_layer_id: int
    vq: VQSpec

    @classmethod
    def from_args(cls, args: dict) -> TATokSpec:
        """From ta_tok.pth's args, with TextAlignedTokenizer's defaults for absent keys."""
        bottleneck = args["bottleneck"]["args"]
        if bottleneck.get("bottleneck_dim", 0) <= 0:
            raise ValueError("TA-Tok without a bottleneck projection (bottleneck_dim <= 0) is not supported")
        regularizer = bottleneck["regularizer"]
        if regularizer.get("name") != "simvq":
            raise ValueError(f"TA-Tok regularizer {regularizer.get('name')!r}: only 'simvq' (SimVectorQuantizer) is known")
        vq_args = regularizer["args"]
        vq = VQSpec(codebook_size=int(vq_args["codebook_size"]), dim=int(bottleneck["bottleneck_dim"]),
                    l2_normalized=bool(vq_args.get("l2_normalized", False)), stochastic=bool(vq_args.get("stochastic", False)),
                    stochastic_temperature=float(vq_args.get("stochastic_temperature", 1.0)))
        if vq.stochastic and not vq.l2_normalized:
            raise ValueError("TA-Tok args: stochastic sampling requires l2_normalized (as SimVectorQuantizer asserts)")
        return cls(input_size=int(args.get("input_size", 384)), select_layer_id=int(args.get("select_layer_id", -2)), vq=vq)


def preprocess(image, size: int) -> torch.Tensor:
    """upstream's `SiglipImageProcessor()` with size (S, S), as transformers 4.5x computes it:
    RGB, PIL bicubic resize to S x S, x * (1/255) in float64 -> float32, (x - 0.5) / 0.5 -> [3, S, S]."""
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    pixels = np.asarray(pil.convert("RGB").resize((size, size), resample=Image.BICUBIC))  # [S, S, 3] uint8
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    return torch.from_numpy((scaled - half) / half).permute(2, 0, 1).contiguous()  # [3, S, S]


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, vq: VQSpec, inv_temperature: float | torch.Tensor = 1.0,
                  rows: int = LOOKUP_ROWS) -> torch.Tensor:
    """SimVectorQuantizer's eval-deterministic lookup: [B, N, d] features, [K, d] codebook -> [B, N].

    l2_normalized: z <- z / |z|, e_k <- e_k / |e_k|. stochastic: argmax_k softmax(inv_T z.e_k);
    else argmin_k (|z|^2 + |e_k|^2 - 2 z.e_k), the expression upstream evaluates, term for term."""
    z = z.to(codebook)
    if vq.l2_normalized:
        z = F.normalize(z, p=2, dim=-1)
        codebook = F.normalize(codebook, p=2, dim=-1)
    flat = z.reshape(-1, z.shape[-1])  # [B*N, d]
    codes = []
    for block in flat.split(rows):  # rows are independent: a block is exact
        if vq.stochastic:
            probs = F.softmax(torch.einsum("bd,nd->bn", block, codebook) * inv_temperature, dim=-1)  # [rows, K]
            codes.append(torch.argmax(probs, dim=-1))
        else:
            distance = (torch.sum(block**2, dim=1, keepdim=True) + torch.sum(codebook**2, dim=1)
                        - 2 * torch.einsum("bd,dn->bn", block, codebook.T))  # [rows, K]
            codes.append(torch.argmin(distance, dim=1))
    return torch.cat(codes).reshape(z.shape[:2])  # [B, N]


class _Regularizer(nn.Module):
    """SimVectorQuantizer's parameters under its names: codebook = embedding_proj(embedding.weight)."""

    def __init__(self, vq: VQSpec):
        super().__init__()
        self.embedding = nn.Embedding(vq.codebook_size, vq.dim)
        self.embedding_proj = nn.Linear(vq.dim, vq.dim)
        if vq.stochastic and vq.stochastic_temperature <= 0:
            self.stochastic_temperature_inv = nn.Parameter(torch.tensor(10.0))


class _Bottleneck(nn.Module):
    def __init__(self, hidden: int, vq: VQSpec):
        super().__init__()
        self.in_linear = nn.Linear(hidden, vq.dim)
        self.regularizer = _Regularizer(vq)


class TATokEncoder(nn.Module):
    """TextAlignedTokenizer's encode path, its submodules named as upstream's (so its state dict loads)."""

    def __init__(self, spec: TATokSpec, encoder_config: dict):
        from transformers import SiglipVisionConfig, SiglipVisionModel

        super().__init__()
        self.spec = spec
        self.encoder = SiglipVisionModel(SiglipVisionConfig(**vision_config(encoder_config)))
        hidden = self.encoder.config.hidden_size
        self.encode_task_layer = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.bottleneck = _Bottleneck(hidden, spec.vq)

    @property
    def tokens_per_image(self) -> int:
        config = self.encoder.config
        return (config.image_size // config.patch_size) ** 2

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] preprocessed pixels -> [B, N, d] features before the lookup."""
        hidden = self.encoder(pixels, output_hidden_states=True).hidden_states[self.spec.select_layer_id]  # [B, N, h]
        return self.bottleneck.in_linear(self.encode_task_layer(hidden))  # [B, N, d]

    def codebook(self) -> torch.Tensor:
        regularizer = self.bottleneck.regularizer
        return regularizer.embedding_proj(regularizer.embedding.weight)  # [K, d]

    def inv_temperature(self) -> float | torch.Tensor:
        learned = getattr(self.bottleneck.regularizer, "stochastic_temperature_inv", None)
        return learned if learned is not None else 1 / self.spec.vq.stochastic_temperature

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N] codebook indices."""
        return nearest_codes(self.features(pixels), self.codebook(), self.spec.vq, self.inv_temperature())


def vision_config(encoder_config: dict) -> dict:
    """The SigLIP vision config inside what AutoConfig(teacher) gives (a `siglip` or `siglip_vision_model` config)."""
    kind = encoder_config.get("model_type")
    if kind == "siglip":
        encoder_config = encoder_config.get("vision_config", {})
    elif kind != "siglip_vision_model":
        raise ValueError(f"TA-Tok encoder config has model_type {kind!r}: expected 'siglip' or 'siglip_vision_model' "
                         "(a NaFlex 'siglip2' tower takes no fixed-size pixel batch, so TA-Tok cannot use one)")
    return {k: v for k, v in encoder_config.items() if k not in ("model_type", "architectures", "transformers_version")}


def load_encoder(directory: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> TATokEncoder:
    """TA-Tok's encode path from a directory in upstream's layout (see the module docstring)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = [name for name in (ARGS_FILE, ENCODER_CONFIG_FILE) if not (directory / name).is_file()]
    shards = sorted(directory.glob(WEIGHTS_GLOB))
    missing += [] if shards else [WEIGHTS_GLOB]
    if missing:
        raise ImageTokenizerNotFoundError(
            f"no TA-Tok image tokenizer in {directory} ({', '.join(missing)} missing): source images in prompts need "
            "one. Convert BLIP3o-NEXT with `--ta-tok csuhan/TA-Tok` (a ta_tok.pth file, its folder or that hub id), "
            "or build a tiny model with `blip3o-rl make-tiny DIR --preset sana`; the glyph demo encodes images with "
            "the glyph decoder's inverse (rollout.glyph.GlyphImageEncoder) instead")
    spec = TATokSpec.from_args(json.loads((directory / ARGS_FILE).read_text()))
    model = TATokEncoder(spec, json.loads((directory / ENCODER_CONFIG_FILE).read_text()))
    state = {k: v for shard in shards for k, v in load_file(str(shard)).items() if not k.startswith(DECODE_SIDE_PREFIXES)}
    problems = model.load_state_dict(state, strict=False)
    if problems.missing_keys or problems.unexpected_keys:
        raise ValueError(f"TA-Tok weights in {directory} do not fit its args: missing {sorted(problems.missing_keys)[:5]}, "
                         f"unexpected {sorted(problems.unexpected_keys)[:5]}")
    return model.to(device=device, dtype=dtype).eval()


class TATokImageTokenizer:
    """TA-Tok behind `ImageToIds`: images -> [B, N] codebook indices, as upstream computes them."""

    def __init__(self, model: TATokEncoder):
        self.model = model
        self.tokens_per_image = model.tokens_per_image
        self.codebook_size = model.spec.vq.codebook_size

    @classmethod
    def from_dir(cls, directory: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> TATokImageTokenizer:
        return cls(load_encoder(directory, dtype, device))

    def pixels(self, images: Sequence) -> torch.Tensor:
        """B images -> [B, 3, S, S] on the model's device and dtype."""
        param = next(self.model.parameters())
        batch = torch.stack([preprocess(image, self.model.spec.input_size) for image in images])  # [B, 3, S, S]
        return batch.to(device=param.device, dtype=param.dtype)

    def encode(self, images: Sequence) -> torch.Tensor:
        return self.model(self.pixels(images)).cpu()  # [B, N]


def load_image_tokenizer(paths: ModelPaths, vocab: ImageVocab | None = None, dtype: torch.dtype = torch.float32,
                         device: str = "cpu") -> TATokImageTokenizer:
    """The model directory's TA-Tok, checked against its layout (tokens per image) and vocabulary (codebook size)."""
    tokenizer = TATokImageTokenizer.from_dir(paths.image_tokenizer, dtype, device)
    expected = paths.layout().tokens_per_image
    if tokenizer.tokens_per_image != expected:
        raise ValueError(f"TA-Tok in {paths.image_tokenizer} gives {tokenizer.tokens_per_image} ids per image but the "
                         f"model generates {expected}")
    if vocab is not None and tokenizer.codebook_size != vocab.codebook_size:
        raise ValueError(f"TA-Tok codebook has {tokenizer.codebook_size} codes but the vocabulary "
                         f"{vocab.codebook_size} image tokens")
    return tokenizer


def write_ta_tok_configs(directory: Path, args: dict, encoder_config: dict) -> None:
    """ta_tok_args.json and encoder_config.json of upstream's layout (the weights are written beside them)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ARGS_FILE).write_text(json.dumps(args, indent=2))
    (directory / ENCODER_CONFIG_FILE).write_text(json.dumps(encoder_config, indent=2))


# -- TA-Tok's own checkpoint (csuhan/TA-Tok ta_tok.pth), for the converter -------------------------
TA_TOK_HUB_ID = "csuhan/TA-Tok"
"""Where upstream's `TextAlignedTokenizer.from_checkpoint` always loads TA-Tok from (tok/ta_tok.py)."""
TA_TOK_FILE = "ta_tok.pth"
TEACHER = "google/siglip2-so400m-patch14-384"
TEACHER_VISION_CONFIG = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "num_channels": 3,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}
"""The vision config of TEACHER (SigLIP so400m widths; the fixed-resolution SigLIP2 checkpoints ship
`siglip` configs), so conversion needs no download of it; every width but the head count is checked
against the tower's tensor shapes."""


@dataclass(frozen=True)
class TATokCheckpoint:
    args: dict
    """ta_tok.pth's ["model"]["args"]: TextAlignedTokenizer's constructor arguments."""
    encoder_config: dict
    """What AutoConfig.from_pretrained(args["teacher"]) gives."""
    state: dict[str, torch.Tensor]
    """["model"]["sd"] without the distillation teacher (upstream loads it with load_teacher=False)."""


def teacher_config(teacher: str) -> dict:
    """AutoConfig(teacher) without a download: a local directory's config.json, or TEACHER's known config."""
    local = Path(str(teacher)).expanduser() / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(str(teacher)).name == Path(TEACHER).name:
        return dict(TEACHER_VISION_CONFIG)
    raise ValueError(f"TA-Tok's teacher {teacher!r} is neither a local directory with a config.json nor {TEACHER}")


def read_ta_tok(path: Path) -> TATokCheckpoint:
    """A ta_tok.pth ({"model": {"args": ..., "sd": ...}}), memory-mapped, tensors and plain values only."""
    raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    try:
        args, state = raw["model"]["args"], raw["model"]["sd"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a TA-Tok checkpoint: expected {{'model': {{'args': ..., 'sd': ...}}}}") from None
    return TATokCheckpoint(args=args, encoder_config=teacher_config(args.get("teacher", TEACHER)),
                           state={k: v for k, v in state.items() if not k.startswith("teacher")})


def encode_shape_problems(args: dict, encoder_config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How a tower's tensor shapes differ from what `args` and `encoder_config` build (the encode path;
    decode-side tensors are not checked). Empty: they fit."""
    with torch.device("meta"):
        model = TATokEncoder(TATokSpec.from_args(args), encoder_config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(shape) for name, shape in shapes.items() if not name.startswith(DECODE_SIDE_PREFIXES)}
    problems = [f"missing {name}" for name in sorted(set(expected) - set(found))]
    problems += [f"unexpected {name}" for name in sorted(set(found) - set(expected))]
    problems += [f"{name} {found[name]} (expected {expected[name]})" for name in sorted(set(expected) & set(found))
                 if found[name] != expected[name]]
    return problems
