"""The GRPO run's configuration: one YAML file, validated by pydantic.

Unknown keys and bad values are errors that name the key. The model path is written once at the
top; the rollout, decoder and learner sections take it unless they name their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rewards.app.settings import Settings as RewardServerSettings
from rl.learner_config import LearnerConfig
from rl.prompts import PromptSourceConfig
from rollout.config import RolloutConfig
from rollout.decoder_config import DecoderConfig

STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class ModelSection(BaseModel):
    model_config = STRICT

    path: str
    """blip3o-rl model directory or hub id."""
    make_tiny: Literal["glyph", "sana"] | None = None
    """If `path` does not exist yet, build a tiny random-weight model of this preset there first."""


class DataSection(BaseModel):
    model_config = STRICT

    sources: list[PromptSourceConfig] = Field(min_length=1)
    """Prompt sources and their weights in the mix."""
    prompts_per_step: int = Field(2, ge=1)
    """B: prompts (groups) per step."""
    group_size: int = Field(8, ge=2)
    """G: samples per prompt (BLIP3o-NEXT uses 16)."""


class RolloutSection(BaseModel):
    model_config = STRICT

    workers: int = Field(1, ge=1)
    """vLLM rollout workers (Ray actors)."""
    num_cpus_per_worker: float = Field(1.0, ge=0)
    """Ray CPUs each reserves."""
    num_gpus_per_worker: float = Field(0.0, ge=0)
    """Ray GPUs each reserves (1 on GPU clusters)."""
    engine: RolloutConfig
    """The engine and sampling settings."""


class DecoderSection(BaseModel):
    model_config = STRICT

    workers: int = Field(1, ge=1)
    """Decoder workers (Ray actors); resources come from `decoder.num_cpus/num_gpus`."""
    decoder: DecoderConfig
    """The decoder."""


class RewardsSection(BaseModel):
    model_config = STRICT

    service: Literal["serve", "url"] = "serve"
    """serve: start the reward app as a Ray Serve application in this cluster; url: use a running one."""
    url: str | None = None
    """Base URL of the reward API (service "url")."""
    token: str | None = None
    """Bearer token the reward API wants (None = open)."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port of Ray Serve (service "serve"; 0 = any free port)."""
    num_cpus: float = Field(1.0, ge=0)
    """Ray CPUs of the Serve replica."""
    server: RewardServerSettings = RewardServerSettings(scorers=["ocr"])
    """The reward app's settings (service "serve")."""
    make_tiny_geneval: bool = False
    """If the GenEval detector / CLIP folders do not exist, build tiny random ones there (CPU demos);
    they must be `<dir>/mask2former` and `<dir>/clip` of one folder."""
    timeout_s: float = Field(120.0, gt=0)
    """Per request."""
    outage_budget_s: float = Field(300.0, gt=0)
    """A request failing with 5xx or a connection error (never 4xx) is retried with backoff for this
    long; past it the run checkpoints and stops with a message (resume with --resume)."""
    backoff_s: float = Field(0.5, ge=0)
    """First retry delay; doubles each retry (at most 10 s)."""

    @model_validator(mode="after")
    def _url_when_needed(self) -> "RewardsSection":
        if self.service == "url" and not self.url:
            raise ValueError("rewards.url is required when rewards.service is 'url'")
        geneval = self.server.geneval
        if self.make_tiny_geneval and (Path(geneval.detector).name, Path(geneval.clip).name, Path(geneval.detector).parent) != (
            "mask2former", "clip", Path(geneval.clip).parent
        ):
            raise ValueError("make_tiny_geneval needs server.geneval.detector = DIR/mask2former and clip = DIR/clip")
        return self


