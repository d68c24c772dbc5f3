"""Masked log-probs: the one definition of "the policy's probability of an image token".

The policy samples from the softmax over image-token logits only, at temperature T, optionally
truncated to the top-k / top-p image tokens (BLIP3o-NEXT samples with the model's generation
config: top-k/top-p on). vLLM does the same with `allowed_token_ids` + temperature + top-k/top-p
and `logprobs_mode="processed_logprobs"`; the learner, the tests and the benchmarks call these
functions, so sampler and learner agree (to ~1e-5 on CPU, see DESIGN.md).

    scaled        = logits[image range] / T                              [.., K]
    kept          = top-k, then top-p of softmax(scaled over the top-k)  (vLLM's rule, ties kept)
    log p(token)  = log_softmax(scaled masked to `kept`)[token - image_token_start]

Which distribution the loss uses, and why: the truncated one the sampler drew from. The PPO ratio
and the truncated importance weight are then likelihood ratios of the distribution that produced
the samples, and the learner's log-probs equal vLLM's processed log-probs (checked in tests).
Upstream BLIP3o-NEXT (TRL) instead scores the full, untruncated softmax while sampling truncated.
Two details keep every sampled token's log-prob finite:
- the sampled token is always in the kept set: a token at the top-k / top-p boundary may fall
  outside the learner's kept set through rounding (bf16 logits, another kernel); forcing it in
  changes its log-prob by the mass of the boundary, which the truncated-IS weight then corrects;
- the KL to the reference is taken on the untruncated distributions (`Truncation.off()`), so a
  token outside the reference's top-k never gives -inf.

Ties at the top-p boundary (a deliberate difference from vLLM, not corrected): when several image
tokens share the boundary logit, top-p keeps only part of that run of equal values, the part the
sort puts last. We sort the K image logits; vLLM sorts the whole vocabulary (every other token at
-inf), and the two sorts order equal values differently, so the kept sets can hold different tied
tokens (the same number of them). bf16 logits tie often (a bf16 model's 65,536 image logits take a
few thousand distinct values): with vLLM's own op on this CPU, 46 of 50 random bf16 cases at
BLIP3o-NEXT's shape kept another tied set at top_p 0.95 (an outside check, other random logits: 16 of 50;
tests/test_truncation_ties.py). Two things absorb it: the forced sampled token above (a token vLLM
kept and we did not still scores finite), and the truncated importance weight (`grpo.tis_cap`),
which corrects the remaining gap, log(1 + p_b / P) for a boundary probability p_b and a kept mass
P (about 4e-6 in that test). Breaking ties as vLLM does would mean sorting the whole vocabulary
(3.3x the image block) at every position, to match an order that is itself an accident of its sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policy.vocab import ImageVocab


@dataclass(frozen=True)
class Truncation:
    """Top-k / top-p truncation of the image-token distribution (vLLM's semantics)."""

    top_k: int = 0
    """Keep the k most likely image tokens (ties at the k-th value kept); 0 = off."""
    top_p: float = 1.0
    """Then keep the smallest most-likely set whose mass reaches top_p; 1.0 = off."""

    def __post_init__(self) -> None:
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")

    @property
    def active(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    @classmethod
    def off(cls) -> "Truncation":
        return cls()


def truncation_mask(scaled: torch.Tensor, truncation: Truncation) -> torch.Tensor:
    """[.., K] temperature-scaled logits -> [.., K] bool, True where a token stays sampleable.

    The same rule as vLLM's `apply_top_k_top_p_pytorch`: top-k keeps every logit >= the k-th
    largest; top-p sorts the survivors ascending and drops those whose cumulative probability is
    <= 1 - p, always keeping the most likely token. Equal logits at the top-p boundary are kept or
    dropped by their sort position, which may differ from vLLM's (module docstring).
    """
    keep = torch.ones_like(scaled, dtype=torch.bool)  # [.., K]
    size = scaled.shape[-1]
    with torch.no_grad():
        if 0 < truncation.top_k < size:
            kth = scaled.topk(truncation.top_k, dim=-1).values[..., -1:]  # [.., 1]
            keep &= scaled >= kth
        if truncation.top_p < 1.0:
            masked = scaled.masked_fill(~keep, float("-inf"))  # [.., K]
            ascending, order = masked.sort(dim=-1)  # [.., K]
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)  # [.., K]
            drop_sorted = cumulative <= 1.0 - truncation.top_p  # [.., K]
            drop_sorted[..., -1] = False  # the most likely token always stays
            keep &= ~torch.zeros_like(keep).scatter(-1, order, drop_sorted)
    return keep


def _sampling_logits(image_logits: torch.Tensor, temperature: float, truncation: Truncation,
                     always_keep: torch.Tensor | None) -> torch.Tensor:
    """[..., K] logits of the sampling distribution: float32, / T, -inf outside the kept set.
    One float32 copy at most (none for float32 logits at T = 1 without truncation)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    scaled = image_logits.float() if temperature == 1.0 else image_logits.float() / temperature  # [..., K]
    if truncation.active:
        keep = truncation_mask(scaled, truncation)  # [..., K]
        if always_keep is not None:
            keep = keep.scatter(-1, always_keep.unsqueeze(-1), True)
        scaled = scaled.masked_fill(~keep, float("-inf"))
    return scaled


def codebook_log_softmax(
    image_logits: torch.Tensor, temperature: float = 1.0, truncation: Truncation = Truncation(),
    always_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., K] image-token logits -> [..., K] float32 log-probs (-inf outside the kept set).

    `always_keep` [...] codebook indices that stay in the kept set whatever the truncation says
    (the sampled tokens: see the module docstring).
    """
    return torch.log_softmax(_sampling_logits(image_logits, temperature, truncation, always_keep), dim=-1)


class _PickedLogSoftmax(torch.autograd.Function):
    """log_softmax(z)[code] = z[code] - logsumexp(z), with a backward that allocates one [.., K]
    buffer: d/dz = onehot(code) - softmax(z), written in place (autograd's log_softmax + gather
    keeps a [.., K] output and builds three more [.., K] tensors in the backward: at BLIP3o-NEXT's
    shape each is 0.19 GB per row)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(z, dim=-1)  # [..]
        ctx.save_for_backward(z, codes, lse)
        return z.gather(-1, codes.unsqueeze(-1)).squeeze(-1) - lse  # [..]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, codes, lse = ctx.saved_tensors
        grad_z = torch.sub(z, lse.unsqueeze(-1)).exp_()  # [.., K] softmax (0 where z is -inf)
        grad_z.mul_(-grad.unsqueeze(-1))
        grad_z.scatter_add_(-1, codes.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_z, None


def codebook_token_logprobs(image_logits: torch.Tensor, codes: torch.Tensor, temperature: float = 1.0,
                            truncation: Truncation = Truncation()) -> torch.Tensor:
    """log p of the sampled codes, [B, T, K] logits and [B, T] codes -> [B, T], with grad: the
    same numbers as `codebook_log_softmax(...).gather(codes)`, in a fraction of the memory."""
    scaled = _sampling_logits(image_logits, temperature, truncation, always_keep=codes)  # [B, T, K]
    return _PickedLogSoftmax.apply(scaled, codes)  # [B, T]


@torch.no_grad()
def codebook_entropy(image_logits: torch.Tensor, codes: torch.Tensor, temperature: float = 1.0,
                     truncation: Truncation = Truncation(), positions_per_chunk: int = 64) -> torch.Tensor:
    """Entropy [B, T] of the distribution `codebook_token_logprobs` scores (the kept set plus the
    sampled code), without grad, a few positions at a time: its temporaries are [B, chunk, K],
    not [B, T, K] (at BLIP3o-NEXT's shape a whole row's are 0.19 GB each)."""
    out = []
    for start in range(0, image_logits.shape[-2], positions_per_chunk):
        window = slice(start, start + positions_per_chunk)
        log_probs = codebook_log_softmax(image_logits[..., window, :], temperature, truncation,
                                         codes[..., window])  # [B, c, K]
        terms = log_probs.exp() * log_probs  # [B, c, K]; 0 * -inf = nan outside the kept set
        out.append(-terms.nan_to_num(nan=0.0).sum(-1))  # [B, c]
    return torch.cat(out, dim=-1)  # [B, T]


def image_log_softmax(
    logits: torch.Tensor, vocab: ImageVocab, temperature: float = 1.0,
    truncation: Truncation = Truncation(), always_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., V] logits -> [..., K] log-probs over the K image tokens (-inf outside the kept set)."""
    image_logits = logits[..., vocab.image_token_start : vocab.image_token_end]  # [..., K] (a view)
    return codebook_log_softmax(image_logits, temperature, truncation, always_keep)


def image_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, vocab: ImageVocab, temperature: float = 1.0,
    truncation: Truncation = Truncation(),
) -> torch.Tensor:
    """Log-prob of each sampled image token: logits [B, T, V], token_ids [B, T] -> [B, T] (finite)."""
    codes = vocab.to_codebook(token_ids)  # [B, T]
    log_probs = image_log_softmax(logits, vocab, temperature, truncation, always_keep=codes)  # [B, T, K]
    return log_probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1)  # [B, T]


