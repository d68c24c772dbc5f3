"""The in-run evaluation's config section, and the prompts it evaluates (which a run must not train on)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rl.evaluation.edit_bench import EditData
from rl.prompts.edit import SyntheticEdits
from rl.prompts.sources import PromptItem, benchmark_prompts

STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class EvalSection(BaseModel):
    """In-run evaluation (rl/evaluation/in_run.py): the current policy on a benchmark's evaluation prompts
    (rl/prompts/data/eval/, never trained on), through the run's own workers and reward API."""

    model_config = STRICT

    every: int = Field(ge=0)
    """Evaluate after every this many steps and after the last step; 0 = off."""
    bench: Literal["geneval", "ocr", "edit"]
    """geneval: GenEval's evaluation prompts, score = mean of the tag accuracies; ocr: Flow-GRPO's
    OCR test prompts, score = mean OCR reward (exact-match share logged beside it); edit: the edits of
    `edit_data`, score = the mean of their edit check (`rl.evaluation.in_run.EDIT_SCORES`), the
    background metrics logged beside it."""
    edit_data: EditData | None = None
    """bench edit: an edit JSONL (rl/prompts/edit.py) whose lines have a target (text or color), scored by
    the run's reward service (consistency and the edit checks). The benchmarks' files (ImgEdit, GEdit-Bench,
    PIE-Bench) have no programmatic target: `blip3o-rl eval --bench edit` scores them with a judge."""
    synthetic_edits: SyntheticEdits | None = None
    """bench edit: write this synthetic evaluation set (words of EVAL_WORDS, never trained on) at
    `edit_data.path` when that file does not exist yet, as a synthetic training source is written."""
    prompts: int | None = Field(None, ge=1)
    """Evaluation prompts per eval (GenEval: spread over the tags; OCR, edit: the first ones); None = all."""
    images_per_prompt: int | None = Field(None, ge=1)
    """Images per prompt; None = the bench's default (GenEval 4, OCR 1, edit 1)."""
    seed: int = Field(0, ge=0)
    """Image (prompt p, sample s) is sampled with seed + p*N + s at every eval: successive evals differ
    only by the weights. Independent of the training seeds."""
    gallery_images: int = Field(16, ge=0)
    """Eval images shown in the dashboard's eval gallery (the first image of each prompt, in order)."""

    @model_validator(mode="after")
    def _edit_data(self) -> EvalSection:
        if (self.bench == "edit") != (self.edit_data is not None):
            raise ValueError("eval bench edit needs edit_data (the edit file), and only bench edit takes it")
        if self.bench != "edit":
            if self.synthetic_edits is not None:
                raise ValueError("synthetic_edits is for eval bench edit")
            return self
        from rl.prompts.edit_benchmarks import detect_format

        data = self.edit_data
        fmt = data.format or (detect_format(data.path) if data.path.exists() else "edit")
        if fmt != "edit":  # their lines have no programmatic target: only a judge scores them
            raise ValueError(f"the in-run edit eval reads edit lines with a target (our edit JSONL), not {fmt}: "
                             f"evaluate {data.path} with `blip3o-rl eval --bench edit` and a judge")
        return self

    def due(self, step: int, last_step: int) -> bool:
        """True after the steps that are evaluated: every `every`-th and the last."""
        return self.every > 0 and (step % self.every == 0 or step == last_step)


def eval_edit_lines(section: EvalSection) -> list:
    """bench edit: the BenchEdit lines each eval scores (none while a synthetic set is not written)."""
    from rl.prompts.edit_benchmarks import load_ours

    path = section.edit_data.path
    return load_ours(path)[: section.prompts] if path.exists() else []


def eval_scorers(section: EvalSection | None) -> set[str]:
    """The reward service's scorers an in-run eval calls: its bench's, for edits consistency and the
    edit checks of the lines' targets (a synthetic set's are text: edit_ocr)."""
    if section is None or section.every == 0:
        return set()
    if section.bench != "edit":
        return {section.bench}
    from rl.evaluation.edit_bench import needed_scorers

    lines = eval_edit_lines(section)
    return {"consistency", *(needed_scorers(lines, clip=False) if lines else ["edit_ocr"])}


def chosen_eval_prompts(section: EvalSection) -> list[PromptItem]:
    """The evaluation prompts every in-run eval of this config scores (what must not be trained on);
    an edit file not written yet (a synthetic set the run writes) has none to check yet."""
    if section.bench != "edit":
        return [item for _, item in benchmark_prompts(section.bench, section.prompts)]
    return [PromptItem(line.record.prompt, "edit", edit=line.record) for line in eval_edit_lines(section)]
