"""Benchmark evaluation of a policy through the workers and reward API that training uses.

    evaluation prompts (rl/prompts/data/eval/)  ->  rows (prompt p, sample s), N samples a prompt
      -> chunks of consecutive rows -> workers.generate (row seed = seed + p*N + s)
      -> workers.decode (the same row seeds) -> rl.scoring.service.score_images (the reward REST API)
      -> images/*.png, then samples.jsonl (one line an image, appended after each chunk)
    -> scores: GenEval accuracy per tag and overall = mean of the tag accuracies (the official
       summary); OCR mean reward and exact-match rate (reward == 1)

The edit bench (rl/evaluation/edit_bench.py) runs the same loop over the lines of an edit file: each
row's source image goes to `workers.generate` with its instruction, and the edited image is scored
by `edit_bench.score_edits` (background metrics under the mask, CLIP-I / CLIP-T, the edit checks,
a judge) instead of `score_images`: those metrics are the scorers' details, which the training
path's rewards do not carry.

`evaluate` takes workers that are already running (`LocalWorkers` in this process, as the
`blip3o-rl eval` command uses; `ActorWorkers` wraps the trainer's Ray actors), a reward endpoint
and an `EvalSpec`, and returns an `EvalReport`. There is no second sampling or scoring path.

Reproducible: a row's rollout and decoder seeds depend only on (seed, prompt index in the file,
sample index, N), not on chunking, `limit` or where a resumed eval restarted. Resumable: with a
`SampleStore`, rows whose result line is on disk are not redone; a torn last line (a kill mid-write)
is dropped and redone.

Deviation from GenEval's scripts: with `limit`, the prompts are the first ones of each tag, spread
over the six tags (the file is grouped by tag), so the mean of the tag accuracies stays meaningful
on a subset. The full set is the official protocol.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import ray
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rl.evaluation.edit_bench import (
    EditData,
    EditMetrics,
    EditScores,
    EditScoring,
    edit_markdown,
    edit_scores,
    score_edits,
)
from rl.prompts.edit import edit_source
from rl.prompts.edit_benchmarks import BenchEdit, load_edit_benchmark
from rl.prompts.sources import BENCH_PROMPTS, PromptItem, benchmark_prompts
from rl.scoring.service import RewardEndpoint, score_images
from rollout.config import SamplingConfig
from rollout.records import DecodedImages, RolloutBatch

if TYPE_CHECKING:  # vLLM is imported only where a worker is built
    from rollout.ar_worker import ARRolloutWorker
    from rollout.decoder_worker import DiffusionDecoderWorker

Bench = Literal["geneval", "ocr", "edit"]
DEFAULT_IMAGES_PER_PROMPT = {"geneval": 4, "ocr": 1, "edit": 1}
"""GenEval's protocol samples 4 images a prompt; Flow-GRPO's OCR test and the edit benchmarks one."""
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class EvalMismatchError(ValueError):
    """The results directory holds an eval with other settings: resuming would mix two evals."""


class EvalSpec(BaseModel):
    """What to evaluate and how; everything that decides the numbers is recorded with them."""

    model_config = STRICT

    bench: Bench
    model: str
    """What is evaluated, as the caller names it (model dir, checkpoint, version): recorded, and a
    resumed eval must name the same."""
    images_per_prompt: int | None = Field(None, ge=1)
    """N samples a prompt; None = the bench's default (GenEval 4, OCR 1)."""
    limit: int | None = Field(None, ge=1)
    """Evaluate only this many prompts (spread over the GenEval tags; edit: the first lines); None = the whole set."""
    seed: int = Field(0, ge=0)
    """Row (p, s) is sampled and decoded with seed + p*N + s."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Temperature / top-k / top-p; unset fields take the model's generation defaults."""
    chunk_images: int = Field(16, ge=1)
    """Rows per generate / decode / score call; results are committed to disk after each chunk."""
    prompt_file: Path | None = None
    """Another prompt file in the bench's format (None = the benchmark's own; not for edit)."""
    edit_data: EditData | None = None
    """The edit bench's file and its format (required for bench edit, refused for the others)."""

    @model_validator(mode="after")
    def _edit_data(self) -> EvalSpec:
        if (self.bench == "edit") != (self.edit_data is not None):
            raise ValueError("bench edit needs edit_data (--data FILE), and only bench edit takes it")
        if self.bench == "edit" and self.prompt_file is not None:
            raise ValueError("bench edit reads its lines from edit_data (--data), not from a prompt file")
        return self

    @property
    def n(self) -> int:
        return self.images_per_prompt or DEFAULT_IMAGES_PER_PROMPT[self.bench]

    def identity(self, policy_version: int) -> dict:
        """What must match for stored results to be reused (chunking and limit do not change a row)."""
        prompts = str(self.prompt_file or BENCH_PROMPTS[self.bench]) if self.bench != "edit" else None
        return {"bench": self.bench, "model": self.model, "policy_version": policy_version,
                "images_per_prompt": self.n, "seed": self.seed, "sampling": self.sampling.model_dump(),
                "prompt_file": prompts,
                "edit_data": self.edit_data.model_dump(mode="json") if self.edit_data else None}