def image_token_entropy(
    logits: torch.Tensor, vocab: ImageVocab, temperature: float = 1.0, truncation: Truncation = Truncation()
) -> torch.Tensor:
    """Entropy of the (truncated) masked distribution at each position: [B, T, V] -> [B, T]."""
    image_logits = logits[..., vocab.image_token_start : vocab.image_token_end]  # [B, T, K]
    return codebook_entropy(image_logits, image_logits.argmax(-1), temperature, truncation)


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


class ImageTokenLogits(torch.nn.Module):
    """The AR model with only the image-token rows of its head applied at the image positions:
    prompt + image tokens -> image-token logits [B, N, K].

    The same numbers as slicing `sequence_logits` (all V rows at all L positions), without ever
    materialising them: at BLIP3o-NEXT's shape that is [729, 65,536] per row instead of
    [~770, 217,216], 3.5x less, before any copy. The learner trains this module (its parameters
    are the AR model's, under the prefix `lm.`). Under ZeRO-3 the head weight is gathered for this
    module's forward because it is registered as an external parameter of it.
    """

    def __init__(self, causal_lm, vocab: ImageVocab):
        super().__init__()
        self.lm = causal_lm
        self.start, self.end = vocab.image_token_start, vocab.image_token_end
        if getattr(causal_lm.lm_head, "bias", None) is not None:
            raise ValueError("the AR head has a bias: ImageTokenLogits slices the weight only")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                n_tokens: int) -> torch.Tensor:
        outputs = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False)
        hidden = outputs.last_hidden_state[:, -n_tokens - 1 : -1]  # [B, N, h]: the positions predicting image tokens
        weight = self.lm.lm_head.weight[self.start : self.end]  # [K, h]
        return torch.nn.functional.linear(hidden, weight)  # [B, N, K]

    def image_logits(self, prompts: list[list[int]], image_tokens: torch.Tensor, pad_id: int, call=None):
        """[B, N, K] logits of `image_tokens` after `prompts`; `call` runs the forward (e.g. a
        DeepSpeed engine wrapping this module), default this module itself."""
        input_ids, attention_mask, position_ids = left_padded_batch(prompts, image_tokens, pad_id)
        device = self.lm.lm_head.weight.device
        return (call or self)(input_ids.to(device), attention_mask.to(device), position_ids.to(device),
                              image_tokens.shape[1])


def sequence_image_logprobs(
    model, prompts: list[list[int]], image_tokens: torch.Tensor, vocab: ImageVocab, pad_id: int,
    temperature: float = 1.0, truncation: Truncation = Truncation(),
) -> torch.Tensor:
    """Masked log-prob of every sampled image token under `model`: -> [B, N]."""
    logits, _ = sequence_logits(model, prompts, image_tokens, pad_id)  # [B, N, V]
    return image_token_logprobs(logits, image_tokens.to(logits.device), vocab, temperature, truncation)
