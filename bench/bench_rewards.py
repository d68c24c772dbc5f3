"""OCR reward throughput in-process vs through the REST server, and latency under 16 clients.

    .venv/bin/python bench/bench_rewards.py [--rounds 3] [--size small]

In-process: `OcrScorer.score` at batch 1 and 16. Server: `blip3o-rl rewards serve` in its own
process (same machine, same cores), requests of 1 and of 16 images, and 16 concurrent clients
sending 1-image requests (the server's queue batches them). The two sides alternate, round after
round, and medians are reported. PNG payloads are encoded before timing, so both sides time the
same work: decode (server only) + OCR.
Also CLIPScore / PickScore images/s in-process on tiny CLIPs (`--clip-only`: just those, printed),
and `http_scorer_vs_inprocess`: a reward function behind the generic HTTP protocol, called through
the trainer's client, vs the same function in-process (`--http-scorer-only`: just that, printed).
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
RESULTS = ROOT / "bench" / "results" / "rewards.json"
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


def clip_family_images_per_s(rounds: int, count: int = 32) -> dict[str, float]:
    """CLIPScore and PickScore images/s in-process on the tiny colour CLIPs (rewards/tiny.py), in
    batches of `count` 256x256 images where groups of 8 share a prompt (as a GRPO batch does):
    the cost of the scorer around the model (processor, batching, prompt de-duplication), not of a
    real ViT-L/H. Median over `rounds`."""
    import math
    import tempfile

    from rewards.app.settings import Settings
    from rewards.clip_score import ClipScoreConfig, PickScoreConfig, clipscore_scorer, pickscore_scorer
    from rewards.tiny import make_tiny_colour_clip

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(count)]
    prompts = [f"a photo of thing {i // 8} in red" for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_tiny_colour_clip(Path(tmp) / "clip")
        pick = make_tiny_colour_clip(Path(tmp) / "pick", math.log(100.0), processor_directory=Path(tmp) / "proc")
        settings = Settings(scorers=["clipscore", "pickscore"], clipscore=ClipScoreConfig(model=str(clip)),
                            pickscore=PickScoreConfig(model=str(pick), processor=str(Path(tmp) / "proc")))
        scorers = {"clipscore": clipscore_scorer(settings), "pickscore": pickscore_scorer(settings)}
    runs: dict[str, list[float]] = {name: [] for name in scorers}
    for scorer in scorers.values():
        scorer.score(images[:2], prompts[:2], [{}] * 2)  # warm-up
    for _ in range(rounds):
        for name, scorer in scorers.items():
            started = time.perf_counter()
            scorer.score(images, prompts, [{}] * count)
            runs[name].append(count / (time.perf_counter() - started))
    return {f"{name}_tiny_inprocess_images_per_s": round(float(np.median(values)), 1) for name, values in runs.items()}


def ocr_reward_function(size: str):
    """A model-sized reward written as a user would: f(images, prompts, metadatas) -> rewards, here
    PP-OCRv6 reading each prompt's quoted text."""
    scorer = OcrScorer(OcrConfig(size=size))

    def ocr_reward(images: list[np.ndarray], prompts: list[str], metadatas: list[dict]) -> list[float]:
        return [r.reward for r in scorer.score(images, [extract_target(p) for p in prompts])]

    return ocr_reward


