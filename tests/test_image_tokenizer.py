"""Source images into the prompt: TA-Tok (image -> ids) against a hand computation of its codebook
lookup, its preprocessing against transformers' SigLIP processor, the tiny TA-Tok's upstream layout,
and the edit prompt against an id sequence built by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from policy.image_tokenizer import (
    ImageToIds,
    ImageTokenizerNotFoundError,
    TATokEncoder,
    TATokImageTokenizer,
    TATokSpec,
    VQSpec,
    load_image_tokenizer,
    preprocess,
)
from policy.loading import load_tokenizer, load_vocab
from policy.model_dir import ModelPaths
from policy.prompt import edit_prompt_ids, edit_prompt_text


def random_image(seed: int, height: int = 40, width: int = 50) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def paths(tiny_model_dir) -> ModelPaths:
    return ModelPaths(tiny_model_dir)


@pytest.fixture(scope="module")
def ta_tok(paths) -> TATokImageTokenizer:
    return load_image_tokenizer(paths)


def test_preprocessing_is_siglips():
    """Upstream runs `SiglipImageProcessor()` with size (S, S) (transformers 4.5x, the PIL/numpy one); its
    equal in the pinned transformers is SiglipImageProcessorPil. Compared exactly, on a non-square RGB
    image and on a grey one (converted to RGB first)."""
    from PIL import Image
    from transformers.models.siglip.image_processing_pil_siglip import (
        SiglipImageProcessorPil,
    )

    processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    for image in (Image.fromarray(random_image(0)), Image.fromarray(random_image(1)[..., 0]).convert("L")):
        expected = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]  # [3, 28, 28]
        assert torch.equal(preprocess(image, 28), expected)
    assert preprocess(np.full((5, 7, 3), 255, np.uint8), 4).eq(1.0).all()  # white: 255/255 -> (1 - 0.5)/0.5


def hand_lookup_l2(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k |z - e_k| by explicit differences (not upstream's |z|^2 + |e|^2 - 2 z.e): [N, d], [K, d] -> [N]."""
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(-1)


def test_ta_tok_ids_are_the_codebook_lookup_by_hand(paths, ta_tok):
    """The tiny TA-Tok (SimVQ with l2_normalized and stochastic, as read from its args): the features are
    recomputed from the tower's hidden states with the layers' weights by hand; the ids are the nearest
    unit codebook vectors, found by explicit distances |z/|z| - e/|e||^2 (the cosine argmax upstream's
    argmax of a softmax picks). The two nearest distances of every feature differ by more than 1e-4,
    so float rounding cannot swap them and the ids must be equal exactly."""
    args = json.loads((paths.image_tokenizer / "ta_tok_args.json").read_text())
    vq = args["bottleneck"]["args"]["regularizer"]["args"]
    assert (vq["l2_normalized"], vq["stochastic"], vq["codebook_size"]) == (True, True, 1024)
    model = ta_tok.model
    images = [random_image(2), random_image(3, 28, 28)]
    ids = ta_tok.encode(images)  # [2, 16]
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    with torch.no_grad():
        pixels = torch.stack([preprocess(image, 28) for image in images])  # [2, 3, 28, 28]
        hidden = model.encoder(pixels, output_hidden_states=True).hidden_states[-2]  # [2, 16, 48]: layer 1 of 2
        task = model.encode_task_layer[0]
        h = torch.tanh(hidden @ task.weight.T + task.bias)  # [2, 16, 48]
        z = h @ model.bottleneck.in_linear.weight.T + model.bottleneck.in_linear.bias  # [2, 16, 16]
        regularizer = model.bottleneck.regularizer
        codebook = regularizer.embedding.weight @ regularizer.embedding_proj.weight.T + regularizer.embedding_proj.bias  # [1024, 16]
        unit_z = z / z.norm(dim=-1, keepdim=True)
        unit_codebook = codebook / codebook.norm(dim=-1, keepdim=True)
        for row in range(2):
            distance = ((unit_z[row][:, None] - unit_codebook[None]) ** 2).sum(-1)  # [16, 1024]
            two = distance.topk(2, largest=False).values  # [16, 2]
            assert (two[:, 1] - two[:, 0]).min() > 1e-4
            assert torch.equal(ids[row], distance.argmin(-1))
    assert len(set(ids.flatten().tolist())) > 8  # the random tower does not collapse onto a few codes