class SampleResult(BaseModel):
    """One evaluated image: a line of samples.jsonl."""

    model_config = STRICT

    prompt_index: int
    """Line of the prompt in the prompt file (0-based, blank lines skipped)."""
    sample_index: int
    seed: int
    """Rollout and decoder seed of this row."""
    prompt: str
    tag: str = ""
    """GenEval tag; edit: the line's category ("" for OCR)."""
    reward: float | None
    """GenEval: the graded reward; OCR: Flow-GRPO's OCR reward; edit: None (its numbers are in `edit`)."""
    correct: bool | None = None
    """GenEval strict correctness (official rules); None for OCR."""
    recognized: str = ""
    """OCR: the text read from the image."""
    image: str = ""
    """PNG path relative to the results directory ("" when images are not kept)."""
    policy_version: int
    edit: EditMetrics | None = None
    """Edit bench: the image's metrics (rl/evaluation/edit_bench.py)."""


class TagScore(BaseModel):
    images: int
    correct: int
    accuracy: float


class GenevalScores(BaseModel):
    tags: dict[str, TagScore]
    """Per tag present, in GenEval's order."""
    overall: float
    """Mean of the tag accuracies (the GenEval score; over the tags present when `limit` cut some)."""
    missing_tags: list[str]
    image_accuracy: float
    """Correct images / all images (not the benchmark score: tags have different sizes)."""
    mean_reward: float


class OcrScores(BaseModel):
    images: int
    mean_reward: float
    exact_match: float
    """Share of images with reward 1 (the target is fully in the recognised text)."""


class EvalReport(BaseModel):
    bench: Bench
    spec: EvalSpec
    policy_version: int
    prompts: int
    images: int
    images_per_prompt: int
    sampling: dict
    """Temperature and the top-k / top-p in force (the model's defaults where the spec left them
    unset; when every row came from disk, the spec's settings, None = the model's defaults)."""
    geneval: GenevalScores | None = None
    ocr: OcrScores | None = None
    edit: EditScores | None = None
    new_images: int
    """Images made by this call (the rest were on disk from an interrupted eval)."""
    seconds: float
    images_per_s: float
    """New images / seconds."""
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    """Where this call's time went: generate, decode, score, write."""

    def markdown(self) -> str:
        return markdown_table(self)


# ---- the numbers -------------------------------------------------------------------------------

def geneval_scores(samples: list[SampleResult]) -> GenevalScores:
    """Per-tag accuracy (correct / images of the tag) and their mean, GenEval's summary score."""
    tags: dict[str, TagScore] = {}
    for tag in [*GENEVAL_TAGS, *sorted({s.tag for s in samples} - set(GENEVAL_TAGS))]:
        rows = [s for s in samples if s.tag == tag]
        if rows:
            correct = sum(bool(s.correct) for s in rows)
            tags[tag] = TagScore(images=len(rows), correct=correct, accuracy=correct / len(rows))
    return GenevalScores(
        tags=tags,
        overall=float(np.mean([t.accuracy for t in tags.values()])),
        missing_tags=[t for t in GENEVAL_TAGS if t not in tags],
        image_accuracy=sum(bool(s.correct) for s in samples) / len(samples),
        mean_reward=float(np.mean([s.reward for s in samples])),
    )


def ocr_scores(samples: list[SampleResult]) -> OcrScores:
    """Mean Flow-GRPO OCR reward and the share of images with reward exactly 1."""
    return OcrScores(images=len(samples), mean_reward=float(np.mean([s.reward for s in samples])),
                     exact_match=sum(s.reward == 1.0 for s in samples) / len(samples))


