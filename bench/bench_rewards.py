"""OCR reward throughput in-process vs through the REST server, and latency under 16 clients.

    .venv/bin/python bench/bench_rewards.py [--rounds 3] [--size small]

In-process: `OcrScorer.score` at batch 1 and 16. Server: `blip3o-rl rewards serve` in its own
process (same machine, same cores), requests of 1 and of 16 images, and 16 concurrent clients
sending 1-image requests (the server's queue batches them). The two sides alternate, round after
round, and medians are reported. PNG payloads are encoded before timing, so both sides time the
same work: decode (server only) + OCR.
Writes bench/results/rewards.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.client import encode_png  # noqa: E402
from rewards.local_server import start_reward_server  # noqa: E402
from rewards.ocr import OcrConfig, OcrScorer, extract_target  # noqa: E402
from tests.rewards_support import ocr_prompts, render_text  # noqa: E402


def in_process(scorer: OcrScorer, images, targets, batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        scorer.score(images[i : i + batch], targets[i : i + batch])
    return len(images) / (time.perf_counter() - started)


async def through_server(
    url: str, payloads: list[dict], batch: int, clients: int, latencies: list[float] | None = None
) -> tuple[float, list[float]]:
    """Images/s and per-request latencies (s): `clients` workers share the requests of `batch` items."""
    requests = [{"items": payloads[i : i + batch]} for i in range(0, len(payloads), batch)]
    latencies = [] if latencies is None else latencies
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def worker(mine):
            for body in mine:
                sent = time.perf_counter()
                response = await http.post("/v1/rewards/ocr", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - sent)

        started = time.perf_counter()
        await asyncio.gather(*(worker(requests[k::clients]) for k in range(clients)))
        elapsed = time.perf_counter() - started
    return len(payloads) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; medians are reported")
    parser.add_argument("--size", choices=["small", "tiny"], default="small")
    args = parser.parse_args()

    prompts = ocr_prompts(16)
    targets = [extract_target(p) for p in prompts]
    images = [render_text(t) for t in targets]  # 512x128 signs
    payloads = [{"image": encode_png(im), "target": t} for im, t in zip(images, targets)]

    scorer = OcrScorer(OcrConfig(size=args.size))
    scorer.score(images[:2], targets[:2])  # warm-up
    mean_reward = float(np.mean([r.reward for r in scorer.score(images[:16], targets[:16])]))
    reward_server = start_reward_server(["--scorers", "ocr", "--ocr-size", args.size, "--batch-size", "16"])
    url = reward_server.url
    runs: dict[str, list[float]] = {key: [] for key in ("in1", "in16", "srv1", "srv16", "srv_clients")}
    latencies: list[float] = []
    try:
        asyncio.run(through_server(url, payloads[:2], 1, 1))  # warm-up
        # Interleave the two sides, round after round, flipping which goes first, so the machine's
        # other load hits both alike; ratios are taken within a round (paired), then the median.
        for round_ in range(args.rounds):
            few = slice(8 * round_ % 16, 8 * round_ % 16 + 8)  # batch 1: 8 of the same 16 images
            steps = {
                "in1": lambda: in_process(scorer, images[few], targets[few], 1),
                "srv1": lambda: asyncio.run(through_server(url, payloads[few], 1, 1))[0],
                "in16": lambda: in_process(scorer, images, targets, 16),
                "srv16": lambda: asyncio.run(through_server(url, payloads, 16, 1))[0],
                "srv_clients": lambda: asyncio.run(through_server(url, payloads, 1, 16, latencies))[0],
            }
            for key in (list(steps) if round_ % 2 == 0 else list(steps)[::-1]):
                runs[key].append(steps[key]())
    finally:
        reward_server.stop(timeout_s=60)
    median = {key: float(np.median(values)) for key, values in runs.items()}
    inproc = {1: median["in1"], 16: median["in16"]}
    server = {1: median["srv1"], 16: median["srv16"]}
    concurrent = median["srv_clients"]

    def paired(server_key: str, inproc_key: str) -> float:
        return round(float(np.median(np.array(runs[server_key]) / np.array(runs[inproc_key]))), 3)

    result = {
        "ocr_model": f"PP-OCRv6_{args.size}",
        "rounds": args.rounds,
        "images_per_round": {"batch1": 8, "batch16": 16, "16_clients": 16},
        "ratio_method": "median over rounds of (server rate / in-process rate measured next to it)",
        "image_size": [512, 128],
        "mean_reward_rendered": round(mean_reward, 4),
        "ocr_inprocess_images_per_s_batch1": round(inproc[1], 3),
        "ocr_inprocess_images_per_s_batch16": round(inproc[16], 3),
        "ocr_server_images_per_s_batch1": round(server[1], 3),
        "ocr_server_images_per_s_batch16": round(server[16], 3),
        "ocr_server_images_per_s_16_clients": round(concurrent, 3),
        # Headline: 16 clients x 1-image requests (batched by the server's queue) vs one in-process batch of 16.
        "ocr_inprocess_images_per_s": round(inproc[16], 3),
        "ocr_server_images_per_s": round(concurrent, 3),
        "server_vs_inprocess": paired("srv_clients", "in16"),
        "server_vs_inprocess_batch1": paired("srv1", "in1"),
        "server_vs_inprocess_batch16": paired("srv16", "in16"),
        "per_round": {key: [round(v, 3) for v in values] for key, values in runs.items()},
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1),
        "cpu_count": os.cpu_count(),
        "note": "shared 2-core machine, other jobs running (load 4-8): noisy; rates are medians over rounds, ratios medians of per-round ratios",
    }
    out = ROOT / "bench" / "results" / "rewards.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
