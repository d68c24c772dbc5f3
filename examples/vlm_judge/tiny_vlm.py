"""A tiny random-weight vision-language judge, built offline, so the judge scorer can be tried on a CPU.

    python tiny_vlm.py /tmp/tiny-vlm      # ~2 MB: config, safetensors, tokenizer, processor
    python tiny_vlm.py /tmp/tiny-vlm --serve --port 8000 ...   # and vLLM's OpenAI server on it

An Idefics3 (`Idefics3ForConditionalGeneration`: SigLIP-style ViT -> pixel-shuffle connector -> a
Llama text model, the architecture of Idefics3-8B and SmolVLM) with its processor and a chat template,
which vLLM serves through its OpenAI server like any Idefics3; only the widths, the depth and the
vocabulary are cut. Why not Qwen2.5-VL, the family of the real judges: on this CPU setup vLLM
cannot load it. vLLM's Qwen2-VL / Qwen2.5-VL model code imports transformers' Qwen2-VL image
processor (the vision-encoder lookup of its LLaVA and PaliGemma, the Pixtral one), and transformers'
Qwen2-VL processors load a video processor; all need torchvision, which scripts/setup.sh uninstalls on CPU (its PyPI wheels
are CUDA builds that break vLLM's import). Idefics3's code in vLLM and transformers needs none. The
scorer does not depend on the family: it speaks the OpenAI chat API.

Its scores mean nothing: the weights are random. The lm_head rows of the digits "0".."5" are scaled
up so they compete for the first generated token's top logprobs (a random head would rank them
anywhere in the vocabulary), the way a trained judge puts its mass on the digits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|begin_of_text|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                  "<global-img>", *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))]
DIGITS = [str(d) for d in range(6)]
IMAGE_SIDE, PATCH, SCALE = 112, 14, 2
"""Images are resized to 112 x 112 pixels, one tile (no splitting): (112 / 14)^2 / 2^2 = 16 image tokens."""

# Idefics3's chat template ("User:<image>text<end_of_utterance>\nAssistant:"), over OpenAI content lists.
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or content['type'] == 'image_url' %}<image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
CORPUS = [
    "Rate how well the image matches the prompt on a scale from 0 to 5.",
    "Answer with one digit: 0 means unrelated, 5 means a perfect match.",
    "a photo of a red apple on a wooden table", 'a sign with the text "open"', "a dog and a cat",
]


def build_tokenizer():
    """A byte-level BPE (every byte, so any prompt tokenizes; each digit one token) with Idefics3's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>",
                                        eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer):
    """2 vision layers of width 64 and 2 Llama layers of width 128 (head 32, as vLLM's CPU attention takes)."""
    from transformers import Idefics3Config, LlamaConfig

    ids = tokenizer.convert_tokens_to_ids
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<end_of_utterance>"),
                       pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False)
    vision = {"image_size": IMAGE_SIDE, "patch_size": PATCH, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 2}
    return Idefics3Config(vision_config=vision, text_config=text, image_token_id=ids("<image>"), scale_factor=SCALE,
                          pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=False)


def make_tiny_vlm(directory: Path, seed: int = 0, digit_gain: float = 15.0) -> Path:
    """Write the tiny judge (weights, tokenizer, image processor, chat template) to `directory`."""
    from transformers import Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil, Idefics3Processor

    directory = Path(directory)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(build_config(tokenizer)).eval()
    with torch.no_grad():  # the digits' logits get ~digit_gain x the spread of the other tokens'
        model.lm_head.weight[tokenizer.convert_tokens_to_ids(DIGITS)] *= digit_gain
    model.save_pretrained(directory)
    images = Idefics3ImageProcessorPil(size={"longest_edge": IMAGE_SIDE}, max_image_size={"longest_edge": IMAGE_SIDE},
                                       do_image_splitting=False)
    Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=(IMAGE_SIDE // PATCH // SCALE) ** 2,
                      chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return directory


if __name__ == "__main__":
    built = make_tiny_vlm(Path(sys.argv[1]))
    if sys.argv[2:3] == ["--serve"]:  # then vLLM's OpenAI server on it, in this process: torch imported once
        import runpy

        sys.argv = ["vllm", "--model", str(built), *sys.argv[3:]]
        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
    else:
        print(built)
