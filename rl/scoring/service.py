"""Scoring a step's images through the reward API, and starting that API inside the cluster.

The trainer talks to the reward service over the same REST API outside users call, whether the
service is a Ray Serve application it started or an external URL. Scoring runs as a Ray task per
chunk, so it starts as soon as that chunk's images exist (see rl/run/pipeline.py).

Before the first step the run checks the service against what it will send: every reward its
prompts need must be served, and its images must fit the service's request limits (a chunk bigger
than one request is split by the client). With service "serve" the limits are in the config, so
this is checked when the config loads; with "url" when the service first answers.

A step is scored by the run's reward mix (rl/scoring/reward_mix.py, `rewards.mix`): every component at
once, each through its own client, so each has its own retries and outage clock, and one that
fails names itself and leaves the others' requests alone. Task rewards (ocr, geneval) and generic
or python scorers go to the reward service; an http scorer is called at its own URL.

Edits: every generic, python and http scorer gets each edit row's source image and mask (`source_image`,
`mask`) and its metadata's `target` (edit_ocr reads `target.text`) and `requirement` (a judge's); scorers
that do not compare with a source ignore them. An edit has no task reward: its run's mix scores it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import numpy as np
from pydantic import SecretStr

from rewards.app.schemas import Limits
from rewards.scorer import EditSource, Region, parse_regions
from rl.prompts.edit import edit_source
from rl.prompts.sources import PromptItem
from rl.scoring.config import RewardsSection
from rl.scoring.reward_mix import RewardComponentConfig, resolve_mix


@dataclass(frozen=True)
class RewardEndpoint:
    """Where and how to reach the reward API, and every scorer the run's reward mix calls."""

    url: str
    token: str | None
    timeout_s: float
    """Per request."""
    outage_budget_s: float
    """How long a failing service is retried before scoring gives up (RewardServerError); each
    scorer of the mix has its own clock (and may have its own budget)."""
    backoff_s: float
    limits: Limits | None = None
    """The service's request limits (None: each client asks the service)."""
    mix: tuple[RewardComponentConfig, ...] = ()
    """The run's reward components (rl/scoring/reward_mix.py; empty: the task reward of each prompt). The
    training step scores them; an evaluation scores the task rewards only."""
    scorer_limits: dict[str, Limits] = field(default_factory=dict)
    """http components: name -> the limits the scorer declared (or its config's max_items)."""
    versions: dict[str, str] = field(default_factory=dict)
    """The service's scorer versions from its /readyz (for the routes that answer none: ocr, geneval)."""


@dataclass(frozen=True)
class SampleReward:
    """The reward of one sample and its breakdown."""

    reward: float
    """The task reward (OCR / GenEval) of the prompt; NaN when the run's mix does not score the task.
    GRPO trains on the mix's total (ScoredStep.reward_tensor), which is this without a mix."""
    task: str
    """"ocr", "geneval" or "edit" (the prompt's task)."""
    recognized: str = ""
    """OCR: the text read from the image."""
    geneval_correct: bool | None = None
    """GenEval: strict correctness under the official rules."""
    geneval_tag: str = ""
    """GenEval: the prompt's tag (single_object, counting, ...)."""
    scores: dict[str, float] = field(default_factory=dict)
    """Raw reward of every mix component that scored this row, by component name."""
    regions: dict[str, tuple[Region, ...]] = field(default_factory=dict)
    """The regions each component answered for this row (`details.regions`, spatial credit), by
    component name; absent for a component that answered none."""

    def component_rewards(self) -> dict[str, float]:
        """Per-component raw rewards (the task reward under the task's name for a row scored without a mix)."""
        return dict(self.scores) if self.scores else {self.task: self.reward}

    def components(self) -> dict[str, float]:
        """Per-reward-function values, as the run store and the dashboard show them."""
        values = self.component_rewards()
        if self.task == "geneval" and self.geneval_correct is not None:
            values["geneval_correct"] = float(bool(self.geneval_correct))
        return values


@dataclass(frozen=True)
class ScoredImages:
    """The rewards of a batch of images, and the failed attempts the client rode out on the way."""

    rewards: list[SampleReward]
    """Row for row."""
    failures: list[str]
    """Failed requests that were retried (5xx, connection errors): what the run's events record."""
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)
    """Component name -> version of the scorer that answered."""
    request_seconds: dict[str, float] = field(default_factory=dict)
    """Component name -> round-trip seconds of its request for these images, retries included (absent:
    none of the rows needed it); a step's percentiles: rl/scoring/latency.py."""


@dataclass
class _RowDetails:
    """What the task routes say besides the reward (filled by whichever task component scores the row)."""

    task_reward: float = math.nan
    recognized: str = ""
    geneval_correct: bool | None = None
    geneval_tag: str = ""
    regions: dict[str, tuple[Region, ...]] = field(default_factory=dict)
    """Component name -> its regions of the row (empty tuples are left out of SampleReward)."""


