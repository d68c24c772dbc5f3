"""How long the step waited for each reward component: its requests' round trips, per step.

The trainer scores a step chunk by chunk, each chunk with one request per reward component
(rl/scoring/service.py `score_images`, every component at once). `ScoredImages.request_seconds` holds,
per component, the round trip of that chunk's request: from encoding the chunk's images to the
component's last answer, so a chunk split into several HTTP requests (the scorer's limits) and the
client's retries count in it, as the step waits for them. A component with none of the chunk's rows
(GenEval in an OCR chunk) sends nothing and has no entry. The step's metrics:

    reward_latency/<component>/p50, /p90, /p99, /max     seconds, over the step's requests to it

Percentiles are numpy's default, "linear": over the sorted x_0 <= ... <= x_{n-1},
p_q = x_i + f (x_{i+1} - x_i) with i + f = q (n - 1) / 100. A step sends one request a chunk, so with
few chunks p99 lies next to max (one request: all four are equal). The VLM judge example's own /stats
uses nearest-rank percentiles over the judge's single-image calls: another quantity.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rl.scoring.service import ScoredImages

PERCENTILES = (50, 90, 99)
PREFIX = "reward_latency"


def request_latencies(scored: Iterable[ScoredImages]) -> dict[str, list[float]]:
    """Component name -> the round-trip seconds of its requests over a step's chunks, in chunk order."""
    latencies: dict[str, list[float]] = {}
    for chunk in scored:
        for name, seconds in chunk.request_seconds.items():
            latencies.setdefault(name, []).append(seconds)
    return latencies


def reward_latency_metrics(latencies: dict[str, list[float]]) -> dict[str, float]:
    """reward_latency/<component>/p50, p90, p99 (numpy, linear) and max of each component's requests
    (seconds); nothing for a component that sent no request this step."""
    metrics: dict[str, float] = {}
    for name in sorted(latencies):
        seconds = np.asarray(latencies[name], dtype=np.float64)  # [requests]
        if seconds.size == 0:
            continue
        for q, value in zip(PERCENTILES, np.percentile(seconds, PERCENTILES)):
            metrics[f"{PREFIX}/{name}/p{q}"] = float(value)
        metrics[f"{PREFIX}/{name}/max"] = float(seconds.max())
    return metrics
