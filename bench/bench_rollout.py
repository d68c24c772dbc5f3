"""Benchmark: AR rollout tokens/s, vLLM worker vs transformers `generate`, and weight-update latency.

Side by side in one run, same tiny Qwen3 model (~5M parameters, 256 image tokens per image), same
batch (16 captions x 8 samples), same mask (image tokens only), same thread count. The transformers
baseline only samples (no log-probs), so it is a lower bound on what peers spend (BLIP3o-NEXT's
GRPO samples with `generate`, then scores with a second forward). Weight-update latency is measured
for a ~5M and a ~50M model (the second in its own process: one in-process vLLM engine per process).
Writes bench/results/rollout.json.

    .venv/bin/python bench/bench_rollout.py [--prompts 16 --group 8 --tokens 256 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy.loading import load_ar_model, load_tokenizer, load_vocab  # noqa: E402
from policy.logprobs import left_padded_batch  # noqa: E402
from policy.model_dir import ModelPaths  # noqa: E402
from policy.prompt import rollout_prompt_ids  # noqa: E402
from policy.tiny import TinySpec, make_tiny  # noqa: E402
from policy.vocab import ImageVocab  # noqa: E402
from rollout.config import RolloutConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rollout.json"
CAPTIONS = [
    "a photo of a cat", "two red buses on a road", "a blue clock", "a sign that says \"open\"",
    "a green apple and a yellow banana", "three dogs", "a purple umbrella above a bench", "a white bird",
    "a stop sign", "a pizza left of a cup", "an orange car", "four books", "a black horse",
    "a brown bear below a tree", "a pink vase", "a sign that says \"fish\"",
]
# ~5M parameters (throughput model; DESIGN.md measured vLLM 4.4x on a 5M Qwen2) and ~50M.
SIZES = {
    "5M": dict(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=768),
    "50M": dict(hidden_size=768, num_layers=7, num_heads=12, num_kv_heads=4, intermediate_size=2048),
}


def build_model(directory: Path, size: str, tokens_per_image: int) -> ModelPaths:
    spec = TinySpec(codebook_size=1024, tokens_per_image=tokens_per_image, decoder="glyph", **SIZES[size])
    return make_tiny(directory, spec)


def parameter_count(paths: ModelPaths) -> int:
    return sum(p.numel() for p in load_ar_model(paths).parameters())


class ImageTokensOnly:
    """transformers logits processor: -inf outside the image-token block (vLLM's allowed_token_ids)."""

    def __init__(self, vocab: ImageVocab):
        self.vocab = vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(scores, float("-inf"))  # [B, V]
        start, end = self.vocab.image_token_start, self.vocab.image_token_end
        masked[:, start:end] = scores[:, start:end]
        return masked


def hf_generate_seconds(paths: ModelPaths, prompts: list[list[int]], n_tokens: int) -> float:
    from transformers import LogitsProcessorList

    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    model = load_ar_model(paths)
    empty = torch.zeros((len(prompts), 0), dtype=torch.long)
    input_ids, attention_mask, _ = left_padded_batch(prompts, empty, tokenizer.pad_token_id)  # [R, L]
    kwargs = dict(
        attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=n_tokens, min_new_tokens=n_tokens, pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([ImageTokensOnly(vocab)]),
    )
    with torch.no_grad():
        model.generate(input_ids[:2], **{**kwargs, "attention_mask": attention_mask[:2], "max_new_tokens": 4, "min_new_tokens": 4})
        start = time.perf_counter()
        out = model.generate(input_ids, **kwargs)  # [R, L + N]
        seconds = time.perf_counter() - start
    assert bool(vocab.is_image_token(out[:, input_ids.shape[1] :]).all()), "the mask did not hold"
    return seconds


def update_latency_ms(worker, paths: ModelPaths, repeats: int) -> dict:
    from policy.weights import validate_weights

    state = load_ar_model(paths).state_dict()
    runs, validate_runs = [], []
    for repeat in range(repeats):
        weights = {k: v + 0.01 for k, v in state.items()}
        start = time.perf_counter()
        validate_weights(worker.served_specs, weights, allow_cast=True)
        validate_runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        worker.update_weights(worker.served_version() + 1, weights)
        runs.append(time.perf_counter() - start)
    return {"update_ms": 1000 * statistics.median(runs), "validate_ms": 1000 * statistics.median(validate_runs)}


def measure_update_in_own_process(size: str, threads: int, repeats: int) -> dict:
    """Start an engine on a fresh model of `size` and time update_weights (run in a spawned process)."""
    from rollout.ar_worker import ARRolloutWorker

    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        paths = build_model(Path(tmp), size, tokens_per_image=16)
        worker = ARRolloutWorker(RolloutConfig(model=str(paths.root), max_model_len=256, num_threads=threads))
        return {"parameters": parameter_count(paths), **update_latency_ms(worker, paths, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    # One thread each by default: on this shared, oversubscribed 2-core box 2-thread OpenMP runs
    # swing several-fold with the load (transformers 2 threads: 62-260 tokens/s), 1 thread far less.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from rollout.ar_worker import ARRolloutWorker

    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)  # before vLLM starts: it freezes torch's thread count
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        paths = build_model(Path(tmp), "5M", args.tokens)
        tokenizer = load_tokenizer(paths)
        captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.prompts)]
        prompts = [rollout_prompt_ids(tokenizer, c) for c in captions for _ in range(args.group)]
        n_generated = len(prompts) * args.tokens

        hf_seconds = hf_generate_seconds(paths, prompts, args.tokens)
        print(f"transformers generate: {n_generated / hf_seconds:.0f} tokens/s ({hf_seconds:.1f} s)", flush=True)

        config = RolloutConfig(model=str(paths.root), max_model_len=512, num_threads=args.threads)
        start = time.perf_counter()
        worker = ARRolloutWorker(config)
        startup = time.perf_counter() - start
        first = worker.generate(captions[:1], 1, seed=0).timings["generate"]  # warm-up, one row
        batch = worker.generate(captions, args.group, seed=1)
        vllm_seconds = batch.timings["generate"]
        assert batch.image_tokens.shape == (n_generated // args.tokens, args.tokens)
        print(f"vLLM worker: {n_generated / vllm_seconds:.0f} tokens/s ({vllm_seconds:.1f} s)", flush=True)
        small_update = {"parameters": parameter_count(paths), **update_latency_ms(worker, paths, args.repeats)}

    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        large_update = pool.apply(measure_update_in_own_process, ("50M", args.threads, args.repeats))
    updates = {"5M": small_update, "50M": large_update}
    print(f"weight updates: {json.dumps(updates)}", flush=True)

    results = {
        "vllm_tokens_per_s": n_generated / vllm_seconds,
        "hf_tokens_per_s": n_generated / hf_seconds,
        "ratio": hf_seconds / vllm_seconds,
        "weight_update_ms": small_update["update_ms"],
        "weight_update_by_size": updates,
        "vllm_engine_startup_s": startup,
        "vllm_first_generate_s": first,
        "batch": {"prompts": args.prompts, "group_size": args.group, "tokens_per_image": args.tokens},
        "model": {"parameters": small_update["parameters"], **SIZES["5M"], "codebook_size": 1024},
        "rollout_config": config.model_dump(exclude={"model"}),
        "threads": args.threads,
        "machine": {"cpus": multiprocessing.cpu_count(), "processor": platform.processor() or platform.machine()},
        "load_average_at_start": load_at_start,
        "note": "shared 2-core machine, other test runs in parallel: figures are noisy; one run each",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(f"vLLM / transformers = {results['ratio']:.2f}x; wrote {RESULTS}")


if __name__ == "__main__":
    main()
