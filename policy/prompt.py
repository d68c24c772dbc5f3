"""The rollout prompt: chat template around the caption, then `<im_start><S0>`.

BLIP3o-NEXT's GRPO code asks for an image with a fixed instruction before the caption and starts
the assistant turn with `<im_start><S0>`; the AR model then samples exactly `tokens_per_image`
image tokens.
"""

from __future__ import annotations

from policy.vocab import IM_START, SCALE_TOKENS

DEFAULT_INSTRUCTION = "Please generate image based on the following caption: {caption}"


def rollout_prompt_text(tokenizer, caption: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    if "{caption}" not in instruction:
        raise ValueError("instruction must contain '{caption}'")
    messages = [{"role": "user", "content": instruction.format(caption=caption)}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return chat + IM_START + SCALE_TOKENS[0]


def rollout_prompt_ids(tokenizer, caption: str, instruction: str = DEFAULT_INSTRUCTION) -> list[int]:
    """Token ids of the rollout prompt (no BOS added: the chat template carries its own markers)."""
    return tokenizer(rollout_prompt_text(tokenizer, caption, instruction), add_special_tokens=False)["input_ids"]