def serve_http_scorer(port: int, size: str) -> None:
    """The http scorer's own process: the example scorer app (examples/http_scorer) serving
    `ocr_reward_function` at /score and mean brightness at /brightness."""
    import uvicorn

    from tests.support.http_scorers import load_example

    example = load_example()
    app = example.create_app(ocr_reward_function(size), "ocr-function", f"pp-ocrv6-{size}")
    brightness = example.create_app()
    app.add_api_route("/brightness", next(r.endpoint for r in brightness.routes if r.path == "/score"), methods=["POST"])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def http_scorer_vs_inprocess(rounds: int, size: str, count: int = 32) -> dict:
    """A reward function behind HTTP, called the way the trainer calls it (rl.scoring.service.score_images
    on chunks of 16 rows: PNG encoding, the generic protocol, the example scorer app in its own
    process) vs the same function called in-process on the same arrays, rounds interleaved. Two
    functions: PP-OCRv6 (a model-sized reward: the headline ratio) and mean brightness (almost free:
    what the protocol itself costs per image)."""
    import subprocess

    from rewards.app.schemas import Limits
    from rewards.local_server import free_port
    from rl.prompts.sources import PromptItem
    from rl.scoring.reward_mix import RewardComponentConfig
    from rl.scoring.service import RewardEndpoint, score_images
    from tests.support.http_scorers import load_example

    chunk = 16  # rows a scoring task sends (one prompt of a 16-sample group)
    prompts = ocr_prompts(count)
    images = np.stack([render_text(extract_target(p)) for p in prompts])  # [count, 128, 512, 3]
    items = [PromptItem(p, "ocr") for p in prompts]
    metadatas = [{"task": "ocr"} for _ in prompts]
    functions = {"model": ocr_reward_function(size), "trivial": load_example().mean_brightness}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, __file__, "--serve-http-scorer", str(port), "--size", size],
                              stdout=subprocess.DEVNULL, start_new_session=True)
    mixes = {"model": (RewardComponentConfig(name="model", scorer="http", url=f"{url}/score"),),
             "trivial": (RewardComponentConfig(name="trivial", scorer="http", url=f"{url}/brightness"),)}
    limits = Limits(max_items=chunk, max_body_bytes=16 * 1024 * 1024, max_image_pixels=4096 * 4096)
    endpoint = RewardEndpoint(url=url, token=None, timeout_s=600, outage_budget_s=120, backoff_s=0.5,
                              scorer_limits={"model": limits, "trivial": limits})

    def inprocess(kind: str) -> float:
        started = time.perf_counter()
        for first in range(0, count, chunk):
            functions[kind](list(images[first : first + chunk]), prompts[first : first + chunk],
                            metadatas[first : first + chunk])
        return count / (time.perf_counter() - started)

    def through_http(kind: str) -> float:
        started = time.perf_counter()
        for first in range(0, count, chunk):
            score_images(endpoint, images[first : first + chunk], items[first : first + chunk], mixes[kind])
        return count / (time.perf_counter() - started)

    runs: dict[str, list[float]] = {key: [] for key in ("model_in", "model_http", "trivial_in", "trivial_http")}
    try:
        deadline = time.monotonic() + 300
        while True:  # the server loads its OCR model first
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the http scorer did not start (exit code {server.poll()})")
            time.sleep(0.5)
        steps = {"model_in": lambda: inprocess("model"), "model_http": lambda: through_http("model"),
                 "trivial_in": lambda: inprocess("trivial"), "trivial_http": lambda: through_http("trivial")}
        for step in steps.values():  # warm-up
            step()
        for round_ in range(rounds):
            for key in (list(steps) if round_ % 2 == 0 else list(steps)[::-1]):
                runs[key].append(steps[key]())
    finally:
        server.terminate()
        server.wait(timeout=60)

    def ratio(kind: str) -> float:
        return round(float(np.median(np.array(runs[f"{kind}_http"]) / np.array(runs[f"{kind}_in"]))), 3)

    median = {key: float(np.median(values)) for key, values in runs.items()}
    return {
        "http_scorer_vs_inprocess": ratio("model"),
        "http_scorer_function": f"PP-OCRv6_{size} as f(images, prompts, metadatas); {count} images 512x128, "
                                f"chunks of {chunk} through rl.scoring.service.score_images",
        "http_scorer_images_per_s": round(median["model_http"], 3),
        "http_scorer_inprocess_images_per_s": round(median["model_in"], 3),
        "http_scorer_trivial_vs_inprocess": ratio("trivial"),
        "http_scorer_protocol_ms_per_image": round(1000 / median["trivial_http"] - 1000 / median["trivial_in"], 2),
        "http_scorer_per_round": {key: [round(v, 3) for v in values] for key, values in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; medians are reported")
    parser.add_argument("--size", choices=["small", "tiny"], default="small")
    parser.add_argument("--clip-only", action="store_true",
                        help="only CLIPScore/PickScore on tiny models (their keys updated in rewards.json)")
    parser.add_argument("--http-scorer-only", action="store_true",
                        help="only http_scorer_vs_inprocess (an http scorer vs the same function in-process); "
                             "its keys updated in rewards.json")
    parser.add_argument("--serve-http-scorer", type=int, metavar="PORT", help=argparse.SUPPRESS)  # its child process
    args = parser.parse_args()
    if args.serve_http_scorer:
        serve_http_scorer(args.serve_http_scorer, args.size)
        return
    if args.http_scorer_only or args.clip_only:  # one part: its keys replace theirs in rewards.json
        part = http_scorer_vs_inprocess(args.rounds, args.size) if args.http_scorer_only else \
            clip_family_images_per_s(args.rounds)
        label = "http_scorer" if args.http_scorer_only else "clip_family"
        part[f"{label}_load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        RESULTS.write_text(json.dumps({**saved, **part}, indent=2) + "\n")
        print(json.dumps(part, indent=2))
        return

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
        **clip_family_images_per_s(args.rounds),
        **http_scorer_vs_inprocess(args.rounds, args.size),
        "cpu_count": os.cpu_count(),
        "note": "shared 2-core machine, other jobs running (load 4-8): noisy; rates are medians over rounds, ratios medians of per-round ratios",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
