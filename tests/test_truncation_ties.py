"""Top-p ties at the boundary (policy/logprobs.py): the rule keeps part of a run of equal logits,
chosen by the sort's order of equal values; vLLM sorts the full vocabulary, we sort the image
tokens, so the two can keep different tied tokens. The sampled token is always kept, so its
log-prob stays finite, and it differs from vLLM's by the boundary token's share of the kept mass."""

from __future__ import annotations

import math

import pytest
import torch

from policy.logprobs import Truncation, codebook_token_logprobs, truncation_mask


def test_a_tie_at_the_top_p_boundary_keeps_one_of_the_tied_tokens_and_the_sampled_one_is_kept():
    # p = [0.5, 0.2, 0.2, 0.1], top_p 0.6: ascending 0.1, 0.2, 0.2, 0.5 with cumulative 0.1, 0.3, 0.5,
    # 1.0; those <= 1 - 0.6 = 0.4 drop: token 3 and whichever tied 0.2 the sort puts first.
    logits = torch.tensor([0.5, 0.2, 0.2, 0.1]).log()  # [K]
    keep = truncation_mask(logits, Truncation(top_p=0.6)).tolist()
    assert keep[0] and not keep[3] and keep[1] != keep[2]  # one of the tie, by sort position
    kept, dropped = (1, 2) if keep[1] else (2, 1)
    # sampled, each token is scored in the kept set plus itself:
    # the kept tied token 0.2 / (0.5 + 0.2); the dropped one (another sort kept it) 0.2 / (0.7 + 0.2);
    # token 3, outside whatever the tie: 0.1 / (0.7 + 0.1). All finite.
    codes = torch.tensor([[kept, dropped, 3, 0]])  # [B, T]
    logp = codebook_token_logprobs(logits.expand(1, 4, 4), codes, truncation=Truncation(top_p=0.6))  # [B, T]
    expected = [math.log(0.2 / 0.7), math.log(0.2 / 0.9), math.log(0.1 / 0.8), math.log(0.5 / 0.7)]
    assert logp[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_vllms_op_over_the_full_vocabulary_keeps_another_tied_set_at_the_real_shape():
    """BLIP3o-NEXT's shape: 65,536 image logits inside 217,210, rounded to bfloat16 (as a bf16 model
    gives them), top_p 0.95. vLLM's own op (`apply_top_k_top_p_pytorch`, its CPU and fallback path)
    over the full vocabulary, the others at -inf, against ours over the image block: in some of 10
    random cases the kept sets differ, always by the same number of tokens tied at the boundary
    value; a token vLLM kept and we did not, once sampled, scores log p - log(1 + p_b / P) against
    vLLM's log p (p_b the boundary token's probability, P vLLM's kept mass). Measured: all 10 seeds
    differ (46 of 50 over seeds 0-49)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    codebook, start, vocabulary, top_p = 65_536, 151_674, 217_210, 0.95
    differing = 0
    for seed in range(10):
        image = (torch.randn(1, codebook, generator=torch.Generator().manual_seed(seed)) * 2).bfloat16().float()
        full = torch.full((1, vocabulary), float("-inf"))
        full[:, start:start + codebook] = image
        theirs_logits = apply_top_k_top_p_pytorch(full, None, torch.tensor([top_p]))[0, start:start + codebook]  # [K]
        theirs = theirs_logits > float("-inf")
        ours = truncation_mask(image[0], Truncation(top_p=top_p))  # [K]
        if torch.equal(theirs, ours):
            continue
        differing += 1
        boundary = float(image[0][ours].min())
        assert int(theirs.sum()) == int(ours.sum()) and float(image[0][theirs].min()) == boundary
        assert bool((image[0][theirs != ours] == boundary).all())  # only tied boundary tokens differ
        only_theirs = (theirs & ~ours).nonzero().flatten()[:4]  # [n]
        logp = codebook_token_logprobs(image.expand(len(only_theirs), codebook).unsqueeze(1), only_theirs.unsqueeze(1),
                                       truncation=Truncation(top_p=top_p))[:, 0]  # [n]
        theirs_logp = theirs_logits.log_softmax(-1)[only_theirs]  # [n]
        gap = math.log1p(math.exp(boundary - float(theirs_logits.logsumexp(-1))))
        assert torch.isfinite(logp).all()
        # gap ~4e-6 here; float32 log-softmaxes of ~23,000 kept logits agree to a few 1e-6
        assert (theirs_logp - logp).tolist() == pytest.approx([gap] * len(only_theirs), abs=5e-6)
    assert differing >= 1
