"""The edit bench of `blip3o-rl eval --bench edit`: what each edited image is scored by, and the summary.

    edit file (rl/prompts/edit_benchmarks.py: ours, ImgEdit, GEdit-Bench, PIE-Bench)
      -> rows (line p, sample s); the harness samples row (p, s) from the line's instruction and its
         source image (seed + p*N + s) and decodes it (rl/evaluation/harness.py)
      -> score_edits: every metric below through the reward API (the generic scorers of
         rewards/consistency.py, rewards/edit_checks.py, rewards/clip_score.py) and the judge
      -> EditMetrics per image (samples.jsonl), EditScores over the images and per category

Per image (None where the metric does not apply or is not configured):

    psnr, ssim, mse      PIE-Bench's background metrics outside the mask (lines with a mask): the
                         `consistency` scorer's details, PIE-Bench's definitions (rewards/consistency.py)
    clip_i               cos(E_I(output), E_I(source)): `consistency` without the mask (its CLIP-I)
    clip_t               cos(E_I(output), E_T(instruction))      }  `clipscore`'s details.cosine; our
    clip_t_caption       cos(E_I(output), E_T(target caption))   }  started server sets its prefix to ""
    edit_ocr, edit_color the programmatic checks of lines with target.text / target.color (copy guard
                         applied: a copy of the source scores 0); edit_ocr_exact = (edit_ocr == 1)
    copied               the copy guard fired (output ~ source inside the edit region)
    judge                an http scorer's reward (e.g. examples/vlm_judge), given the instruction, the
                         source image and the metadata training sends (task, target, requirement)

CLIP-T, stated: `clip_t_caption` is PIE-Bench's "CLIP similarity" (the whole edited image against
editing_prompt; PIE-Bench reports 100 * max(cos, 0), torchmetrics' CLIPScore) and MagicBrush's CLIP-T
(output against the target caption); `clip_t` is the same cosine against the instruction, the only
text ImgEdit and GEdit-Bench lines have. We report raw cosines. CLIP metrics are computed when the
reward API serves `clipscore` (its `consistency` must then have a CLIP too: `consistency.clip`).

Summaries are plain means over the images that have the metric (`MetricMean.images` says how many),
overall and per category, as PIE-Bench, ImgEdit and GEdit-Bench average per edit type.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rewards.app.schemas import Limits
from rewards.scorer import EditSource
from rl.prompts.edit_benchmarks import BenchEdit, EditFormat
from rl.prompts.sources import PromptItem
from rl.scoring.service import RewardEndpoint, httpx_origin, scorer_metadata

STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)
SUMMARY_METRICS = ("psnr", "ssim", "mse", "clip_i", "clip_t", "clip_t_caption", "edit_ocr", "edit_ocr_exact",
                   "edit_color", "copied", "judge")
"""The per-image metrics the summary averages, in the report's column order."""
JUDGE_LIMITS = Limits(max_items=16, max_body_bytes=64 * 1024 * 1024, max_image_pixels=4096 * 4096)
"""A judge that answers no /readyz limits gets requests of at most 16 items."""


class EditData(BaseModel):
    """Which edit file the edit bench evaluates, and how to read it."""

    model_config = STRICT

    path: Path
    """The file: our edit JSONL, ImgEdit's JSON, GEdit-Bench's parquet (or its folder), PIE-Bench's
    mapping_file.json."""
    format: EditFormat | None = None
    """None: told from the file (rl/prompts/edit_benchmarks.py `detect_format`)."""
    images: Path | None = None
    """ImgEdit's / PIE-Bench's source image folder (default: the file's folder / annotation_images/ beside it)."""
    language: Literal["en", "cn"] | None = "en"
    """GEdit-Bench: the instruction language evaluated (None: both)."""


class EditMetrics(BaseModel):
    """One edited image's numbers (module docstring); None = does not apply / not configured."""

    model_config = STRICT

    key: str
    """The benchmark's id of the line."""
    masked: bool
    """The line has a mask (psnr, ssim, mse are None only if it covers the whole image: no background)."""
    psnr: float | None = None
    ssim: float | None = None
    mse: float | None = None
    outside_fraction: float | None = None
    """Share of the pixels outside the mask (MSE / outside_fraction = the MSE per outside pixel)."""
    clip_i: float | None = None
    clip_t: float | None = None
    clip_t_caption: float | None = None
    edit_ocr: float | None = None
    edit_ocr_exact: bool | None = None
    recognized: str = ""
    """edit_ocr: the text read in the edit region."""
    edit_color: float | None = None
    copied: bool | None = None
    judge: float | None = None


