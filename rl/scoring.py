"""Scoring a step's images through the reward API, and starting that API inside the cluster.

The trainer talks to the reward service over the same REST API outside users call, whether the
service is a Ray Serve application it started or an external URL. Scoring runs as a Ray task per
chunk, so it starts as soon as that chunk's images exist (see rl/pipeline.py).

Before the first step the run checks the service against what it will send: every reward its
prompts need must be served, and its images must fit the service's request limits (a chunk bigger
than one request is split by the client). With service "serve" the limits are in the config, so
this is checked when the config loads; with "url" when the service first answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
from pydantic import SecretStr

from rewards.app.schemas import Limits
from rl.prompts import PromptItem
from rl.train_config import ConfigError, RewardsSection, TrainConfig


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
    limits: Limits | None = None
    """The service's request limits (None: each client asks the service)."""


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
        retry_budget_s=endpoint.outage_budget_s, limits=endpoint.limits,
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


def start_reward_service(config: RewardsSection, resources: dict[str, float] | None = None) -> RewardEndpoint:
    """The reward API for this run: a Ray Serve application started here (`config.num_replicas`
    replicas of `num_cpus`/`num_gpus` and custom `resources` each), or the configured URL."""
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
        app = build_serve_app(settings, num_cpus=config.num_cpus, num_replicas=config.num_replicas,
                              num_gpus=config.num_gpus, resources=resources)
        serve.run(app, name="rewards", route_prefix="/")
        # Serve outlives a job: a cluster that already runs it keeps its own HTTP port, whatever
        # this call asked for, so the address comes from Serve itself
        http = _get_global_client().http_config
        url = f"http://127.0.0.1:{http.port}"
    return RewardEndpoint(url=url, token=token, timeout_s=config.timeout_s,
                          outage_budget_s=config.outage_budget_s, backoff_s=config.backoff_s)


TEXT_ALLOWANCE_BYTES = 64 * 1024
"""Room for an item's prompt or GenEval metadata in the size bound below (ours are a few hundred bytes)."""


def max_item_bytes(height: int, width: int) -> int:
    """An upper bound on one item's JSON size for an RGB image of this size: a PNG is at most the
    raw rows plus deflate's stored-block overhead (5 bytes a 64 KiB block) and its chunk headers;
    base64 makes 4 bytes of every 3."""
    raw = height * (3 * width + 1)  # a filter byte a row
    png = raw + 5 * math.ceil(raw / 65535) + 1024
    return 4 * math.ceil(png / 3) + TEXT_ALLOWANCE_BYTES


def required_scorers(config: TrainConfig) -> set[str]:
    """The reward service's scorers the prompt sources need (words are OCR prompts)."""
    return {"geneval" if source.kind == "geneval" else "ocr" for source in config.data.sources}


def rows_fit(limits: Limits, image_shape: tuple[int, int], where: str) -> None:
    """ConfigError unless one decoded image can be sent to a service with these limits."""
    height, width = image_shape
    if height * width > limits.max_image_pixels:
        raise ConfigError(f"the decoder makes {width}x{height} images, more than the reward service's "
                          f"max_image_pixels ({limits.max_image_pixels}, {where})")
    if max_item_bytes(height, width) > limits.max_body_bytes:
        raise ConfigError(f"one {width}x{height} image can take up to {max_item_bytes(height, width)} bytes in a "
                          f"request, more than the reward service's max_body_bytes ({limits.max_body_bytes}, {where})")


def _missing_scorers(config: TrainConfig, served: list[str], where: str) -> None:
    missing = sorted(required_scorers(config) - set(served))
    if missing:
        raise ConfigError(f"the prompts need the {', '.join(missing)} reward, but the reward service ({where}) runs "
                          f"only: {', '.join(sorted(served)) or 'none'}")


def check_rows_fit_config(config: TrainConfig) -> None:
    """At load time, what the config alone settles (service "serve": the server settings are in
    it): every needed scorer is configured and a decoded image fits one request."""
    if config.rewards.service != "serve":
        return
    from rollout.decoder_worker import decoded_image_shape

    server = config.rewards.server
    _missing_scorers(config, list(server.scorers), "rewards.server.scorers")
    limits = Limits(max_items=server.max_items, max_body_bytes=server.max_body_bytes,
                    max_image_pixels=server.max_image_pixels)
    rows_fit(limits, decoded_image_shape(config.decoder.decoder), "rewards.server")


def check_reward_service(endpoint: RewardEndpoint, config: TrainConfig) -> RewardEndpoint:
    """Ask the running service which scorers it runs and what it accepts (waiting while it loads,
    up to the outage budget); ConfigError if the run cannot be scored by it. Returns the endpoint
    with the service's limits, so scoring never has to ask again."""
    from rewards.client import RewardClient
    from rollout.decoder_worker import decoded_image_shape

    async def ask():
        async with RewardClient(endpoint.url, token=endpoint.token, timeout_s=endpoint.timeout_s,
                                backoff_s=endpoint.backoff_s, retry_budget_s=endpoint.outage_budget_s) as client:
            return await client.readiness()

    readiness = asyncio.run(ask())
    _missing_scorers(config, readiness.scorers, endpoint.url)
    rows_fit(readiness.limits, decoded_image_shape(config.decoder.decoder), endpoint.url)
    return dataclasses.replace(endpoint, limits=readiness.limits)


def stop_reward_service(config: RewardsSection) -> None:
    if config.service == "serve":
        from ray import serve

        serve.delete("rewards")
