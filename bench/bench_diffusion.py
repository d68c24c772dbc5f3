"""Benchmark: Flow-GRPO on the tiny SANA decoder (the diffusion learner and its SDE sampler).

- the SDE sampler with per-step log-probs vs the ODE sampler, images/s at batch 1 and 8 (one
  in-process decoder worker, 1 torch thread as in a Ray actor, the same steps for both);
- the diffusion learner (1 DeepSpeed rank, a Ray actor): step time on a batch of SDE rollouts, and
  `logprob_max_abs_diff`, the largest |learner - sampler| per-step log-prob at the sampling weights;
- the transformer publish to a decoder actor (shared memory, versioned and confirmed): the full
  transformer (full fine-tuning) vs the LoRA adapter the decoder merges into its base copy
  (`--lora-rank`, alpha 2 x rank as Flow-GRPO's 32 / 64; the LoRA learner's step time too).

- reward curves: the CPU demo configs run as a user runs them (`python -m rl.run.train`, one after the
  other), JPEG compressibility through the reward API: `train: [diffusion]`
  (deploy/configs/tiny-cpu-sana-diffusion.yaml), `[ar, diffusion]` (tiny-cpu-sana-joint.yaml) and,
  for comparison, `[ar]` (the joint config without its diffusion learner); mean reward of the first
  and last 5 steps and every step's.

Writes bench/results/diffusion.json (or --out); `--curves-only` runs only the reward curves and
updates those keys of an existing file.

    .venv/bin/python bench/bench_diffusion.py [--repeats 3] [--steps 10] [--lora-rank 4] [--train-steps 60]
        [--curves-only] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy.loading import load_tokenizer, load_vocab  # noqa: E402
from policy.prompt import rollout_prompt_ids  # noqa: E402
from policy.sana_lora import TransformerLoRAConfig  # noqa: E402
from policy.tiny import PRESETS, make_tiny  # noqa: E402
from rewards.compressibility import jpeg_size_kb  # noqa: E402
from rl.learners.diffusion_config import DiffusionLearnerConfig  # noqa: E402
from rl.objectives.grpo import (
    GRPOConfig,  # noqa: E402
    group_advantages,  # noqa: E402
)
from rl.weight_sync import WeightSyncConfig  # noqa: E402
from rollout.decoder_config import DecoderConfig  # noqa: E402
from rollout.decoder_worker import DiffusionDecoderWorker, decoder_actor  # noqa: E402
from rollout.diffusion_rollout import SdeSampling  # noqa: E402
from rollout.records import RolloutBatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "diffusion.json"
DEMOS = {"diffusion": REPO / "deploy" / "configs" / "tiny-cpu-sana-diffusion.yaml",
         "joint": REPO / "deploy" / "configs" / "tiny-cpu-sana-joint.yaml"}
CAPTIONS = ["a photo of a cat", "two red buses on a road", "a blue clock", "a sign that says \"open\""]
GROUP = 4


def make_batch(model_dir: Path, rows: int, group: int = 1) -> RolloutBatch:
    """`rows` rows; consecutive `group` rows share a prompt and its image tokens (one GRPO group)."""
    from policy.model_dir import ModelPaths

    paths = ModelPaths(model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    prompts = rows // group
    codes = torch.randint(0, vocab.codebook_size, (prompts, vocab.tokens_per_image),
                          generator=torch.Generator().manual_seed(0)).repeat_interleave(group, dim=0)
    return RolloutBatch(
        prompt_ids=[rollout_prompt_ids(tokenizer, CAPTIONS[(r // group) % len(CAPTIONS)]) for r in range(rows)],
        group_index=[r // group for r in range(rows)], image_tokens=vocab.to_token_ids(codes),
        logprobs=torch.zeros(codes.shape), policy_version=0, seed=0,
    )


def best_of(repeats: int, call) -> list[float]:
    call(0)  # warm-up: first-call allocations and kernel selection
    runs = []
    for repeat in range(repeats):
        start = time.perf_counter()
        call(repeat + 1)
        runs.append(time.perf_counter() - start)
    return runs


def samplers(model_dir: Path, steps: int, repeats: int) -> dict:
    """ODE vs SDE-with-log-probs images/s at batch 1 and 8 (same steps, guidance 2.0)."""
    torch.set_num_threads(1)
    worker = DiffusionDecoderWorker(DecoderConfig(model=str(model_dir), num_inference_steps=steps))
    sampling = SdeSampling(steps=steps)
    out = {}
    for size in (1, 8):
        batch = make_batch(model_dir, size)
        ode = best_of(repeats, lambda seed: worker.decode(batch, seed))
        sde = best_of(repeats, lambda seed: worker.decode_sde(batch, seed, sampling))
        out[f"batch{size}"] = {"ode_images_per_s": size / min(ode), "sde_images_per_s": size / min(sde),
                               "sde_over_ode": min(ode) / min(sde), "ode_call_seconds": ode, "sde_call_seconds": sde}
    _, rollout = worker.decode_sde(make_batch(model_dir, 8), 0, sampling)
    out["rollout_bytes_per_image"] = rollout.bytes_per_image()
    return out


def learner_and_publish(model_dir: Path, steps: int, repeats: int, rows: int,
                        lora: TransformerLoRAConfig | None = None) -> dict:
    """Learner step time and the transformer publish, with a decoder actor and a 1-rank learner;
    with `lora` both train / serve the adapter (the publish sends it, the decoder merges it)."""
    import ray

    from rl.learners.diffusion_learner import DiffusionLearnerGroup

    sampling = SdeSampling(steps=steps)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        decoder = decoder_actor(DecoderConfig(model=str(model_dir), num_inference_steps=steps, num_threads=1,
                                              transformer_lora=lora))
        config = DiffusionLearnerConfig(model=str(model_dir), world_size=1, micro_batch_size=8,
                                        gradient_accumulation_steps=max(rows // 8, 1), torch_threads=1,
                                        sampling=sampling, sync=WeightSyncConfig(transport="shared_memory"),
                                        lora=lora)
        learner = DiffusionLearnerGroup(config, timeout_s=900)
        learner.connect_workers([decoder])
        batch = make_batch(model_dir, rows, GROUP)
        step_seconds, publish, diffs, kb = [], [], [], []
        for repeat in range(repeats + 1):  # the first round warms up
            images, rollout = ray.get(decoder.decode_sde.remote(batch, 1000 + rows * repeat, sampling))
            sizes = [jpeg_size_kb(image) for image in images.images]
            kb.append(sum(sizes) / len(sizes))
            rewards = torch.tensor([-size / 500 for size in sizes])
            metrics = learner.train_step(rollout, group_advantages(rewards, rollout.group_index, GRPOConfig()))
            report = learner.publish_weights()
            diffs.append(metrics.logprob_max_abs_diff)
            if repeat > 0:
                step_seconds.append(metrics.step_s)
                publish.append({"seconds": report.seconds, "bytes": report.bytes, "gb_per_s": report.gb_per_s})
        learner.shutdown()
        ray.kill(decoder)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return {"learner_step_seconds": step_seconds, "learner_rows": rows, "logprob_max_abs_diff": max(diffs),
            "publish": publish, "mean_jpeg_kb_per_round": kb}


def reward_curve(name: str, demo: Path, steps: int, workdir: Path, model_dir: Path) -> dict:
    """Run a demo config (`ar`: the joint one without its diffusion learner) and read its rewards back."""
    from rl.run_store import RunStore

    raw = yaml.safe_load(demo.read_text())
    if name == "ar":
        raw["train"] = ["ar"]
        raw.pop("diffusion_learner")
    raw.update(steps=steps, model={"path": str(model_dir)},
               logging={"runs_dir": str(workdir / name), "samples_per_step": 0})
    raw["checkpoint"] = {"every": steps}
    config = workdir / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rl.run.train", "--config", str(config)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    store = RunStore(workdir / name)
    (run,) = store.list_runs()
    series = store.metrics(run.id, ["reward/mean", "policy/version", "diffusion/version"])
    rewards = series.values["reward/mean"]
    print(f"{name}: {rewards[0]:.6f} -> {rewards[-1]:.6f} in {seconds:.0f} s", flush=True)
    return {"train": raw["train"], "steps": steps, "run_seconds": seconds,
            "reward_first_steps": float(np.mean(rewards[:5])), "reward_last_steps": float(np.mean(rewards[-5:])),
            "jpeg_kb_first_steps": float(-500 * np.mean(rewards[:5])),
            "jpeg_kb_last_steps": float(-500 * np.mean(rewards[-5:])),
            "rewards": rewards, "final_policy_version": series.values["policy/version"][-1],
            "final_diffusion_version": (series.values.get("diffusion/version") or [None])[-1]}


def reward_curves(steps: int) -> dict:
    """`[diffusion]`, `[ar, diffusion]` and `[ar]` on one freshly built tiny SANA model, one after the other."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "sana"
        make_tiny(model_dir, PRESETS["sana"])
        curves = {name: reward_curve(name, DEMOS.get(name, DEMOS["joint"]), steps, Path(tmp), model_dir)
                  for name in ("diffusion", "joint", "ar")}
    return {
        "diffusion_reward_first_steps": curves["diffusion"]["reward_first_steps"],
        "diffusion_reward_last_steps": curves["diffusion"]["reward_last_steps"],
        "joint_reward_first_steps": curves["joint"]["reward_first_steps"],
        "joint_reward_last_steps": curves["joint"]["reward_last_steps"],
        "ar_reward_first_steps": curves["ar"]["reward_first_steps"],
        "ar_reward_last_steps": curves["ar"]["reward_last_steps"],
        "reward_curves": curves,
        "reward_curves_load_average": list(os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (Flow-GRPO trains with 10)")
    parser.add_argument("--rows", type=int, default=16, help="images per learner step")
    parser.add_argument("--lora-rank", type=int, default=4,
                        help="adapter rank of the LoRA publish (the tiny transformer's linears are 32 wide)")
    parser.add_argument("--train-steps", type=int, default=60, help="steps of each demo run (reward curves)")
    parser.add_argument("--curves-only", action="store_true", help="only the reward curves, merged into --out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.curves_only:
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        result.update(reward_curves(args.train_steps))
        result.get("settings", {}).pop("reward_keys", None)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k.endswith("_steps")}, indent=2))
        return
    lora = TransformerLoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "sana"
        make_tiny(model_dir, PRESETS["sana"])
        sampled = samplers(model_dir, args.steps, args.repeats)
        trained = learner_and_publish(model_dir, args.steps, args.repeats, args.rows)
        trained_lora = learner_and_publish(model_dir, args.steps, args.repeats, args.rows, lora)
    result = {
        "sde_images_per_s": sampled["batch8"]["sde_images_per_s"],
        "ode_images_per_s": sampled["batch8"]["ode_images_per_s"],
        "sde_images_per_s_batch1": sampled["batch1"]["sde_images_per_s"],
        "ode_images_per_s_batch1": sampled["batch1"]["ode_images_per_s"],
        "logprob_max_abs_diff": trained["logprob_max_abs_diff"],
        "learner_step_seconds": min(trained["learner_step_seconds"]),
        "decoder_publish_seconds": min(p["seconds"] for p in trained["publish"]),
        "decoder_publish_bytes": trained["publish"][0]["bytes"],
        "decoder_publish_seconds_lora": min(p["seconds"] for p in trained_lora["publish"]),
        "decoder_publish_bytes_lora": trained_lora["publish"][0]["bytes"],
        "learner_step_seconds_lora": min(trained_lora["learner_step_seconds"]),
        "logprob_max_abs_diff_lora": trained_lora["logprob_max_abs_diff"],
        "rollout_bytes_per_image": sampled["rollout_bytes_per_image"],
        **reward_curves(args.train_steps),
        "samplers": sampled,
        "learner": trained,
        "learner_lora": trained_lora,
        "settings": {
            "model": "tiny sana preset (Qwen3 2x128, SANA 2 layers, DC-AE f8, 64 px)",
            "steps": args.steps, "noise_level": 0.7, "guidance_scale": 2.0, "dtype": "float32",
            "learner": f"1 DeepSpeed rank (ZeRO-1, fp32), {args.rows} images x {args.steps} SDE steps a step, "
                       "beta 0.004 (a frozen copy), full fine-tuning",
            "publish": "shared memory: the full transformer (full fine-tuning), or the LoRA adapter",
            "lora": f"rank {lora.rank}, alpha {lora.alpha}, on {list(lora.target_modules)} (attn1, attn2); "
                    "beta 0.004 against the adapter-off reference (no frozen copy)",
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "note": "shared, noisy machine: best of repeats",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samplers", "learner", "learner_lora")},
                     indent=2))


if __name__ == "__main__":
    main()