class MetricMean(BaseModel):
    mean: float
    images: int


class EditSummary(BaseModel):
    images: int
    metrics: dict[str, MetricMean] = Field(default_factory=dict)
    """Metric name -> its mean over the images that have it (SUMMARY_METRICS order; absent: none has it)."""


class EditScores(BaseModel):
    overall: EditSummary
    categories: dict[str, EditSummary] = Field(default_factory=dict)
    """Per benchmark category (edit type), sorted by name; empty when the lines have none."""


@dataclass(frozen=True)
class EditScoring:
    """What scores the edit bench besides the reward API's consistency and edit checks."""

    clip: bool = False
    """CLIP-I and CLIP-T (the API serves clipscore, and consistency has a CLIP)."""
    judge_url: str | None = None
    """An http scorer (rewards/scorer.py protocol) answering the judge's score; None: no judge."""
    judge_token: str | None = None


# ---- the summary -------------------------------------------------------------------------------

def summarise(metrics: list[EditMetrics]) -> EditSummary:
    """Mean of each SUMMARY_METRICS value over the images that have it (booleans as 0/1)."""
    means = {}
    for name in SUMMARY_METRICS:
        values = [float(v) for m in metrics if (v := getattr(m, name)) is not None]
        if values:
            means[name] = MetricMean(mean=float(np.mean(values)), images=len(values))
    return EditSummary(images=len(metrics), metrics=means)


def edit_scores(rows: list[tuple[str, EditMetrics]]) -> EditScores:
    """(category, metrics) of every image -> the overall summary and one per category."""
    categories = sorted({category for category, _ in rows if category})
    return EditScores(overall=summarise([m for _, m in rows]),
                      categories={c: summarise([m for category, m in rows if category == c]) for c in categories})


