"""Whether the run's reward service can score this run: at config load (what the config alone
settles) and once the service answers (its scorers and request limits)."""

from __future__ import annotations

import asyncio
import dataclasses

from rewards.app.schemas import Limits
from rl.evaluation.config import eval_scorers
from rl.run.config import ConfigError, TrainConfig
from rl.scoring.reward_mix import TASK_SCORERS, RewardComponentConfig, resolve_mix, uncovered_tasks
from rl.scoring.service import RewardEndpoint, http_scorer_limits, max_item_bytes, python_scorers

SOURCE_TASKS = {"geneval": "geneval", "ocr": "ocr", "words": "ocr", "edit": "edit"}
"""The task of each prompt source kind's items (words are OCR prompts; edits are scored by the run's mix)."""


def prompt_tasks(config: TrainConfig) -> set[str]:
    """The tasks of the prompt sources."""
    return {SOURCE_TASKS[source.kind] for source in config.data.sources}


def largest_source(config: TrainConfig) -> tuple[int, int] | None:
    """(height, width) bounding every edit source image of the run (read from the files' headers), None
    without edit sources: each scoring request item carries its source and mask beside the output."""
    from rl.prompts.edit import image_size
    from rl.prompts.sources import load_source

    sizes = [image_size(item.edit.image, "image") for source in config.data.sources if source.kind == "edit"
             for item in load_source(source)]
    return (max(h for _, h in sizes), max(w for w, _ in sizes)) if sizes else None


def run_mix(config: TrainConfig) -> tuple[RewardComponentConfig, ...]:
    """The run's reward components: `rewards.mix`, or the task rewards of its prompts."""
    return resolve_mix(config.rewards.mix, prompt_tasks(config))


def required_scorers(config: TrainConfig) -> set[str]:
    """The reward service's scorers the run needs: the task rewards of its prompts that the mix
    scores, every generic and python scorer of the mix, and the in-run eval's bench."""
    evaluated = eval_scorers(config.eval)
    tasks = prompt_tasks(config)
    mixed = {c.served_name for c in run_mix(config) if c.kind != "http" and (c.kind != "task" or c.scorer in tasks)}
    return mixed | evaluated


def rows_fit(limits: Limits, image_shape: tuple[int, int], where: str, source: tuple[int, int] | None = None) -> None:
    """ConfigError unless one decoded image (with an edit's `source` of this (height, width) and its mask)
    can be sent to a service with these limits."""
    height, width = image_shape
    if height * width > limits.max_image_pixels:
        raise ConfigError(f"the decoder makes {width}x{height} images, more than the reward service's "
                          f"max_image_pixels ({limits.max_image_pixels}, {where})")
    if source is not None and source[0] * source[1] > limits.max_image_pixels:
        raise ConfigError(f"an edit source image is up to {source[1]}x{source[0]}, more than the reward service's "
                          f"max_image_pixels ({limits.max_image_pixels}, {where})")
    largest = max_item_bytes(height, width, source)
    if largest > limits.max_body_bytes:
        what = f"one {width}x{height} image" + (f" with its {source[1]}x{source[0]} source and mask" if source else "")
        raise ConfigError(f"{what} can take up to {largest} bytes in a request, more than the reward service's "
                          f"max_body_bytes ({limits.max_body_bytes}, {where})")


def _missing_scorers(config: TrainConfig, served: list[str], where: str) -> None:
    missing = sorted(required_scorers(config) - set(served))
    if not missing:
        return
    tasks = [name for name in missing if name in TASK_SCORERS]
    named = [name for name in missing if name not in TASK_SCORERS]
    needs = ([f"the prompts need the {', '.join(tasks)} reward"] if tasks else []) + \
            ([f"rewards.mix names the {', '.join(named)} scorer"] if named else [])
    raise ConfigError(f"{' and '.join(needs)}, but the reward service ({where}) runs only: "
                      f"{', '.join(sorted(served)) or 'none'}")


