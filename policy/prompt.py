"""The rollout prompt: chat template around the caption, then `<im_start><S0>`.

BLIP3o-NEXT's GRPO code (JiuhaiChen/BLIP3o, branch BLIP3o-NEXT, `trl/trl/trainer/grpo_trainer.py`,
the messages built in `_generate_and_score_completions`) sends a system turn "You are a helpful
assistant.", a user turn "Please generate image based on the following caption: {caption}", the
chat template's generation prompt, then `<im_start><S0>`; the AR model then samples exactly
`tokens_per_image` image tokens.
"""

from __future__ import annotations

from policy.vocab import IM_START, SCALE_TOKENS

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_INSTRUCTION = "Please generate image based on the following caption: {caption}"


def rollout_prompt_text(tokenizer, caption: str, instruction: str = DEFAULT_INSTRUCTION,
                        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
    if "{caption}" not in instruction:
        raise ValueError("instruction must contain '{caption}'")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": instruction.format(caption=caption)})
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return chat + IM_START + SCALE_TOKENS[0]


def rollout_prompt_ids(tokenizer, caption: str, instruction: str = DEFAULT_INSTRUCTION,
                       system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[int]:
    """Token ids of the rollout prompt (no BOS added: the chat template carries its own markers)."""
    text = rollout_prompt_text(tokenizer, caption, instruction, system_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
