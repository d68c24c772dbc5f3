"""The one job bench/bench_vs_upstream.py gives every system, as plain data, and what the runners share.

The driver reads the settings from the run config at run time (`job_spec`, in our environment) and
writes them to `job.json`; each runner reads them back (`JobSpec.load`) and appends one JSON line
per optimizer step to `steps.jsonl` (`StepLog`). The runners live in two environments: the TRL
runner in ours, BLIP3o-NEXT's fork in /work/upstream/venv (transformers 4.54), so this module
imports only the standard library at load time, and torch / PIL / our glyph decoder where used.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STAGES = ("generate", "decode", "reward", "update", "sync")
"""The step breakdown every system reports where it can (seconds per step)."""


@dataclass(frozen=True)
class JobSpec:
    """Everything a runner needs, in the run config's own values."""

    steps: int
    seed: int
    captions: list[str]
    """prompts_per_step * steps captions, in the order blip3o-rl's prompt sampler draws them."""
    prompts_per_step: int
    group_size: int
    micro_batch_size: int
    lr: float
    beta: float
    clip_low: float
    clip_high: float
    temperature: float
    grad_clip: float
    scale_by_std: bool
    tokens_per_image: int
    model_dir: str
    """blip3o-rl model directory (its ar/ is a plain Qwen3 save with the image vocabulary)."""
    glyph: dict
    """rollout.decoder_config.GlyphConfig fields (font_path as a string)."""
    ocr_models_dir: str
    ocr_size: str
    ocr_cache_size: int
    max_model_len: int
    kv_cache_gib: float
    instruction: str
    """The user turn around the caption (rollout.engine.instruction)."""
    system_prompt: str | None
    settings_from: str = ""
    """The config file the values were read from."""
    notes: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> JobSpec:
        return cls(**json.loads(Path(path).read_text()))

    def step_captions(self, step: int) -> list[str]:
        """The captions of optimizer step `step` (1-based)."""
        start = (step - 1) * self.prompts_per_step
        return self.captions[start:start + self.prompts_per_step]


class StepLog:
    """Appends one JSON line per finished optimizer step: step, wall-clock time, mean reward and the
    seconds of each stage the runner could see (`STAGES`)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, step: int, reward: float, stages: dict[str, float]) -> None:
        record = {"step": step, "time": time.time(), "reward": reward, "stages": stages}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def read_step_log(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StageClock:
    """Seconds spent per named stage since the last `take()` (a runner's per-step breakdown)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, {}
        return taken


def step_callback(log: StepLog, clock: StageClock, decode_inside: str):
    """A transformers `TrainerCallback` that writes one line per optimizer step when the trainer logs
    it (logging_steps=1). `decode_inside`: the stage whose timer also covers the glyph decoding
    (subtracted from it); sync is 0 unless timed (the fork generates with the trained model itself:
    nothing to sync); update = the rest of the step (log-probs, backward, optimizer)."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs:  # the end-of-training summary
                return
            now = time.perf_counter()
            stages = clock.take()
            stages[decode_inside] = stages.get(decode_inside, 0.0) - stages.get("decode", 0.0)
            stages.setdefault("sync", 0.0)
            stages["update"] = (now - self.last) - sum(stages.values())
            log.append(state.global_step, float(logs["reward"]), stages)
            self.last = now

    return StepRecorder()


def non_image_ids(vocab, rows: int) -> list[int]:
    """Every token id below `rows` that is not an image token: what a sampler must never draw."""
    return [i for i in range(rows) if not vocab.image_token_start <= i < vocab.image_token_end]


class GlyphImages:
    """Generated image-token ids -> the glyph images the project's decoder draws (rollout/glyph.py).

    Image tokens only: a completion holding any other id is refused by `ImageVocab.to_codebook`,
    as our decoder refuses it; the runners restrict sampling to image tokens, so none reaches here.
    """

    def __init__(self, tokenizer, spec: JobSpec):
        from policy.vocab import ImageVocab
        from rollout.decoder_config import GlyphConfig
        from rollout.glyph import GlyphDecoder

        self.vocab = ImageVocab.from_tokenizer(tokenizer, spec.tokens_per_image)
        self.decoder = GlyphDecoder(GlyphConfig(**spec.glyph), self.vocab.codebook_size, spec.tokens_per_image)

    def __call__(self, completion_ids):
        """[B, N] ids (tensor or nested lists) -> [B, H, W, 3] uint8."""
        import torch

        ids = torch.as_tensor(completion_ids, dtype=torch.long)  # [B, N]
        return self.decoder.render_codes(self.vocab.to_codebook(ids))
