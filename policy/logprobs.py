"""Masked log-probs: the one definition of "the policy's probability of an image token".

The policy samples from the softmax over image-token logits only, at temperature T. vLLM does the
same with `allowed_token_ids` + `logprobs_mode="processed_logprobs"`; the learner, the tests and the
benchmarks call these functions, so sampler and learner agree (to ~1e-5 on CPU, see DESIGN.md).

    log p(token) = log_softmax(logits[image range] / T)[token - image_token_start]
"""

from __future__ import annotations

import torch

from policy.vocab import ImageVocab


def image_log_softmax(logits: torch.Tensor, vocab: ImageVocab, temperature: float = 1.0) -> torch.Tensor:
    """[..., V] logits -> [..., K] log-probs over the K image tokens."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    image_logits = logits[..., vocab.image_token_start : vocab.image_token_end].float()  # [..., K]
    return torch.log_softmax(image_logits / temperature, dim=-1)


def image_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, vocab: ImageVocab, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of each sampled image token: logits [B, T, V], token_ids [B, T] -> [B, T]."""
    log_probs = image_log_softmax(logits, vocab, temperature)  # [B, T, K]
    codes = vocab.to_codebook(token_ids)  # [B, T]
    return log_probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1)  # [B, T]


def image_token_entropy(logits: torch.Tensor, vocab: ImageVocab, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the masked distribution at each position: [B, T, V] -> [B, T]."""
    log_probs = image_log_softmax(logits, vocab, temperature)  # [B, T, K]
    return -(log_probs.exp() * log_probs).sum(-1)  # [B, T]


def left_padded_batch(
    prompts: list[list[int]], image_tokens: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack prompt + image tokens, left-padded so the image tokens end every row.

    Returns input_ids [B, L], attention_mask [B, L], position_ids [B, L]; positions count from the
    first real token, so a padded row sees the same positions as it would alone.
    """
    n_tokens = image_tokens.shape[1]
    longest = max(len(p) for p in prompts) + n_tokens
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)  # [B, L]
    for row, prompt in enumerate(prompts):
        seq = torch.cat([torch.as_tensor(prompt, dtype=torch.long), image_tokens[row].long()])
        input_ids[row, longest - len(seq) :] = seq
        attention_mask[row, longest - len(seq) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    return input_ids, attention_mask, position_ids


def sequence_logits(model, prompts: list[list[int]], image_tokens: torch.Tensor, pad_id: int):
    """Forward prompt + image tokens; return (logits predicting each image token [B, N, V], outputs).

    The logit at position i predicts token i+1, so the N image tokens are predicted by the N
    positions just before the last one.
    """
    input_ids, attention_mask, position_ids = left_padded_batch(prompts, image_tokens, pad_id)
    device = next(model.parameters()).device
    outputs = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        use_cache=False,
    )
    n_tokens = image_tokens.shape[1]
    return outputs.logits[:, -n_tokens - 1 : -1, :], outputs  # [B, N, V]


def sequence_image_logprobs(
    model, prompts: list[list[int]], image_tokens: torch.Tensor, vocab: ImageVocab, pad_id: int, temperature: float = 1.0
) -> torch.Tensor:
    """Masked log-prob of every sampled image token under `model`: -> [B, N]."""
    logits, _ = sequence_logits(model, prompts, image_tokens, pad_id)  # [B, N, V]
    return image_token_logprobs(logits, image_tokens.to(logits.device), vocab, temperature)