def check_mix(config: TrainConfig) -> None:
    """Every prompt gets a reward from the mix; with service "serve", its python rewards import."""
    uncovered = uncovered_tasks(run_mix(config), prompt_tasks(config))
    if "edit" in uncovered:  # task rewards score their own task only; an edit has none
        raise ConfigError("rewards.mix gives the edit prompts no reward: add an edit check (edit_ocr, edit_color or a "
                          "judge over http) and consistency; the ocr and geneval task rewards do not score edits")
    if uncovered:
        raise ConfigError(f"rewards.mix gives the {', '.join(uncovered)} prompts no reward: add their task reward "
                          f"(scorer: {uncovered[0]}) or a reward that scores every prompt")
    check_spatial_rewards(config)
    if config.rewards.service != "serve":
        return  # they run inside the external service, whose code this machine need not have
    from rewards.scorer import load_factory

    for name, spec in python_scorers(config.rewards).items():
        try:
            load_factory(spec)
        except ValueError as error:
            raise ConfigError(f"rewards.mix {name}: {error}") from None


def check_spatial_rewards(config: TrainConfig) -> None:
    """Spatial credit's `rewards` name rewards of the run's mix (a misspelt one would give no local signal)."""
    names = {c.name for c in run_mix(config)}
    spatials = {"learner.grpo.spatial": config.learner and config.learner.grpo.spatial,
                "diffusion_learner.flow.spatial": config.diffusion_learner and config.diffusion_learner.flow.spatial}
    for where, spatial in spatials.items():
        unknown = sorted(set(spatial.rewards or ()) - names) if spatial else []
        if unknown:
            raise ConfigError(f"{where}.rewards names {', '.join(unknown)}, no reward of the run's mix "
                              f"({', '.join(sorted(names))})")


def check_rows_fit_config(config: TrainConfig) -> None:
    """At load time, what the config alone settles: the mix scores every prompt; with service
    "serve" (the server settings are in the config) every needed scorer is configured and a
    decoded image fits one request."""
    check_mix(config)
    if config.rewards.service != "serve":
        return
    from rollout.decoder_worker import decoded_image_shape

    server = config.rewards.server
    served = [*server.scorers, *server.python_scorers, *python_scorers(config.rewards)]
    _missing_scorers(config, served, "rewards.server.scorers")
    limits = Limits(max_items=server.max_items, max_body_bytes=server.max_body_bytes,
                    max_image_pixels=server.max_image_pixels)
    rows_fit(limits, decoded_image_shape(config.decoder.decoder), "rewards.server", largest_source(config))


def check_reward_service(endpoint: RewardEndpoint, config: TrainConfig) -> RewardEndpoint:
    """Ask the running service which scorers it runs and what it accepts (waiting while it loads,
    up to the outage budget), and each http scorer of the mix for its limits; ConfigError if the
    run cannot be scored. Returns the endpoint with the mix, the limits and the service's scorer
    versions, so scoring never has to ask again."""
    from rewards.client import RewardClient, RewardServerError
    from rollout.decoder_worker import decoded_image_shape

    async def ask():
        async with RewardClient(endpoint.url, token=endpoint.token, timeout_s=endpoint.timeout_s,
                                backoff_s=endpoint.backoff_s, retry_budget_s=endpoint.outage_budget_s) as client:
            return await client.readiness()

    readiness = asyncio.run(ask())
    _missing_scorers(config, readiness.scorers, endpoint.url)
    shape, source = decoded_image_shape(config.decoder.decoder), largest_source(config)
    rows_fit(readiness.limits, shape, endpoint.url, source)
    mix = run_mix(config)
    scorer_limits = {}
    for component in (c for c in mix if c.kind == "http"):
        try:
            scorer_limits[component.name] = asyncio.run(http_scorer_limits(endpoint, component))
        except RewardServerError as error:
            raise ConfigError(f"reward {component.name}: the http scorer at {component.url} does not answer: "
                              f"{error}") from None
        rows_fit(scorer_limits[component.name], shape, component.url, source)
    return dataclasses.replace(endpoint, limits=readiness.limits, mix=mix, scorer_limits=scorer_limits,
                               versions=dict(readiness.versions))