def _regions(component: RewardComponentConfig, raw) -> tuple[Region, ...]:
    """A result's `details.regions` (a list of RegionBody or of plain dicts) as Regions; an
    external scorer's malformed regions fail the step naming the component."""
    try:
        items = [r.model_dump() if hasattr(r, "model_dump") else r for r in raw] if isinstance(raw, list) else raw
        return tuple(parse_regions(items))
    except ValueError as error:
        raise ValueError(f"reward {component.name}: {error}") from None


async def _score_component(endpoint: RewardEndpoint, component: RewardComponentConfig, images: np.ndarray,
                           items: list[PromptItem], details: list[_RowDetails],
                           sources: list[EditSource | None]) -> tuple[list[float], str, list[str], float | None]:
    """One component's raw rewards of the rows (NaN where it does not apply), its scorer's version,
    the failed attempts its client rode out and its request's round-trip seconds (None: no row needed
    it); regions go to `details`. Its own client: its own retries and outage clock. `sources`: each
    row's source and mask (None: not an edit)."""
    from rewards.client import UNVERSIONED, RewardClient
    from rewards.geneval_rules import GenevalMetadata

    rows = [i for i, item in enumerate(items) if component.applies_to(item.task)]
    values = [math.nan] * len(items)
    if component.kind == "http":  # limits: learned at start (check_reward_service), else asked now
        limits = endpoint.scorer_limits.get(component.name) or await http_scorer_limits(endpoint, component)
        client = RewardClient(httpx_origin(component.url), token=component.token, timeout_s=endpoint.timeout_s,
                              backoff_s=endpoint.backoff_s, limits=limits,
                              retry_budget_s=component.outage_budget_s or endpoint.outage_budget_s)
    else:
        client = RewardClient(endpoint.url, token=endpoint.token, timeout_s=endpoint.timeout_s,
                              backoff_s=endpoint.backoff_s, limits=endpoint.limits,
                              retry_budget_s=component.outage_budget_s or endpoint.outage_budget_s)
    version = endpoint.versions.get(component.served_name or "", UNVERSIONED)
    async with client:
        if not rows:
            return values, version, [], None
        chosen = [images[i] for i in rows]
        started = time.perf_counter()  # what the step waits for: encoding, the request(s), retries
        if component.scorer == "ocr":
            for row, result in zip(rows, await client.ocr(chosen, prompts=[items[i].caption for i in rows])):
                values[row] = details[row].task_reward = result.reward
                details[row].recognized = result.recognized
                details[row].regions[component.name] = _regions(component, result.details.regions)
        elif component.scorer == "geneval":
            metadata = [GenevalMetadata.model_validate_json(items[i].geneval_metadata) for i in rows]
            for row, result in zip(rows, await client.geneval(chosen, metadata)):
                values[row] = details[row].task_reward = result.reward
                details[row].geneval_correct, details[row].geneval_tag = result.correct, result.tag
                details[row].regions[component.name] = _regions(component, result.details.regions)
        else:
            answer = await client.score(component.served_name or component.name, chosen,
                                        [items[i].caption for i in rows], [scorer_metadata(items[i]) for i in rows],
                                        url=component.url, sources=[sources[i] for i in rows])
            for row, result in zip(rows, answer.results):
                values[row] = result.reward
                details[row].regions[component.name] = _regions(component, result.details.get("regions"))
            version = answer.version
        seconds = time.perf_counter() - started
    return values, version, [f"{component.name}: {failure}" for failure in client.failures], seconds