class ScheduleSection(BaseModel):
    model_config = STRICT

    mode: Literal["sync", "async"] = "sync"
    """sync: sample with the newest weights; async: sample step t+1 while step t trains."""
    max_staleness: int = Field(1, ge=0)
    """Most versions a trained-on rollout may lag the learner; older rollouts are sampled again."""
    chunk_prompts: int = Field(1, ge=1)
    """Prompts per rollout -> decode -> score task: decoding and scoring of one chunk start while
    later chunks are still sampling."""
    stage_timeout_s: float = Field(600.0, gt=0)
    """Longest a chunk's rollout -> decode -> score may take; a worker still busy with it then is
    treated as hung: killed, restarted by Ray and given the chunk again."""

    @model_validator(mode="after")
    def _async_needs_staleness(self) -> "ScheduleSection":
        if self.mode == "async" and self.max_staleness < 1:
            raise ValueError("schedule.mode 'async' trains on rollouts one version old: max_staleness must be >= 1")
        return self


class FaultsSection(BaseModel):
    model_config = STRICT

    max_worker_restarts: int = Field(5, ge=0)
    """Times Ray restarts a dead rollout or decoder worker (each comes back with the current weights)."""
    max_chunk_attempts: int = Field(3, ge=1)
    """Tries of one chunk of a step (a worker death or hang costs one) before the run fails."""
    call_timeout_s: float = Field(120.0, gt=0)
    """Longest wait for a worker's answer to a control call (served version, health)."""
    restart_timeout_s: float = Field(600.0, gt=0)
    """Longest wait for a worker to start, or to come back after a restart (it loads its model)."""
    learner_timeout_s: float = Field(1800.0, gt=0)
    """Longest wait for a learner call (setup, update, weight publish, checkpoint)."""


class CheckpointSection(BaseModel):
    model_config = STRICT

    every: int = Field(10, ge=1)
    """Save every this many steps (and after the last step)."""
    keep_last: int = Field(2, ge=1)
    """Complete checkpoints kept."""


class LoggingSection(BaseModel):
    model_config = STRICT

    runs_dir: Path = Path("runs")
    """Run store (SQLite), sample images and checkpoints live here."""
    samples_per_step: int = Field(4, ge=0)
    """Sample images recorded per step (spread over the groups)."""


class RaySection(BaseModel):
    model_config = STRICT

    address: str | None = None
    """Cluster to join; None: the one of `ray job submit` (RAY_ADDRESS), else a new local one."""
    num_cpus: int | None = None
    """CPUs of a new local cluster (None = Ray's count)."""


class TrainConfig(BaseModel):
    model_config = STRICT

    name: str
    """Run name shown on the dashboard."""
    seed: int = 0
    """Seeds prompt order, sampling and the learner's shuffling."""
    steps: int = Field(ge=1)
    """GRPO steps (one rollout batch and one learner update each)."""
    model: ModelSection
    data: DataSection
    rollout: RolloutSection
    decoder: DecoderSection
    rewards: RewardsSection = RewardsSection()
    learner: LearnerConfig
    schedule: ScheduleSection = ScheduleSection()
    faults: FaultsSection = FaultsSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()
    ray: RaySection = RaySection()

    @model_validator(mode="before")
    @classmethod
    def _model_path_defaults(cls, raw):
        """Sections that load the model take the top-level `model.path` unless they name one."""
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or "path" not in raw["model"]:
            return raw
        path = raw["model"]["path"]
        for section, key in (("rollout", "engine"), ("decoder", "decoder")):
            inner = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
            if isinstance(inner, dict):
                inner.setdefault("model", path)
        if isinstance(raw.get("learner"), dict):
            raw["learner"].setdefault("model", path)
        return raw

    @model_validator(mode="after")
    def _sampling_matches_learner(self) -> "TrainConfig":
        sampling = self.rollout.engine.sampling
        if sampling.temperature != self.learner.grpo.temperature:
            raise ValueError(
                f"rollout.engine.sampling.temperature ({sampling.temperature}) must equal "
                f"learner.grpo.temperature ({self.learner.grpo.temperature}): log-probs must match sampling"
            )
        if sampling.top_k or sampling.top_p < 1.0:
            raise ValueError("top_k / top_p truncate the sampling distribution the learner does not see: keep them off")
        return self


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read and validate a YAML config; `overrides` (dotted keys) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        lines = [f"{path}: invalid config"]
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            lines.append(f"  {key}: {problem['msg']}")
        raise ConfigError("\n".join(lines)) from None
