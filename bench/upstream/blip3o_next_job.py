"""BLIP3o-NEXT's own GRPO trainer on the benchmark's job, in its own environment:

    /work/upstream/venv/bin/python bench/upstream/blip3o_next_job.py WORKDIR

Does what upstream's `trl/train_grpo.py` does (a `datasets.Dataset` of captions, its fork's
`GRPOConfig` + `GRPOTrainer` with the model given as a path, a dummy reward function: the fork's
trainer scores with its built-in OCR), on the patched copy bench/upstream/setup.sh extracts
(bench/upstream/blip3o-next-cpu.patch), with the job's settings in place of train_grpo.py's
hard-coded ones (WORKDIR/job.json, written by bench/bench_vs_upstream.py). Added, as instrumentation
only: the fork's own profiling timers (`profiling_context`, which upstream sends to W&B) are
collected, and a callback writes one line per optimizer step to WORKDIR/steps.jsonl.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = Path(os.environ.get("BLIP3O_NEXT_DIR", "/work/upstream/blip3o-next"))
FORK_STAGES = {"transformers.generate": "generate", "_calculate_rewards": "reward"}
"""The fork's profiling names -> our stages (its generate includes the image head: glyph decoding here)."""


def fork_args(spec, output_dir: Path) -> dict:
    """The fork's GRPOConfig arguments: the job's values where train_grpo.py hard-codes its own
    (lr 1e-6, beta 0.001, cosine schedule, 16 x 16 per device on 8 GPUs, liger loss)."""
    samples = spec.prompts_per_step * spec.group_size
    return dict(
        output_dir=str(output_dir), report_to="none", logging_steps=1, save_strategy="no",
        use_cpu=True,  # CPU; bf16 stays the fork's default (autocast: bf16 compute on the fp32 weights)
        use_liger_loss=False,  # CPU: liger-kernel's GRPO loss is Triton (GPU) code
        per_device_train_batch_size=spec.micro_batch_size, num_generations=spec.group_size,
        gradient_accumulation_steps=samples // spec.micro_batch_size,  # one optimizer step per job step
        max_steps=spec.steps, learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0,
        beta=spec.beta, epsilon=spec.clip_low, epsilon_high=spec.clip_high, max_grad_norm=spec.grad_clip,
        temperature=spec.temperature, scale_rewards=spec.scale_by_std, max_completion_length=spec.tokens_per_image,
        seed=spec.seed, shuffle_dataset=False,  # the captions in blip3o-rl's sampler order
    )


def main(workdir: Path) -> None:
    sys.path[:0] = [str(UPSTREAM / "trl"), str(UPSTREAM), str(REPO)]
    from bench.upstream.job import GlyphImages, JobSpec, StageClock, StepLog, step_callback

    spec = JobSpec.load(workdir / "job.json")
    os.environ.update(BENCH_OCR_MODELS_DIR=spec.ocr_models_dir, BENCH_OCR_SIZE=spec.ocr_size,
                      PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK="True")
    os.chdir(workdir)  # the fork saves highest_reward_image_final.png in the working directory each step
    import trl.trainer.grpo_trainer as fork_trainer
    from blip3o.model.language_model import blip3o_qwen_grpo
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    clock = StageClock()

    @contextlib.contextmanager
    def timed(trainer, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            if name in FORK_STAGES:
                clock.add(FORK_STAGES[name], time.perf_counter() - start)

    profiling.profiling_context = fork_trainer.profiling_context = timed

    model_path = workdir / "blip3o-next-checkpoint"
    glyphs = GlyphImages(AutoTokenizer.from_pretrained(model_path), spec)

    def draw(completion_ids):
        start = time.perf_counter()
        images = [Image.fromarray(image) for image in glyphs(completion_ids.cpu())]
        clock.add("decode", time.perf_counter() - start)
        return images

    blip3o_qwen_grpo.TOKEN_IMAGE_DECODER = draw
    log = StepLog(workdir / "steps.jsonl")

    def reward_len(completions, **kwargs):  # train_grpo.py's dummy: the fork's trainer ignores it
        return [-abs(20 - len(completion)) for completion in completions]

    trainer = GRPOTrainer(
        model=str(model_path),
        reward_funcs=reward_len,
        args=GRPOConfig(**fork_args(spec, workdir / "fork-out")),
        train_dataset=Dataset.from_dict({"prompt": spec.captions}),
        callbacks=[step_callback(log, clock, decode_inside="generate")],  # its generate draws the glyphs
    )
    trainer.train()


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
