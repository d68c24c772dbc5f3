"""Tiny GenEval models (Mask2Former with the 80 COCO labels, CLIP) and a tiny colour CLIP for
CLIPScore / PickScore, built locally.

No pretrained COCO detector or CLIP weights ship in any PyPI package, so tests and the tiny-SANA CPU
config run the real GenEval pipeline on these. The detector is biased to see confident dogs, so
its rules have something to judge. Random CLIP weights cannot rank images by meaning, so the
CLIPScore / PickScore tests use a CLIP whose weights are set by hand to embed colour (a red
image matches "red"): orderings known in advance, through the real transformers model.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_geneval_models(directory: Path, dog_bias: float = 10.0, mask_gain: float = 3e4) -> tuple[Path, Path]:
    """Save a tiny random Mask2Former (80 COCO labels) and a tiny CLIP with a character-level
    tokenizer over CLIP's byte alphabet; no downloads. The detector's class bias is pushed to
    "dog", so every query is a confident dog (its mask is still random).
    Returns (detector dir, clip dir)."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        SwinConfig,
    )

    from rewards.geneval_rules import COCO_CLASSES

    torch.manual_seed(0)
    swin = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin, hidden_dim=32, feature_size=32, mask_feature_size=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=4,
        id2label=dict(enumerate(COCO_CLASSES)), label2id={n: i for i, n in enumerate(COCO_CLASSES)},
    )
    detector = Mask2FormerForUniversalSegmentation(config).eval()
    with torch.no_grad():
        detector.class_predictor.weight.zero_()
        detector.class_predictor.bias.zero_()
        detector.class_predictor.bias[COCO_CLASSES.index("dog")] = dog_bias
        # Sharpen the random masks (large logits): partial masks, mask scores near 1.
        detector.model.transformer_module.decoder.mask_predictor.mask_embedder.get_submodule("2.0").weight.mul_(mask_gain)
    detector_dir = directory / "mask2former"
    detector.save_pretrained(detector_dir)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(detector_dir)

    clip_dir = directory / "clip"
    model, tokenizer, image_processor = tiny_clip()
    model.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    image_processor.save_pretrained(clip_dir)
    return detector_dir, clip_dir


def tiny_clip(image_mean: float | None = None, image_std: float | None = None):
    """A tiny random CLIPModel (width 32, one layer per tower, 32x32 images in 8x8 patches, 16-d
    embeddings), a character-level CLIPTokenizer over CLIP's byte alphabet (no merges, so it needs
    no download) and a 32-pixel CLIPImageProcessorPil (CLIP's mean/std unless given).
    Draws from torch's global generator: seed it first for the same weights every time."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16,
    )
    normalise = {} if image_mean is None else {"image_mean": [image_mean] * 3, "image_std": [image_std] * 3}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                            **normalise)
    return CLIPModel(config).eval(), tokenizer, image_processor


COLOUR_WORDS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
"""The colour CLIP's text vectors, in the RGB pixel units its image tower sees (0 -> -1, 255 -> +1).
Its tokenizer is character-level, so a word is known by its last letter (the only token with
"</w>"): ...d is red, ...n green, ...e blue; every other token embeds to zero."""


def wire_colour_clip(model, logit_scale: float | None = None) -> None:
    """Set a tiny CLIP's weights by hand so that both towers embed *colour*: an image as the mean
    (over 8x8 patches) of its layer-normed mean patch colour, a text as the sum of its colour
    words' layer-normed vectors (COLOUR_WORDS); the projections keep the first three dims.
    LayerNorm only centres and scales, so directions are exact: a solid red image has cosine 1
    with "red" (float rounding aside) and an image mixing colours a cosine in between.
    `logit_scale` (log of PickScore's multiplier) defaults to CLIP's initial log(1 / 0.07).

    How: patch embedding = mean of each channel into hidden dims 0-2; class, position and
    other token embeddings zero; queries and keys zero, so attention is a uniform average over
    the visible tokens, which values and output (identity) pass on; MLPs off (fc2 zero); every
    LayerNorm plain (weight 1, bias 0); both projections copy hidden dims 0-2 to embedding dims 0-2."""
    import torch

    vision, text = model.vision_model, model.text_model
    patch = model.config.vision_config.patch_size
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for tower in (vision, text):
            for layer in tower.encoder.layers:
                attention = layer.self_attn
                attention.v_proj.weight.copy_(torch.eye(attention.v_proj.weight.shape[0]))
                attention.out_proj.weight.copy_(torch.eye(attention.out_proj.weight.shape[0]))
                for norm in (layer.layer_norm1, layer.layer_norm2):
                    norm.weight.fill_(1.0)
        for norm in (vision.pre_layrnorm, vision.post_layernorm, text.final_layer_norm):
            norm.weight.fill_(1.0)
        for channel in range(3):
            vision.embeddings.patch_embedding.weight[channel, channel] = 1.0 / patch**2  # [H, 3, p, p]
            model.visual_projection.weight[channel, channel] = 1.0  # [D, H]
            model.text_projection.weight[channel, channel] = 1.0
        model.logit_scale.fill_(model.config.logit_scale_init_value if logit_scale is None else logit_scale)


def make_tiny_colour_clip(directory: Path, logit_scale: float | None = None,
                          processor_directory: Path | None = None) -> Path:
    """Save a tiny CLIP wired by `wire_colour_clip` (for the CLIPScore / PickScore tests and bench),
    with its tokenizer's colour-word endings embedded; pixel mean/std 0.5 so 0 -> -1, 255 -> +1.
    The processor goes to `processor_directory` when given (as PickScore keeps its processor apart).
    Returns `directory`."""
    import torch

    model, tokenizer, image_processor = tiny_clip(image_mean=0.5, image_std=0.5)
    wire_colour_clip(model, logit_scale)
    with torch.no_grad():
        embedding = model.text_model.embeddings.token_embedding.weight  # [V, H]
        for word, vector in COLOUR_WORDS.items():
            embedding[tokenizer.convert_tokens_to_ids(word[-1] + "</w>"), :3] = torch.tensor(vector)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(processor_directory or directory)
    image_processor.save_pretrained(processor_directory or directory)
    return directory