def httpx_origin(url: str) -> str:
    """scheme://host[:port] of a URL: where an http scorer's /readyz is."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def scorer_metadata(item: PromptItem) -> dict:
    """What a generic scorer gets as an item's metadata: the prompt's task, its GenEval line, and for an
    edit its `target` (edit_ocr's text, edit_color's colour) and `requirement` (a judge's)."""
    import json

    metadata: dict = {"task": item.task}
    if item.geneval_metadata:
        metadata["geneval"] = json.loads(item.geneval_metadata)
    if item.edit is not None:
        metadata["target"] = item.edit.target
        if item.edit.requirement:
            metadata["requirement"] = item.edit.requirement
    return metadata


def row_sources(items: list[PromptItem]) -> list[EditSource | None]:
    """Each row's source image and mask (None: not an edit), each file read once (a group's rows share one)."""
    read: dict = {}
    for item in items:
        if item.edit is not None and item.edit not in read:
            read[item.edit] = edit_source(item.edit)
    return [read[item.edit] if item.edit is not None else None for item in items]


async def _score(endpoint: RewardEndpoint, images: np.ndarray, items: list[PromptItem],
                 components: tuple[RewardComponentConfig, ...], sources: list[EditSource | None]) -> ScoredImages:
    """Every component at once, each through its own client. A component that fails fails alone: the
    others' requests run to their end, and the error names only the scorers that failed."""
    from rewards.client import RewardRequestError, RewardServerError

    start = time.perf_counter()
    details = [_RowDetails() for _ in items]
    outcomes = await asyncio.gather(*(_score_component(endpoint, c, images, items, details, sources)
                                      for c in components), return_exceptions=True)
    failed = [(c, o) for c, o in zip(components, outcomes) if isinstance(o, BaseException)]
    outages = [(c, o) for c, o in failed if isinstance(o, RewardServerError)]
    if outages:  # the run stops on an outage: say which scorer, and only that one
        raise RewardServerError("; ".join(f"reward {c.name} ({c.scorer}): {o}" for c, o in outages))
    if failed:
        component, error = failed[0]
        if isinstance(error, RewardRequestError):
            raise RewardRequestError(error.status, error.code, f"reward {component.name}: {error.message}", error.item)
        raise error
    rewards = []
    for row, item in enumerate(items):
        scores = {c.name: values[row] for c, (values, *_) in zip(components, outcomes) if not math.isnan(values[row])}
        d = details[row]
        rewards.append(SampleReward(d.task_reward, item.task, recognized=d.recognized, geneval_correct=d.geneval_correct,
                                    geneval_tag=d.geneval_tag, scores=scores,
                                    regions={name: found for name, found in d.regions.items() if found}))
    return ScoredImages(rewards=rewards, failures=[f for _, _, failures, _ in outcomes for f in failures],
                        seconds=time.perf_counter() - start,
                        versions={c.name: version for c, (_, version, *_) in zip(components, outcomes)},
                        request_seconds={c.name: s for c, (*_, s) in zip(components, outcomes) if s is not None})


def score_images(endpoint: RewardEndpoint, images: np.ndarray, items: list[PromptItem],
                 mix: tuple[RewardComponentConfig, ...] = (), sources: list[EditSource | None] | None = None
                 ) -> ScoredImages:
    """Rewards of `images` [R, H, W, 3], row r scored against `items[r]`, by the components of `mix`
    (empty: the task reward of each prompt). `sources`: each row's source and mask (None: read from the
    edit items' files here). Raises RewardServerError once a scorer has been failing for longer than its
    outage budget."""
    if len(images) != len(items):
        raise ValueError(f"{len(images)} images for {len(items)} prompt items")
    if sources is not None and len(sources) != len(items):
        raise ValueError(f"{len(sources)} sources for {len(items)} prompt items")
    components = resolve_mix(mix, {item.task for item in items})
    return asyncio.run(_score(endpoint, images, items, components, row_sources(items) if sources is None else sources))


def start_reward_service(config: RewardsSection, resources: dict[str, float] | None = None) -> RewardEndpoint:
    """The reward API for this run: a Ray Serve application started here (`config.num_replicas`
    replicas of `num_cpus`/`num_gpus` and custom `resources` each), or the configured URL."""
    token = config.token
    if config.service == "url":
        url = config.url
    else:
        from ray import serve
        from ray.serve.context import _get_global_client

        from rewards.local_server import free_port
        from rewards.serve import build_serve_app

        serve.start(http_options={"host": "127.0.0.1", "port": config.port or free_port()})
        settings = config.server.model_copy(update={
            **({"token": SecretStr(token)} if token else {}),
            # the mix's python rewards are loaded inside the replicas, served under their names
            "python_scorers": {**config.server.python_scorers, **python_scorers(config)},
        })
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


def png_base64_bytes(height: int, width: int, channels: int) -> int:
    """An upper bound on a base64 PNG of this size: at most the raw rows plus deflate's stored-block
    overhead (5 bytes a 64 KiB block) and its chunk headers; base64 makes 4 bytes of every 3."""
    raw = height * (channels * width + 1)  # a filter byte a row
    png = raw + 5 * math.ceil(raw / 65535) + 1024
    return 4 * math.ceil(png / 3)


def max_item_bytes(height: int, width: int, source: tuple[int, int] | None = None) -> int:
    """An upper bound on one item's JSON size for an RGB image of this size; with the (height, width) of
    an edit's `source`, its RGB source image and its one-channel mask are counted too."""
    edit = png_base64_bytes(*source, 3) + png_base64_bytes(*source, 1) if source is not None else 0
    return png_base64_bytes(height, width, 3) + edit + TEXT_ALLOWANCE_BYTES


def python_scorers(config: RewardsSection) -> dict[str, str]:
    """The mix's python rewards: name -> "module:function", loaded inside the reward service."""
    return {c.name: c.function for c in config.mix or () if c.kind == "python"}


async def http_scorer_limits(endpoint: RewardEndpoint, component: RewardComponentConfig) -> Limits:
    """An http scorer's request limits: those of its /readyz, else its `max_items` and the reward
    server's default body and image limits. RewardServerError if it does not answer within its budget."""
    from rewards.app.settings import Settings
    from rewards.client import RewardClient

    default = Limits(max_items=component.max_items, max_body_bytes=Settings.model_fields["max_body_bytes"].default,
                     max_image_pixels=Settings.model_fields["max_image_pixels"].default)
    async with RewardClient(httpx_origin(component.url), token=component.token, timeout_s=endpoint.timeout_s,
                            backoff_s=endpoint.backoff_s,
                            retry_budget_s=component.outage_budget_s or endpoint.outage_budget_s) as client:
        return await client.scorer_limits(default)


def stop_reward_service(config: RewardsSection) -> None:
    if config.service == "serve":
        from ray import serve

        serve.delete("rewards")
