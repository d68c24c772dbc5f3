"""Scoring a step's images through the reward API, and starting that API inside the cluster.

The trainer talks to the reward service over the same REST API outside users call, whether the
service is a Ray Serve application it started or an external URL. Scoring runs as a Ray task per
chunk, so it starts as soon as that chunk's images exist (see rl/pipeline.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from pydantic import SecretStr

from rl.prompts import PromptItem
from rl.train_config import RewardsSection


@dataclass(frozen=True)
class RewardEndpoint:
    """Where and how to reach the reward API."""

    url: str
    token: str | None
    timeout_s: float
    """Per request."""
    outage_budget_s: float
    """How long a failing service is retried before scoring gives up (RewardServerError)."""
    backoff_s: float


@dataclass(frozen=True)
class SampleReward:
    """The reward of one sample and its breakdown."""

    reward: float
    """The scalar GRPO trains on."""
    task: str
    """"ocr" or "geneval"."""
    recognized: str = ""
    """OCR: the text read from the image."""
    geneval_correct: bool | None = None
    """GenEval: strict correctness under the official rules."""
    geneval_tag: str = ""
    """GenEval: the prompt's tag (single_object, counting, ...)."""

    def components(self) -> dict[str, float]:
        """Per-reward-function values, as the run store and the dashboard show them."""
        if self.task == "ocr":
            return {"ocr": self.reward}
        return {"geneval": self.reward, "geneval_correct": float(bool(self.geneval_correct))}


@dataclass(frozen=True)
class ScoredImages:
    """The rewards of a batch of images, and the failed attempts the client rode out on the way."""

    rewards: list[SampleReward]
    """Row for row."""
    failures: list[str]
    """Failed requests that were retried (5xx, connection errors): what the run's events record."""
    seconds: float


async def _score(endpoint: RewardEndpoint, images: np.ndarray, items: list[PromptItem]) -> ScoredImages:
    from rewards.client import RewardClient
    from rewards.geneval_rules import GenevalMetadata

    start = time.perf_counter()
    results: list[SampleReward | None] = [None] * len(items)
    ocr_rows = [i for i, item in enumerate(items) if item.task == "ocr"]
    geneval_rows = [i for i, item in enumerate(items) if item.task == "geneval"]
    async with RewardClient(
        endpoint.url, token=endpoint.token, timeout_s=endpoint.timeout_s, backoff_s=endpoint.backoff_s,
        retry_budget_s=endpoint.outage_budget_s,
    ) as client:
        if ocr_rows:
            scored = await client.ocr([images[i] for i in ocr_rows], prompts=[items[i].caption for i in ocr_rows])
            for row, result in zip(ocr_rows, scored):
                results[row] = SampleReward(result.reward, "ocr", recognized=result.recognized)
        if geneval_rows:
            metadata = [GenevalMetadata.model_validate_json(items[i].geneval_metadata) for i in geneval_rows]
            scored = await client.geneval([images[i] for i in geneval_rows], metadata)
            for row, result in zip(geneval_rows, scored):
                results[row] = SampleReward(result.reward, "geneval", geneval_correct=result.correct,
                                            geneval_tag=result.tag)
    if any(r is None for r in results):
        raise RuntimeError(f"the reward API answered {sum(r is not None for r in results)} of {len(items)} items")
    return ScoredImages(rewards=results, failures=list(client.failures), seconds=time.perf_counter() - start)


def score_images(endpoint: RewardEndpoint, images: np.ndarray, items: list[PromptItem]) -> ScoredImages:
    """Rewards of `images` [R, H, W, 3], row r scored against `items[r]`. Raises RewardServerError
    once the service has been failing for longer than `endpoint.outage_budget_s`."""
    if len(images) != len(items):
        raise ValueError(f"{len(images)} images for {len(items)} prompt items")
    return asyncio.run(_score(endpoint, images, items))


def start_reward_service(config: RewardsSection) -> RewardEndpoint:
    """The reward API for this run: a Ray Serve application started here, or the configured URL."""
    token = config.token
    if config.service == "url":
        url = config.url
    else:
        from ray import serve

        from rewards.local_server import free_port
        from rewards.serve import build_serve_app

        from ray.serve.context import _get_global_client

        serve.start(http_options={"host": "127.0.0.1", "port": config.port or free_port()})
        settings = config.server.model_copy(update={"token": SecretStr(token)} if token else {})
        serve.run(build_serve_app(settings, num_cpus=config.num_cpus), name="rewards", route_prefix="/")
        # Serve outlives a job: a cluster that already runs it keeps its own HTTP port, whatever
        # this call asked for, so the address comes from Serve itself
        http = _get_global_client().http_config
        url = f"http://127.0.0.1:{http.port}"
    return RewardEndpoint(url=url, token=token, timeout_s=config.timeout_s,
                          outage_budget_s=config.outage_budget_s, backoff_s=config.backoff_s)


def stop_reward_service(config: RewardsSection) -> None:
    if config.service == "serve":
        from ray import serve

        serve.delete("rewards")
