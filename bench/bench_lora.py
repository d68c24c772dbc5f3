"""Benchmark: full fine-tuning vs LoRA side by side: publish bytes and seconds, learner step time and peak memory.

For each mode (full, then lora) on the same model and the same batch: one learner rank (Ray actor,
ZeRO-1, gloo, fp32, KL beta 0.001: full fine-tuning loads a frozen reference copy, LoRA switches its
adapter off instead) runs GRPO steps on a fixed batch of random image tokens (scored on-policy by
the learner first), and after each step publishes to one vLLM rollout worker (LoRA: adapters
served as a LoRARequest per version; full: an in-place reload). Peak memory is the learner
process's VmHWM over the steps (reset after setup) and its RSS after setup. The modes run one after
the other, so they never share the machine.

    .venv/bin/python bench/bench_lora.py [--model tiny|blip3o-next-shape] [--steps 3] [--rank 16]
        [--out bench/results/lora.json]

`blip3o-next-shape` builds the rehearsal model of bench/bench_scale.py (0.546B AR; ~25 s, ~4 GB
to build) and needs the machine alone: the full-FT learner holds ~11 GB in fp32 (weights, grads,
Adam, the reference copy) and vLLM ~4-9 GB more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.bench_learner import CAPTIONS, GROUP, make_batch  # noqa: E402
from policy.lora import LoRAConfig  # noqa: E402
from policy.model_dir import ModelPaths  # noqa: E402
from policy.tiny import PRESETS, TinySpec, make_tiny  # noqa: E402
from rl.learners.ar_config import LearnerConfig  # noqa: E402
from rl.objectives.grpo import GRPOConfig  # noqa: E402
from rl.weight_sync import WeightSyncConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lora.json"
MODELS = {
    # bench_learner.py's 5M model (4 layers, hidden 256, 1024 image tokens), glyph decoder (no SANA to build)
    "tiny": TinySpec(codebook_size=1024, hidden_size=256, num_layers=4, intermediate_size=1024, decoder="glyph"),
    "blip3o-next-shape": PRESETS["blip3o-next-shape"],
}


def memory_of(rank_actor) -> dict[str, int]:
    import ray

    def read(_rank) -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    return ray.get(rank_actor.__ray_call__.remote(read))


def reset_peak(rank_actor) -> None:
    import ray

    def reset(_rank) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS

    ray.get(rank_actor.__ray_call__.remote(reset))


def bench_mode(mode: str, model_dir: Path, lora: LoRAConfig | None, args: argparse.Namespace) -> dict:
    import ray

    from rl.learners.group import LearnerGroup
    from rollout.ar_worker import ARRolloutActor
    from rollout.config import RolloutConfig

    tokens_per_image = ModelPaths(model_dir).layout().tokens_per_image
    worker = ARRolloutActor.options(num_cpus=1).remote(RolloutConfig(
        model=str(model_dir), kv_cache_gib=args.kv_cache_gib, max_model_len=max(256, tokens_per_image + 128),
        num_threads=args.threads, lora=lora))
    started = time.perf_counter()
    learner = LearnerGroup(LearnerConfig(
        model=str(model_dir), world_size=1, zero_stage=1, micro_batch_size=args.micro_batch_size, lr=1e-4,
        torch_threads=args.threads, grpo=GRPOConfig(beta=0.001), lora=lora), timeout_s=3600)
    setup_s = time.perf_counter() - started
    try:
        batch, advantages = make_batch(model_dir)  # the learner benchmark's batch and advantages
        batch.logprobs = learner.logprobs(batch)  # on-policy
        learner.connect_workers([worker], WeightSyncConfig(transport=args.transport, timeout_s=3600))
        ray.get(worker.served_version.remote(), timeout=3600)  # the engine is up
        after_setup = memory_of(learner.ranks[0])
        reset_peak(learner.ranks[0])
        steps, publishes = [], []
        for _ in range(args.steps):
            steps.append(learner.train_step(batch, advantages).step_s)
            publishes.append(learner.publish_weights())
        peak = memory_of(learner.ranks[0])["VmHWM"]
        trainable = sum(t.numel() for t in learner.gather_weights().values())
    finally:
        learner.shutdown()
        ray.kill(worker)
    row = {
        "mode": mode, "lora": lora.model_dump(mode="json") if lora else None, "trainable_params": trainable,
        "learner_setup_s": setup_s, "step_s": steps, "step_s_median": statistics.median(steps),
        "learner_rss_after_setup_bytes": after_setup["VmRSS"], "learner_peak_rss_during_steps_bytes": peak,
        "publish_bytes": publishes[0].bytes, "publish_s": [r.seconds for r in publishes],
        "publish_s_median": statistics.median(r.seconds for r in publishes),
        "publish_pack_s_median": statistics.median(r.pack_seconds for r in publishes),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="learner steps (each followed by a publish) per mode")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank, all 7 projections)")
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the learner rank and of vLLM")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--transport", default="shared_memory", choices=["shared_memory", "object_store", "broadcast"])
    parser.add_argument("--work-dir", type=Path, help="keep the model here (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import ray

    temp_dir = tempfile.mkdtemp(prefix="rayl", dir="/tmp")
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-lora-"))
    model_dir = root / args.model
    if not (model_dir / "blip3o_rl_model.json").is_file():
        make_tiny(model_dir, MODELS[args.model])
    lora = LoRAConfig(rank=args.rank, alpha=2.0 * args.rank)
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        rows = [bench_mode(mode, model_dir, lora if mode == "lora" else None, args) for mode in args.modes.split(",")]
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    by = {row["mode"]: row for row in rows}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": args.model,
        "setup": (f"1 learner rank (ZeRO-1, gloo, fp32, {args.threads} threads, KL beta 0.001), micro-batch "
                  f"{args.micro_batch_size}, batch {len(CAPTIONS) * GROUP} rows of random image tokens; 1 vLLM "
                  f"rollout worker, {args.transport} transport; modes one after the other"),
        "results": rows,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if {"full", "lora"} <= by.keys():
        full, lora_row = by["full"], by["lora"]
        result["full_over_lora"] = {
            "publish_bytes": full["publish_bytes"] / lora_row["publish_bytes"],
            "publish_s": full["publish_s_median"] / lora_row["publish_s_median"],
            "step_s": full["step_s_median"] / lora_row["step_s_median"],
            "learner_peak_rss": (full["learner_peak_rss_during_steps_bytes"]
                                 / lora_row["learner_peak_rss_during_steps_bytes"]),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
