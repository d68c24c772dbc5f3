"""Checkpoints: one save/load interface for everything a resumed run needs.

    <run_dir>/checkpoints/
        step-000010/
            trainer.json     TrainerState: step, policy version, prompt-sampler cursors, run id
            learner/         the learner's own files (DeepSpeed engine, optimizer, scheduler, RNG)
            policy/          the AR policy as a Hugging Face directory: vLLM and transformers load it
        latest               name of the newest COMPLETE checkpoint

A checkpoint is written into a temp folder and renamed into place, and `latest` is replaced
atomically after that, so a run killed mid-save resumes from the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rl.prompts import SamplerState

LATEST = "latest"
TRAINER_FILE = "trainer.json"


@dataclass
class TrainerState:
    """The driver's state after a completed step."""

    step: int
    """Last completed step (0 = none)."""
    policy_version: int
    """Weight version after that step's update."""
    run_id: str
    sampler: SamplerState = field(default_factory=SamplerState)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        raw = json.loads(text)
        raw["sampler"] = SamplerState(**raw["sampler"])
        return cls(**raw)


class CheckpointDir:
    def __init__(self, root: Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def begin(self, step: int) -> Path:
        """A fresh temp folder to write step `step` into; `commit` makes it the latest."""
        tmp = self.root / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, state: TrainerState) -> Path:
        (tmp / TRAINER_FILE).write_text(state.to_json())
        final = self.path_for(state.step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = self.root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, self.root / LATEST)
        self._prune()
        return final

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        return path if (path / TRAINER_FILE).is_file() else None

    def load_state(self, path: Path) -> TrainerState:
        return TrainerState.from_json((path / TRAINER_FILE).read_text())

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step-*") if (p / TRAINER_FILE).is_file())
        for old in complete[: -self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
