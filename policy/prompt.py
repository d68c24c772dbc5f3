"""Rollout prompts: chat template around the caption (or instruction and source image), then `<im_start><S0>`.

Text to image. BLIP3o-NEXT's GRPO code (JiuhaiChen/BLIP3o, branch BLIP3o-NEXT,
`trl/trl/trainer/grpo_trainer.py`, the messages built in `_generate_and_score_completions`) sends a
system turn "You are a helpful assistant.", a user turn "Please generate image based on the following
caption: {caption}", the chat template's generation prompt, then `<im_start><S0>`; the AR model then
samples exactly `tokens_per_image` image tokens.

With a source image (editing). Upstream's only image-input turn is its reconstruction task
(`blip3o/data/dataset.py`, type "I2I"): the user turn "<image>\nPlease reconstruct the given image." with
the same system turn. `<image>` in a user turn gets no `<im_start>`/`<im_end>` markers and no scale token
(`preprocess_multimodal` wraps only the assistant's image; `prepare_inputs_labels_for_multimodal` adds
the scale token only after an `<im_start>`): the placeholder becomes exactly the source's
`tokens_per_image` image-token ids (TA-Tok codes + the id of `<I0>`, `encode_images`), with no loss on
them. Special tokens split the text before BPE, so tokenizing the text on each side of `<image>` alone
gives upstream's ids. The instruction takes the place of the reconstruction sentence; the generation
prompt and `<im_start><S0>` follow as for text to image. (Upstream has no editing data; this is ours.)
"""

from __future__ import annotations

import torch

from policy.vocab import IM_START, IMAGE_PLACEHOLDER, SCALE_TOKENS, ImageVocab

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_INSTRUCTION = "Please generate image based on the following caption: {caption}"
DEFAULT_EDIT_TURN = IMAGE_PLACEHOLDER + "\n{instruction}"
"""The user turn of an edit prompt: upstream's "<image>\\nPlease reconstruct the given image." with the
instruction in place of the sentence."""


def _chat(tokenizer, user_text: str, system_prompt: str | None) -> str:
    """System turn (unless None), user turn, generation prompt, then `<im_start><S0>`."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": user_text})
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return chat + IM_START + SCALE_TOKENS[0]


def rollout_prompt_text(tokenizer, caption: str, instruction: str = DEFAULT_INSTRUCTION,
                        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    if "{caption}" not in instruction:
        raise ValueError("instruction must contain '{caption}'")
    return _chat(tokenizer, instruction.format(caption=caption), system_prompt)


def rollout_prompt_ids(tokenizer, caption: str, instruction: str = DEFAULT_INSTRUCTION,
                       system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """Token ids of the rollout prompt (no BOS added: the chat template carries its own markers)."""
    text = rollout_prompt_text(tokenizer, caption, instruction, system_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def edit_prompt_text(tokenizer, instruction: str, turn: str = DEFAULT_EDIT_TURN,
                     system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    """The edit prompt as text, with one `<image>` where the source image's ids go."""
    if "{instruction}" not in turn or turn.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"the edit turn must contain '{{instruction}}' and {IMAGE_PLACEHOLDER} once, got {turn!r}")
    if IMAGE_PLACEHOLDER in instruction:
        raise ValueError(f"the instruction must not contain {IMAGE_PLACEHOLDER}: the source image has one place")
    text = _chat(tokenizer, turn.format(instruction=instruction), system_prompt)
    if text.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"the chat template or system prompt adds another {IMAGE_PLACEHOLDER}")
    return text


def edit_prompt_ids(tokenizer, vocab: ImageVocab, instruction: str, source_codes: torch.Tensor | list[int],
                    turn: str = DEFAULT_EDIT_TURN, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """Token ids of an edit prompt: the text before `<image>`, the source's codebook indices shifted into
    the image-token block, the text after (ending in `<im_start><S0>`)."""
    codes = torch.as_tensor(source_codes, dtype=torch.long).reshape(-1)  # [N]
    if codes.numel() != vocab.tokens_per_image:
        raise ValueError(f"a source image is {vocab.tokens_per_image} codes, got {codes.numel()}")
    before, after = edit_prompt_text(tokenizer, instruction, turn, system_prompt).split(IMAGE_PLACEHOLDER)
    ids = tokenizer([before, after], add_special_tokens=False)["input_ids"]
    return ids[0] + vocab.to_token_ids(codes).tolist() + ids[1]
