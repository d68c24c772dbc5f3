"""Prompt sources and the resumable sampler that decides which prompts each step trains on.

The order is a pure function of (seed, cursors): each source is walked through a seeded
permutation per epoch, and a seeded draw per step picks the source of each slot by weight. The
cursors are the sampler's whole state, saved in checkpoints, so a resumed run sees the same prompts
step for step as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED = {"geneval": DATA_DIR / "geneval_metadata.jsonl", "ocr": DATA_DIR / "ocr_prompts.txt"}
WORD_CAPTION = 'an image with the text "{word}"'


@dataclass(frozen=True)
class PromptItem:
    """One training prompt with what its reward needs."""

    caption: str
    """Text given to the AR model."""
    task: Literal["geneval", "ocr"]
    """Which reward scores it."""
    geneval_metadata: str = ""
    """The GenEval metadata line (JSON) for task "geneval"; empty otherwise."""


class PromptSourceConfig(BaseModel):
    """One source of prompts in the training mix."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: Literal["geneval", "ocr", "words"]
    """geneval: GenEval metadata lines; ocr: text-rendering prompts with a quoted target;
    words: short target words rendered as captions `an image with the text "WORD"` (CPU demo)."""
    path: Path | None = None
    """File to read (geneval / ocr); the bundled copy when unset."""
    words: list[str] = []
    """Target words for kind "words"."""
    tags: list[str] = []
    """GenEval tags to keep (all when empty)."""
    limit: int | None = None
    """Keep only the first `limit` prompts of the file."""
    weight: float = 1.0
    """Relative share of this source in each batch."""

    @model_validator(mode="after")
    def _check(self) -> "PromptSourceConfig":
        if self.weight <= 0:
            raise ValueError("weight must be positive")
        if self.kind == "words" and not self.words:
            raise ValueError("kind 'words' needs a non-empty 'words' list")
        if self.kind != "words" and self.words:
            raise ValueError("'words' is only for kind 'words'")
        return self


def load_source(config: PromptSourceConfig) -> list[PromptItem]:
    if config.kind == "words":
        items = [PromptItem(WORD_CAPTION.format(word=w), "ocr") for w in config.words]
    else:
        path = config.path or BUNDLED[config.kind]
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} (source kind '{config.kind}') does not exist")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if config.kind == "ocr":
            items = [PromptItem(line.strip(), "ocr") for line in lines]
        else:
            items = []
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                    caption = record["prompt"]
                except (json.JSONDecodeError, KeyError) as error:
                    raise ValueError(f"{path}:{number}: not a GenEval metadata line ({error})") from None
                if not config.tags or record.get("tag") in config.tags:
                    items.append(PromptItem(caption, "geneval", line))
    items = items[: config.limit] if config.limit is not None else items
    if not items:
        raise ValueError(f"prompt source {config.kind} yields no prompts (check tags / limit / file)")
    return items


@dataclass
class SamplerState:
    """Where the sampler stands: saved in checkpoints."""

    step: int = 0
    cursors: list[int] = field(default_factory=list)
    """Prompts taken so far from each source (epoch = cursor // len(source))."""


class PromptSampler:
    def __init__(self, sources: list[PromptSourceConfig], seed: int, state: SamplerState | None = None):
        if not sources:
            raise ValueError("at least one prompt source is needed")
        self.items = [load_source(s) for s in sources]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.seed = seed
        self.state = state or SamplerState(cursors=[0] * len(sources))
        if len(self.state.cursors) != len(sources):
            raise ValueError("sampler state does not match the configured sources")

    def _take(self, source: int) -> PromptItem:
        items = self.items[source]
        cursor = self.state.cursors[source]
        epoch, offset = divmod(cursor, len(items))
        order = np.random.default_rng([self.seed, source, epoch]).permutation(len(items))
        self.state.cursors[source] = cursor + 1
        return items[int(order[offset])]

    def next_batch(self, batch_size: int) -> list[PromptItem]:
        """The prompts of the next step (advances the state)."""
        rng = np.random.default_rng([self.seed, 1_000_003, self.state.step])
        picks = rng.choice(len(self.items), size=batch_size, p=self.weights)
        self.state.step += 1
        return [self._take(int(source)) for source in picks]
