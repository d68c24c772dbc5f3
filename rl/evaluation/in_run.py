"""In-run evaluation: the current policy scored on a benchmark's evaluation prompts during training.

    config `eval: {every: K, bench: geneval|ocr|edit, prompts: N, images_per_prompt: M, seed: S}`
    (bench edit: `edit_data: {path, format}`, and `synthetic_edits` to have the run write a synthetic set)
    after steps K, 2K, ... and the last one (Trainer._evaluate, rl/run/trainer.py):
      -> rl.evaluation.harness.evaluate over the run's first rollout and decoder actors (ActorWorkers) and its
         reward endpoint: the harness of `blip3o-rl eval`, no second sampling or scoring path
      -> per-image results in <runs_dir>/<run_id>/eval/step-NNNNNNN/ (spec.json, samples.jsonl, images/)
      -> metrics at that step: eval/<bench>/score, eval/ocr/exact | eval/geneval/<tag> | eval/edit/<metric>,
         time/eval;
         the first image of each prompt in the eval gallery
      -> a score above the best so far: that step's checkpoint is saved and pinned (best.json,
         `keep_if_best`)

Why training is left exactly as it was: the eval reads its own prompt file (never the training
sampler), samples every image with its own seed (S + p*M + s, the same at every eval, so successive
evals differ only by the weights), and runs between steps, when no rollout is in flight and no
publish can land. vLLM seeds each request, so the eval's requests change no generator a training
request draws from. In the async schedule an eval step does not overlap the next step's sampling
(like a checkpoint step), so a best-eval checkpoint never has rollouts in flight.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rl.checkpoint import CheckpointDir
from rl.evaluation.harness import (
    EvalProgress,
    EvalReport,
    EvalSpec,
    EvalWorkers,
    SampleResult,
    SampleStore,
    evaluate,
)
from rl.run_store import SampleRecord
from rl.scoring.service import RewardEndpoint
from rollout.config import SamplingConfig

if TYPE_CHECKING:
    from rl.evaluation.config import EvalSection


EDIT_SCORES = ("edit_ocr", "edit_color", "judge")
"""An edit eval's score: the mean of the first of these edit checks its images have (the background
metrics reward copying the source, so none of them can pick the best checkpoint)."""


class EditScoreMissing(ValueError):
    """An edit eval whose images have no edit check to score them by."""


def eval_spec(section: EvalSection, model: str, sampling: SamplingConfig | None = None,
              chunk_images: int = 16) -> EvalSpec:
    """The `rl.evaluation.harness` spec of one in-run eval (`sampling` None: the model's defaults)."""
    return EvalSpec(bench=section.bench, model=model, images_per_prompt=section.images_per_prompt,
                    limit=section.prompts, seed=section.seed, sampling=sampling or SamplingConfig(),
                    chunk_images=chunk_images, edit_data=section.edit_data)


def eval_score(report: EvalReport) -> float:
    """The number best-eval compares (higher is better): GenEval overall, OCR mean reward, the edit check's mean."""
    if report.edit is not None:
        means = report.edit.overall.metrics
        name = next((name for name in EDIT_SCORES if name in means), None)
        if name is None:
            raise EditScoreMissing(f"the edit eval's images have none of the edit checks {list(EDIT_SCORES)} to be "
                                   "scored by: give its lines a target (text or color)")
        return means[name].mean
    return report.geneval.overall if report.geneval is not None else report.ocr.mean_reward


def eval_metrics(report: EvalReport) -> dict[str, float]:
    """The run store's keys: eval/<bench>/score, then GenEval's per-tag accuracies, OCR's exact-match
    share, or every mean of the edit summary (PSNR, SSIM, edit_ocr, copied, ...)."""
    if report.geneval is not None:
        tags = {f"eval/geneval/{tag}": score.accuracy for tag, score in report.geneval.tags.items()}
        return {"eval/geneval/score": report.geneval.overall, **tags}
    if report.edit is not None:
        means = {f"eval/edit/{name}": mean.mean for name, mean in report.edit.overall.metrics.items()}
        return {"eval/edit/score": eval_score(report), **means}
    return {"eval/ocr/score": report.ocr.mean_reward, "eval/ocr/exact": report.ocr.exact_match}


def gallery_components(sample: SampleResult) -> dict[str, float]:
    """What the eval gallery shows beside an image."""
    if sample.edit is not None:
        numbers = sample.edit.model_dump(include=set(EDIT_SCORES) | {"psnr", "copied"})
        return {name: float(value) for name, value in numbers.items() if value is not None}
    if sample.correct is None:
        return {"ocr": sample.reward}
    return {"geneval": sample.reward, "geneval_correct": float(sample.correct)}


def gallery_records(samples: list[SampleResult], root: Path, count: int) -> list[SampleRecord]:
    """The first image of each prompt (in prompt order, at most `count`) for the eval gallery."""
    firsts = sorted((s for s in samples if s.sample_index == 0), key=lambda s: s.prompt_index)[:count]
    return [SampleRecord(prompt=s.prompt, image=root / s.image, reward=sample_score(s),
                         components=gallery_components(s)) for s in firsts]


def sample_score(sample: SampleResult) -> float:
    """One image's reward (edit: its edit check, 0 where it has none)."""
    if sample.edit is None:
        return sample.reward
    return next((float(getattr(sample.edit, name)) for name in EDIT_SCORES
                 if getattr(sample.edit, name) is not None), 0.0)


@dataclass(frozen=True)
class InRunEvalResult:
    step: int
    score: float
    """`eval_score` of the report."""
    metrics: dict[str, float]
    """`eval_metrics` plus time/eval."""
    gallery: list[SampleRecord]
    report: EvalReport
    directory: Path
    """The per-image results (`SampleStore`)."""
    seconds: float

    def describe(self, steps: int) -> str:
        """The console's progress line of this eval (and the run store's event)."""
        report = self.report
        if report.edit is not None:
            psnr = report.edit.overall.metrics.get("psnr")
            detail = f"background PSNR {psnr.mean:.2f} dB" if psnr is not None else "no background metric"
        elif report.ocr is not None:
            detail = f"exact {report.ocr.exact_match:.3f}"
        else:
            detail = f"image accuracy {report.geneval.image_accuracy:.3f}"
        return (f"eval step {self.step}/{steps} | {report.bench} score {self.score:.4f} | {detail} | "
                f"{report.prompts} prompts x {report.images_per_prompt} images, v{report.policy_version} | "
                f"{self.seconds:.2f}s")


class InRunEval:
    """One run's in-run evals: their spec, where their per-image results go, how they are logged."""

    def __init__(self, section: EvalSection, sampling: SamplingConfig, chunk_images: int, results_dir: Path):
        self.section = section
        self.sampling = sampling
        """The run's own sampling settings: the policy is evaluated as it samples in training."""
        self.chunk_images = chunk_images
        self.results_dir = Path(results_dir)

    def run(self, workers: EvalWorkers, endpoint: RewardEndpoint, step: int, label: str,
            progress: Callable[[EvalProgress], None] | None = None) -> InRunEvalResult:
        """Evaluate the weights the workers serve after `step`; `label` names the run in spec.json;
        `progress` is called after every chunk (the trainer stops there when asked to)."""
        start = time.perf_counter()
        directory = self.results_dir / f"step-{step:07d}"
        shutil.rmtree(directory, ignore_errors=True)  # a step redone after --resume is evaluated afresh
        spec = eval_spec(self.section, f"{label} step {step}", self.sampling, self.chunk_images)
        store = SampleStore(directory)
        report = evaluate(workers, endpoint, spec, store, progress=progress)
        samples = list(store.open(spec.identity(report.policy_version)).values())
        gallery = gallery_records(samples, directory, self.section.gallery_images)
        seconds = time.perf_counter() - start
        metrics = {**eval_metrics(report), "time/eval": seconds}
        return InRunEvalResult(step=step, score=eval_score(report), metrics=metrics, gallery=gallery, report=report,
                               directory=directory, seconds=seconds)


def keep_if_best(result: InRunEvalResult, checkpoints: CheckpointDir, checkpoint_step: Callable[[], object],
                 steps: int) -> str:
    """A score above the best so far pins this step's checkpoint as the best (`CheckpointDir.mark_best`),
    after `checkpoint_step()` saved it (a no-op when the step already has one). Returns the eval's
    console line (and the run store's event)."""
    best = checkpoints.best_record()
    line = result.describe(steps)
    if best is None or result.score > best.score:
        checkpoint_step()
        checkpoints.mark_best(result.step, result.score)
        return line + f" | new best (checkpoint step {result.step} kept)"
    return line + f" | best {best.score:.4f} at step {best.step}"
