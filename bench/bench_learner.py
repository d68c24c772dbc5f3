"""Benchmark: learner step time and weight-sync time / throughput vs parameter count, per transport.

For a ~5M and a ~50M parameter Qwen3 AR model (random weights, built locally): a 2-rank ZeRO-1
learner (Ray actors, gloo) runs GRPO steps on a fixed batch; then its weights are published to
2 receiving actors (stand-ins for a rollout and a decoder worker: validate whole, load_state_dict)
over each transport. sync_s covers packing, transport, both workers loading and confirming the
version; GB/s = payload bytes / sync_s. Target on one machine: >= 1 GB/s.
Writes bench/results/learner.json.

    .venv/bin/python bench/bench_learner.py [--repeats 3]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from policy.loading import load_ar_model, load_tokenizer, load_vocab  # noqa: E402
from policy.model_dir import ModelPaths  # noqa: E402
from policy.prompt import rollout_prompt_ids  # noqa: E402
from policy.tiny import TinySpec, make_tiny  # noqa: E402
from rl.learners.ar_config import LearnerConfig  # noqa: E402
from rl.learners.group import LearnerGroup  # noqa: E402
from rl.objectives.grpo import (
    GRPOConfig,  # noqa: E402
    group_advantages,  # noqa: E402
)
from rl.weight_sync import WeightSyncConfig  # noqa: E402
from rollout.records import RolloutBatch  # noqa: E402
from tests.support.receivers import TransformersReceiver  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "learner.json"
SIZES = {
    "5M": TinySpec(codebook_size=1024, hidden_size=256, num_layers=4, intermediate_size=1024, decoder="glyph"),
    "50M": TinySpec(codebook_size=16384, hidden_size=512, num_layers=8, intermediate_size=2048, decoder="glyph"),
}
TRANSPORTS = ("object_store", "shared_memory", "broadcast")
CAPTIONS = ["a red cat", "two dogs"]
GROUP = 4


def make_batch(model_dir: Path) -> tuple[RolloutBatch, object]:
    paths = ModelPaths(model_dir)
    tokenizer = load_tokenizer(paths)
    vocab = load_vocab(paths, tokenizer)
    prompts = [rollout_prompt_ids(tokenizer, c) for c in CAPTIONS for _ in range(GROUP)]
    codes = torch.randint(0, vocab.codebook_size, (len(prompts), vocab.tokens_per_image),
                          generator=torch.Generator().manual_seed(0))  # [B*G, N]
    batch = RolloutBatch(prompts, [b for b in range(len(CAPTIONS)) for _ in range(GROUP)], vocab.to_token_ids(codes),
                         torch.full(codes.shape, -float(torch.log(torch.tensor(float(vocab.codebook_size))))), 0, 0)
    rewards = torch.linspace(0, 1, len(prompts))
    return batch, group_advantages(rewards, batch.group_index, GRPOConfig())


def bench_size(ray, name: str, spec: TinySpec, root: Path, repeats: int) -> list[dict]:
    model_dir = root / name
    make_tiny(model_dir, spec)
    params = sum(p.numel() for p in load_ar_model(ModelPaths(model_dir)).parameters())
    batch, advantages = make_batch(model_dir)
    config = LearnerConfig(model=str(model_dir), world_size=2, zero_stage=1, micro_batch_size=4, lr=1e-5,
                           torch_threads=1, grpo=GRPOConfig(beta=0.001))
    group = LearnerGroup(config, timeout_s=900)
    receiver = ray.remote(TransformersReceiver).options(num_cpus=0)
    receivers = [receiver.remote(str(model_dir), torch_threads=1) for _ in range(2)]
    try:
        group.train_step(batch, advantages)  # warm-up
        step_s = statistics.median(group.train_step(batch, advantages).step_s for _ in range(repeats))
        rows = []
        for transport in TRANSPORTS:
            group.connect_workers(receivers, WeightSyncConfig(transport=transport, timeout_s=600))
            group.publish_weights()  # warm-up (first touch of buffers, group setup)
            reports = [group.publish_weights() for _ in range(repeats)]
            sync_s = statistics.median(r.seconds for r in reports)
            rows.append({
                "size": name, "params": params, "transport": transport, "bytes": reports[0].bytes,
                "workers": reports[0].workers, "step_s": step_s, "sync_s": sync_s,
                "pack_s": statistics.median(r.pack_seconds for r in reports),
                "sync_gb_per_s": reports[0].bytes / sync_s / 1e9,
            })
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for receiver in receivers:
            ray.kill(receiver)
        group.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    temp_dir = tempfile.mkdtemp(prefix="rayb", dir="/tmp")
    root = Path(tempfile.mkdtemp(prefix="bench-learner-"))
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        rows = [row for name, spec in SIZES.items() for row in bench_size(ray, name, spec, root, args.repeats)]
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    by = {(r["size"], r["transport"]): r for r in rows}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs (noisy)",
        "setup": "2 learner ranks (ZeRO-1, gloo, fp32, 1 thread each) + 2 receiving actors; batch 8 rows x 16 tokens",
        "target_sync_gb_per_s": 1.0,
        "results": rows,
        "shared_memory_over_object_store": {s: by[(s, "object_store")]["sync_s"] / by[(s, "shared_memory")]["sync_s"]
                                            for s in SIZES},
        "shared_memory_over_broadcast": {s: by[(s, "broadcast")]["sync_s"] / by[(s, "shared_memory")]["sync_s"]
                                         for s in SIZES},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
