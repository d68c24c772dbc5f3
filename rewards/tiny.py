"""Tiny random GenEval models (Mask2Former with the 80 COCO labels, CLIP), built locally.

No pretrained COCO detector or CLIP weights ship in any PyPI package, so tests and the tiny-SANA CPU
config run the real GenEval pipeline on these. The detector is biased to see confident dogs, so
its rules have something to judge.
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
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPTokenizer,
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        SwinConfig,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

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
    clip_dir.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[])
    tokenizer.save_pretrained(clip_dir)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16,
    )
    CLIPModel(clip_config).eval().save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    return detector_dir, clip_dir