def edit_markdown(scores: EditScores) -> str:
    """One row per category, then the overall row; a column per metric any image has (PSNR in dB)."""
    names = list(scores.overall.metrics)
    lines = ["| category | images | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]

    def row(label: str, summary: EditSummary) -> str:
        cells = []
        for name in names:
            mean = summary.metrics.get(name)
            cells.append("-" if mean is None else f"{mean.mean:.2f}" if name == "psnr" else f"{mean.mean:.4f}")
        return f"| {label} | {summary.images} | " + " | ".join(cells) + " |"

    lines += [row(category, summary) for category, summary in scores.categories.items()]
    lines.append(row("**overall**", scores.overall))
    return "\n".join(lines)


# ---- scoring -----------------------------------------------------------------------------------

def needed_scorers(lines: list[BenchEdit], clip: bool) -> list[str]:
    """The reward API's scorers an edit bench over `lines` calls: consistency (masks, CLIP-I), the edit
    checks of the targets the lines have, clipscore (CLIP-T) with `clip`."""
    targets = [line.record.target for line in lines]
    wanted = {"consistency": clip or any(line.record.mask is not None for line in lines),
              "edit_ocr": any("text" in target for target in targets),
              "edit_color": any("color" in target for target in targets), "clipscore": clip}
    return [name for name, used in wanted.items() if used]


def score_edits(endpoint: RewardEndpoint, images: np.ndarray, lines: list[BenchEdit], sources: list[EditSource],
                scoring: EditScoring) -> list[EditMetrics]:
    """The metrics of `images` [R, H, W, 3] (row r an edit of `lines[r]`, whose source and mask are
    `sources[r]`), every scorer's requests at once. Raises what the reward client raises."""
    if not len(images) == len(lines) == len(sources):
        raise ValueError(f"{len(images)} images for {len(lines)} lines and {len(sources)} sources")
    return asyncio.run(_score_edits(endpoint, list(images), lines, sources, scoring))


async def _score_edits(endpoint: RewardEndpoint, images: list[np.ndarray], lines: list[BenchEdit],
                       sources: list[EditSource], scoring: EditScoring) -> list[EditMetrics]:
    from rewards.client import RewardClient

    rows = [{"key": line.key, "masked": source.mask is not None} for line, source in zip(lines, sources)]
    instructions = [line.record.prompt for line in lines]
    # what training sends every generic scorer for an edit row: task, target, requirement (a judge's)
    metadatas = [scorer_metadata(PromptItem(line.record.prompt, "edit", edit=line.record)) for line in lines]
    service = RewardClient(endpoint.url, token=endpoint.token, timeout_s=endpoint.timeout_s,
                           backoff_s=endpoint.backoff_s, limits=endpoint.limits,
                           retry_budget_s=endpoint.outage_budget_s)
    judge = await judge_client(endpoint, scoring) if scoring.judge_url else None

    async def ask(client, scorer: str, chosen: list[int], texts: list[str] = instructions,
                  sent: list[EditSource | None] = sources, url: str | None = None):
        """One scorer's results for the rows `chosen` (nothing asked when none is): row i sent with
        texts[i] as its prompt and sent[i] as its source (the instruction and the source with its mask
        by default)."""
        if not chosen:
            return chosen, []
        answer = await client.score(scorer, pick(chosen, images), pick(chosen, texts), pick(chosen, metadatas),
                                    url=url, sources=pick(chosen, sent))
        return chosen, answer.results

    everyone = list(range(len(lines)))
    # a mask over the whole image leaves no background: no metric (PIE-Bench writes "nan" there)
    masked = [i for i in everyone if sources[i].mask is not None and not sources[i].mask.all()]
    with_text = [i for i in everyone if "text" in lines[i].record.target]
    with_color = [i for i in everyone if "color" in lines[i].record.target]
    with_caption = [i for i in everyone if lines[i].caption]

    jobs = {"background": ask(service, "consistency", masked), "edit_ocr": ask(service, "edit_ocr", with_text),
            "edit_color": ask(service, "edit_color", with_color)}
    if scoring.clip:
        unmasked = [EditSource(source.image) for source in sources]  # no mask: consistency answers CLIP-I
        unsent = [None] * len(lines)  # clipscore does not read sources: do not send them
        jobs["clip_i"] = ask(service, "consistency", everyone, sent=unmasked)
        jobs["clip_t"] = ask(service, "clipscore", everyone, sent=unsent)
        jobs["clip_t_caption"] = ask(service, "clipscore", with_caption, [line.caption for line in lines], unsent)
    if judge is not None:
        jobs["judge"] = ask(judge, "judge", everyone, url=scoring.judge_url)
    try:
        answers = dict(zip(jobs, await asyncio.gather(*jobs.values())))
    finally:
        await service.close()
        if judge is not None:
            await judge.close()
    for name, (chosen, results) in answers.items():
        for i, result in zip(chosen, results):
            fields = _fields(name, result.reward, result.details)
            if "copied" in fields:  # a line with a text and a colour target: copied if either check says so
                fields["copied"] = fields["copied"] or bool(rows[i].get("copied"))
            rows[i].update(fields)
    return [EditMetrics(**row) for row in rows]


def pick(chosen: list[int], values: list) -> list:
    """values[i] for i in chosen."""
    return [values[i] for i in chosen]


async def judge_client(endpoint: RewardEndpoint, scoring: EditScoring):
    """A client of the judge at `scoring.judge_url`, within the limits its /readyz declares (JUDGE_LIMITS
    when it answers none); retries and timeouts as the reward API's."""
    from rewards.client import RewardClient

    settings = {"token": scoring.judge_token, "timeout_s": endpoint.timeout_s, "backoff_s": endpoint.backoff_s,
                "retry_budget_s": endpoint.outage_budget_s}
    async with RewardClient(httpx_origin(scoring.judge_url), **settings) as probe:
        limits = await probe.scorer_limits(JUDGE_LIMITS)
    return RewardClient(httpx_origin(scoring.judge_url), limits=limits, **settings)


def _fields(job: str, reward: float, details: dict) -> dict:
    """What one scorer's answer for an image sets in its EditMetrics."""
    if job == "background":
        return {name: float(details[name]) for name in ("psnr", "ssim", "mse", "outside_fraction")}
    if job == "clip_i":
        return {"clip_i": float(details["clip_i"])}
    if job in ("clip_t", "clip_t_caption"):
        return {job: float(details["cosine"])}
    if job == "judge":
        return {"judge": _finite(reward, "the judge")}
    fields = {job: float(reward)}
    if job == "edit_ocr":
        fields |= {"edit_ocr_exact": reward == 1.0, "recognized": str(details.get("recognized", ""))}
    if "copied" in details:  # absent when the server's copy guard is off
        fields["copied"] = bool(details["copied"])
    return fields


def _finite(value: float, who: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{who} answered a non-finite score {value}")
    return float(value)