def test_plain_l2_lookup_is_the_nearest_code_by_hand(paths):
    """SimVQ without l2_normalized or stochastic: argmin |z - e_k|^2 of the raw vectors (the other branch)."""
    encoder_config = json.loads((paths.image_tokenizer / "encoder_config.json").read_text())
    spec = TATokSpec(input_size=28, select_layer_id=-2, vq=VQSpec(codebook_size=64, dim=16))
    torch.manual_seed(0)
    model = TATokEncoder(spec, encoder_config).eval()
    pixels = torch.stack([preprocess(random_image(4), 28)])
    with torch.no_grad():
        z = model.features(pixels)[0]  # [16, 16]
        expected = hand_lookup_l2(z, model.codebook())
        ids = model(pixels)[0]
    assert torch.equal(ids, expected)


def test_tiny_ta_tok_has_upstreams_layout(paths, ta_tok):
    """TextAlignedTokenizer's state dict names (encoder = SigLIP vision model, the task layers, the bottleneck
    with SimVQ's embedding + embedding_proj, the Siglip2 feature decoder, the ScalingLayer) and ta_tok.pth's args."""
    from safetensors import safe_open

    with safe_open(str(paths.image_tokenizer / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    roots = {name.split(".")[0] for name in names}
    assert roots == {"encoder", "encode_task_layer", "bottleneck", "decoder", "decode_task_layer", "scale_layer"}
    assert {"encoder.embeddings.patch_embedding.weight", "encoder.post_layernorm.weight", "encode_task_layer.0.weight",
            "bottleneck.in_linear.weight", "bottleneck.out_linear.weight", "bottleneck.regularizer.embedding.weight",
            "bottleneck.regularizer.embedding_proj.weight", "decoder.vision_model.embeddings.patch_embedding.weight",
            "decode_task_layer.2.weight", "scale_layer.shift"} <= names
    args = json.loads((paths.image_tokenizer / "ta_tok_args.json").read_text())
    assert {"bottleneck", "bottleneck_token_num", "input_size", "teacher", "pool_scale", "decoder_depth",
            "select_layer_id"} <= set(args)
    assert (ta_tok.tokens_per_image, ta_tok.codebook_size) == (16, 1024) and isinstance(ta_tok, ImageToIds)


def test_missing_tower_is_one_clear_error(tmp_path):
    with pytest.raises(ImageTokenizerNotFoundError, match="ta_tok_args.json, encoder_config.json, model.*safetensors missing"):
        TATokImageTokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a["bottleneck"]["args"]["regularizer"].update(name="vq"), "only 'simvq'"),
    (lambda a: a["bottleneck"]["args"]["regularizer"]["args"].update(l2_normalized=False), "requires l2_normalized"),
])
def test_args_upstream_cannot_run_are_refused(paths, change, message):
    args = json.loads((paths.image_tokenizer / "ta_tok_args.json").read_text())
    change(args)
    with pytest.raises(ValueError, match=message):
        TATokSpec.from_args(args)


def test_edit_prompt_is_the_source_ids_at_image_in_upstreams_chat(paths, ta_tok):
    """Upstream's image-input turn ("<image>\\nPlease reconstruct the given image.", blip3o/data/dataset.py)
    with the instruction in place of the sentence: `<image>` becomes the source's 16 TA-Tok codes + the id
    of <I0>, with no <im_start>/<im_end> or scale token around them; the ids are built by hand."""
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    codes = ta_tok.encode([random_image(5)])[0]  # [16]
    instruction = "make the bus red"
    assert edit_prompt_text(tokenizer, instruction) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nmake the bus red<|im_end|>\n"
        "<|im_start|>assistant\n<im_start><S0>"
    )
    # the chat text cut at every special token and at the image; plain text pieces tokenized alone
    pieces = ["<|im_start|>", "system\nYou are a helpful assistant.", "<|im_end|>", "\n", "<|im_start|>", "user\n",
              codes, "\nmake the bus red", "<|im_end|>", "\n", "<|im_start|>", "assistant\n", "<im_start>", "<S0>"]
    by_hand = []
    for piece in pieces:
        if isinstance(piece, torch.Tensor):
            by_hand += [vocab.image_token_start + c for c in piece.tolist()]
        elif piece.startswith("<") and piece.endswith(">"):
            by_hand.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            by_hand += tokenizer(piece, add_special_tokens=False)["input_ids"]
    assert by_hand[-2:] == [vocab.im_start_id, vocab.scale_ids[0]]
    ids = edit_prompt_ids(tokenizer, vocab, instruction, codes)
    assert ids == by_hand
    assert sum(vocab.image_token_start <= i < vocab.image_token_end for i in ids) == 16
    with pytest.raises(ValueError, match="a source image is 16 codes, got 15"):
        edit_prompt_ids(tokenizer, vocab, instruction, codes[:15])
    with pytest.raises(ValueError, match="must not contain <image>"):
        edit_prompt_ids(tokenizer, vocab, "put <image> here", codes)