def markdown_table(report: EvalReport) -> str:
    head = (f"{report.bench} eval of {report.spec.model}: {report.prompts} prompts x {report.images_per_prompt} "
            f"images, seed {report.spec.seed}, policy v{report.policy_version}\n\n")
    if report.geneval is not None:
        lines = ["| tag | images | correct | accuracy |", "|---|---:|---:|---:|"]
        lines += [f"| {tag} | {t.images} | {t.correct} | {t.accuracy:.4f} |" for tag, t in report.geneval.tags.items()]
        tags = len(report.geneval.tags)
        lines.append(f"| **overall** (mean of {tags} tag{'s' if tags > 1 else ''}) | {report.images} | "
                     f"{sum(t.correct for t in report.geneval.tags.values())} | **{report.geneval.overall:.4f}** |")
        if report.geneval.missing_tags:
            lines.append(f"\nnot evaluated (limit): {', '.join(report.geneval.missing_tags)}")
        return head + "\n".join(lines)
    if report.edit is not None:
        return head + edit_markdown(report.edit)
    ocr = report.ocr
    return head + "\n".join(["| images | mean reward | exact match |", "|---:|---:|---:|",
                             f"| {ocr.images} | {ocr.mean_reward:.4f} | {ocr.exact_match:.4f} |"])


# ---- prompts and rows ----------------------------------------------------------------------------

def eval_prompts(spec: EvalSpec) -> list[tuple[int, PromptItem]]:
    """(index in the file, prompt) of the prompts to evaluate, in file order (GenEval, OCR)."""
    return benchmark_prompts(spec.bench, spec.limit, spec.prompt_file)


def edit_lines(spec: EvalSpec, work_dir: Path) -> list[tuple[int, BenchEdit]]:
    """(index in the file, line) of the edit file's lines to evaluate: the first `limit`, in file
    order; what the file embeds or encodes (GEdit's images, PIE-Bench's masks) is written to `work_dir`."""
    data = spec.edit_data
    lines = load_edit_benchmark(data.path, data.format, work_dir, data.images, data.language)
    return list(enumerate(lines))[: spec.limit]


def row_chunks(rows: list[int], size: int) -> list[list[int]]:
    """Split sorted global row numbers into runs of consecutive rows of at most `size`: one
    generate call samples a run with seeds seed + first, seed + first + 1, ... (row r's own seed)."""
    chunks: list[list[int]] = []
    for row in rows:
        if chunks and row == chunks[-1][-1] + 1 and len(chunks[-1]) < size:
            chunks[-1].append(row)
        else:
            chunks.append([row])
    return chunks


# ---- workers -----------------------------------------------------------------------------------

class EvalWorkers(Protocol):
    """What the harness needs from running workers."""

    def served_version(self) -> int: ...

    def generate(self, captions: list[str], group_size: int, seed: int, sampling: SamplingConfig,
                 sources: list[np.ndarray] | None = None) -> RolloutBatch:
        """`sources[i]`: caption i's source image, uint8 [H, W, 3] (edits); None: text-to-image."""

    def decode(self, batch: RolloutBatch, seed: int) -> DecodedImages: ...


@dataclass
class LocalWorkers:
    """An `ARRolloutWorker` and a `DiffusionDecoderWorker` in this process."""

    rollout: ARRolloutWorker
    decoder: DiffusionDecoderWorker

    def served_version(self) -> int:
        return _same_version(self.rollout.served_version(), self.decoder.served_version())

    def generate(self, captions, group_size, seed, sampling, sources=None) -> RolloutBatch:
        return self.rollout.generate(captions, group_size, seed, sampling, **_edit_sources(sources))

    def decode(self, batch, seed) -> DecodedImages:
        return self.decoder.decode(batch, seed)


@dataclass
class ActorWorkers:
    """One `ARRolloutActor` and one `DiffusionDecoderActor` (the trainer's), called and awaited.
    Evaluate between steps: a weight publish during the eval is refused by the version checks."""

    rollout: ray.actor.ActorHandle
    decoder: ray.actor.ActorHandle
    timeout_s: float = 600.0

    def served_version(self) -> int:
        served = ray.get([self.rollout.served_version.remote(), self.decoder.served_version.remote()],
                         timeout=self.timeout_s)
        return _same_version(*served)

    def generate(self, captions, group_size, seed, sampling, sources=None) -> RolloutBatch:
        call = self.rollout.generate.remote(captions, group_size, seed, sampling, **_edit_sources(sources))
        return ray.get(call, timeout=self.timeout_s)

    def decode(self, batch, seed) -> DecodedImages:
        return ray.get(self.decoder.decode.remote(batch, seed), timeout=self.timeout_s)


