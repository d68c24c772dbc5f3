"""The judge's latency as the trainer sees it: N single-image requests, one after another, to a
running judge scorer; prints the judge's own latency (details.judge_latency_s) and the scorer's
end-to-end latency, median and p90, with the machine's load average.

    python measure_latency.py http://127.0.0.1:9100 --requests 20 [--side 512] [--batch 1]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import time

import httpx
import numpy as np
from PIL import Image
from vlm_judge import percentiles


def png(seed: int, side: int) -> str:
    """A random-noise image (a different one per request, so no cache can answer)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the judge scorer's base URL (it answers POST /score)")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--side", type=int, default=256, help="image side in pixels")
    args = parser.parse_args()
    judge, wall = [], []
    with httpx.Client(base_url=args.url, timeout=600) as http:
        http.post("/score", json={"items": [{"image": png(10**6, args.side), "prompt": "warm-up"}]}).raise_for_status()
        for n in range(args.requests):
            items = [{"image": png(n * args.batch + i, args.side), "prompt": "a photo of a red apple"}
                     for i in range(args.batch)]
            started = time.perf_counter()
            answer = http.post("/score", json={"items": items})
            answer.raise_for_status()
            wall.append(time.perf_counter() - started)
            judge.extend(result["details"]["judge_latency_s"] for result in answer.json()["results"])
    seconds = {"judge_latency_s": judge, "scorer_request_s": wall}
    print(json.dumps({"requests": args.requests, "images_per_request": args.batch, "image_side": args.side,
                      **{name: {q: round(v, 4) for q, v in percentiles(values, (0.5, 0.9)).items()}
                         for name, values in seconds.items()},
                      "load_average": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
