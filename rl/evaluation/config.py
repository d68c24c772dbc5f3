"""The in-run evaluation's config section, and the prompts it evaluates (which a run must not train on)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rl.prompts.sources import PromptItem, benchmark_prompts

STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class EvalSection(BaseModel):
    """In-run evaluation (rl/evaluation/in_run.py): the current policy on a benchmark's evaluation prompts
    (rl/prompts/data/eval/, never trained on), through the run's own workers and reward API."""

    model_config = STRICT

    every: int = Field(ge=0)
    """Evaluate after every this many steps and after the last step; 0 = off."""
    bench: Literal["geneval", "ocr"]
    """geneval: GenEval's evaluation prompts, score = mean of the tag accuracies; ocr: Flow-GRPO's
    OCR test prompts, score = mean OCR reward (exact-match share logged beside it)."""
    prompts: int | None = Field(None, ge=1)
    """Evaluation prompts per eval (GenEval: spread over the tags; OCR: the first ones); None = all."""
    images_per_prompt: int | None = Field(None, ge=1)
    """Images per prompt; None = the bench's default (GenEval 4, OCR 1)."""
    seed: int = Field(0, ge=0)
    """Image (prompt p, sample s) is sampled with seed + p*N + s at every eval: successive evals differ
    only by the weights. Independent of the training seeds."""
    gallery_images: int = Field(16, ge=0)
    """Eval images shown in the dashboard's eval gallery (the first image of each prompt, in order)."""

    def due(self, step: int, last_step: int) -> bool:
        """True after the steps that are evaluated: every `every`-th and the last."""
        return self.every > 0 and (step % self.every == 0 or step == last_step)


def chosen_eval_prompts(section: EvalSection) -> list[PromptItem]:
    """The evaluation prompts every in-run eval of this config scores (what must not be trained on)."""
    return [item for _, item in benchmark_prompts(section.bench, section.prompts)]