def _edit_sources(sources: list[np.ndarray] | None) -> dict:
    """generate's keyword for an edit's source images; text-to-image calls pass nothing, as before."""
    return {"sources": sources} if sources is not None else {}


def _same_version(rollout: int, decoder: int) -> int:
    if rollout != decoder:
        raise RuntimeError(f"the rollout worker serves v{rollout} and the decoder v{decoder}: load one version into both")
    return rollout


# ---- results on disk ---------------------------------------------------------------------------

class SampleStore:
    """<dir>/spec.json (what was evaluated), <dir>/samples.jsonl (a line an image, appended per
    chunk after its PNGs are in place), <dir>/images/p{prompt}-s{sample}.png."""

    def __init__(self, directory: str | Path):
        self.root = Path(directory)
        self.samples_path = self.root / "samples.jsonl"
        self.spec_path = self.root / "spec.json"

    def open(self, identity: dict) -> dict[tuple[int, int], SampleResult]:
        """Results already on disk for this eval. EvalMismatchError if the directory holds another eval."""
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        if self.spec_path.is_file():
            stored = json.loads(self.spec_path.read_text())
            differs = sorted(k for k in identity.keys() | stored.keys() if identity.get(k) != stored.get(k))
            if differs:
                details = "; ".join(f"{k}: {stored.get(k)!r} on disk, {identity.get(k)!r} now" for k in differs)
                raise EvalMismatchError(f"{self.root} holds an eval with other settings ({details}); "
                                        "give another --out or delete that directory")
        else:
            _write_atomic(self.spec_path, json.dumps(identity, indent=2).encode())
        done: dict[tuple[int, int], SampleResult] = {}
        good_lines = []
        if self.samples_path.is_file():
            for line in self.samples_path.read_text().splitlines():
                try:
                    sample = SampleResult.model_validate_json(line)
                except ValueError:
                    continue  # a line torn by a kill mid-write: that row is redone
                if sample.image and not (self.root / sample.image).is_file():
                    continue
                done.setdefault((sample.prompt_index, sample.sample_index), sample)
                good_lines.append(line)
            # rewrite without torn lines, so appended lines never continue a partial one
            _write_atomic(self.samples_path, "".join(f"{line}\n" for line in good_lines).encode())
        return done

    def image_name(self, prompt_index: int, sample_index: int) -> str:
        return f"images/p{prompt_index:05d}-s{sample_index:03d}.png"

    def write(self, samples: list[SampleResult], images: np.ndarray) -> None:
        """PNGs first (each renamed into place), then their lines: a line never names a missing image."""
        for sample, image in zip(samples, images, strict=True):
            path = self.root / sample.image
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(image).save(tmp)
            os.replace(tmp, path)
        with self.samples_path.open("a") as handle:
            handle.write("".join(s.model_dump_json() + "\n" for s in samples))
            handle.flush()
            os.fsync(handle.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- the loop ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalProgress:
    done: int
    """Images with a result (including those found on disk)."""
    total: int
    new: int
    """Images made by this call so far."""
    seconds: float


def _run_chunk(workers: EvalWorkers, endpoint: RewardEndpoint, spec: EvalSpec, items: list[PromptItem], seed: int,
               version: int, stages: dict[str, float], edits: list[BenchEdit],
               scoring: EditScoring) -> tuple[RolloutBatch, np.ndarray, list]:
    """Sample, decode and score consecutive rows (row r of the chunk with seed + r); adds the
    seconds of each stage to `stages`. Edit rows (`edits`, one per item) are sampled from their
    source images and scored by `score_edits` (EditMetrics), the others by `score_images` (SampleReward)."""
    clock = time.perf_counter()
    sources = [edit_source(item.edit) for item in items] if edits else None
    batch = workers.generate([item.caption for item in items], 1, seed, spec.sampling,
                             [source.image for source in sources] if sources else None)
    if batch.policy_version != version:
        raise RuntimeError(f"the rollout worker changed from v{version} to v{batch.policy_version} during the eval")
    stages["generate"] += time.perf_counter() - clock
    clock = time.perf_counter()
    images = workers.decode(batch, seed).images  # [R, H, W, 3] uint8
    stages["decode"] += time.perf_counter() - clock
    clock = time.perf_counter()
    if sources:
        scores = score_edits(endpoint, images, edits, sources, scoring)
    else:
        scores = score_images(endpoint, images, items).rewards
    stages["score"] += time.perf_counter() - clock
    return batch, images, scores


def _sample(spec: EvalSpec, row: int, item: PromptItem, score, image: str, version: int,
            edit: BenchEdit | None) -> SampleResult:
    """The result line of global row `row` from its score (an EditMetrics for an edit, else a SampleReward)."""
    p, s = divmod(row, spec.n)
    common = {"prompt_index": p, "sample_index": s, "seed": spec.seed + row, "prompt": item.caption, "image": image,
              "policy_version": version}
    if edit is not None:
        return SampleResult(**common, tag=edit.category, reward=None, edit=score)
    return SampleResult(**common, tag=score.geneval_tag, reward=score.reward, recognized=score.recognized,
                        correct=score.geneval_correct if spec.bench == "geneval" else None)


def evaluate(workers: EvalWorkers, endpoint: RewardEndpoint, spec: EvalSpec, store: SampleStore | None = None,
             progress: Callable[[EvalProgress], None] | None = None,
             edit_scoring: EditScoring | None = None) -> EvalReport:
    """Sample, decode and score every (prompt, sample) row of `spec` not already in `store`, then
    aggregate all rows. `progress` is called after every committed chunk. The edit bench needs a
    `store` (its files go under store.root/data/) and is scored as `edit_scoring` says (None: the
    reward API's consistency and edit checks only)."""
    start = time.perf_counter()
    n = spec.n
    version = workers.served_version()
    if spec.bench == "edit" and store is None:
        raise ValueError("the edit bench writes the files its benchmark embeds under the results: "
                         "give it a SampleStore")
    done = store.open(spec.identity(version)) if store else {}
    lines = dict(edit_lines(spec, store.root / "data")) if spec.bench == "edit" else {}
    prompts = ({p: PromptItem(line.record.prompt, "edit", edit=line.record) for p, line in lines.items()} if lines
               else dict(eval_prompts(spec)))
    rows = [p * n + s for p in prompts for s in range(n)]  # global row numbers: seed offsets
    pending = [row for row in rows if divmod(row, n) not in done]
    new = 0
    sampling_used: dict = {}
    if progress:
        progress(EvalProgress(len(rows) - len(pending), len(rows), 0, 0.0))
    stages = dict.fromkeys(("generate", "decode", "score", "write"), 0.0)
    for chunk in row_chunks(pending, spec.chunk_images):
        items = [prompts[row // n] for row in chunk]
        edits = [lines[row // n] for row in chunk] if lines else []
        batch, images, scores = _run_chunk(workers, endpoint, spec, items, spec.seed + chunk[0], version, stages,
                                           edits, edit_scoring or EditScoring())
        clock = time.perf_counter()
        samples = [_sample(spec, row, item, score, store.image_name(*divmod(row, n)) if store else "", version,
                           lines.get(row // n)) for row, item, score in zip(chunk, items, scores, strict=True)]
        if store:
            store.write(samples, images)
        stages["write"] += time.perf_counter() - clock
        done.update({(s.prompt_index, s.sample_index): s for s in samples})
        new += len(samples)
        sampling_used = {"temperature": batch.temperature, "top_k": batch.truncation.top_k,
                         "top_p": batch.truncation.top_p}
        if progress:
            progress(EvalProgress(len(rows) - len(pending) + new, len(rows), new, time.perf_counter() - start))
    results = [done[divmod(row, n)] for row in rows]
    seconds = time.perf_counter() - start
    return EvalReport(
        bench=spec.bench, spec=spec, policy_version=version, prompts=len(prompts), images=len(results),
        images_per_prompt=n, sampling=sampling_used or spec.sampling.model_dump(),
        geneval=geneval_scores(results) if spec.bench == "geneval" else None,
        ocr=ocr_scores(results) if spec.bench == "ocr" else None,
        edit=edit_scores([(r.tag, r.edit) for r in results]) if spec.bench == "edit" else None,
        new_images=new, seconds=seconds, images_per_s=new / seconds if seconds > 0 else 0.0, stage_seconds=stages,
    )
