"""The GRPO run's configuration: one YAML file, validated by pydantic.

Unknown keys and bad values are errors that name the key. The model path is written once at the
top; the rollout, decoder and learner sections take it unless they name their own.

Relative paths (`PATH_KEYS`) start at the run root: `$BLIP3O_RL_ROOT` if set, else the directory the
run is launched from. They are made absolute here, before anything reads them, so the run store,
checkpoints, `--resume` and the model builders all see one place. `deploy/ray_job.sh` sets the
root to the repository it runs in, because a Ray job's driver runs in Ray's temporary copy of the
code; a run that would write there is refused (see docs/deploying.md, "Where a run's files go").
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from policy.model_dir import looks_like_hub_id
from rl.evaluation.config import EvalSection, chosen_eval_prompts
from rl.guard.config import GuardSection
from rl.learners.ar_config import LearnerConfig
from rl.learners.diffusion_config import DiffusionLearnerConfig
from rl.prompts.sources import PromptSourceConfig, load_source
from rl.scoring.config import RewardsSection
from rollout.config import RolloutConfig
from rollout.decoder_config import DecoderConfig

INSTALL_HINT = "pip install 'blip3o-rl[wandb]' (or pip install wandb), or remove logging.wandb from the config"


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

    @model_validator(mode="after")
    def _sources_load(self) -> "DataSection":
        """Read every source now: a missing file, a bad line or evaluation prompts fail at config load
        (a synthetic edit set the run writes itself is read when it exists)."""
        for index, source in enumerate(self.sources):
            if source.written_by_run:
                continue
            try:
                load_source(source)
            except (OSError, ValueError) as error:
                raise ValueError(f"sources.{index}: {error}") from None
        kinds = {source.kind == "edit" for source in self.sources}
        if len(kinds) > 1:  # every generic reward scores every row: edit checks would get rows without a source
            raise ValueError("edit sources cannot share a run with text-to-image sources: the edit rewards of the mix "
                             "score every row and text-to-image rows have no source image; train them in separate runs")
        return self

    @property
    def edits(self) -> bool:
        """The prompts are edits (a source image and an instruction each)."""
        return any(source.kind == "edit" for source in self.sources)


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


class ScheduleSection(BaseModel):
    model_config = STRICT

    mode: Literal["sync", "async"] = "sync"
    """sync: each step samples with the newest weights, after the previous one is trained; async: the
    next steps sample while a step waits for its rewards and trains (`max_staleness` of them)."""
    max_staleness: int = Field(1, ge=0)
    """k. async: up to k steps beyond the one being trained are in flight; step s samples with the
    weights after step max(s - 1 - k, the last checkpoint or eval step before s), so it is trained at
    most k versions stale. Rows lagging the learner by more than k versions are never trained on but
    sampled again (counted in schedule/stale_rows_resampled). sync: nothing is in flight."""
    chunk_prompts: int = Field(1, ge=1)
    """Prompts per rollout -> decode -> score task: decoding and scoring of one chunk start while
    later chunks are still sampling."""
    stage_timeout_s: float = Field(600.0, gt=0)
    """Longest a chunk's rollout -> decode -> score may take; a worker still busy with it then is
    treated as hung: killed, restarted by Ray and given the chunk again."""
    alternate: bool = False
    """With `train: [ar, diffusion]`: update the AR policy after odd steps and the decoder after even
    ones (one policy moves at a time) instead of both after every step."""

    @model_validator(mode="after")
    def _async_needs_staleness(self) -> "ScheduleSection":
        if self.mode == "async" and self.max_staleness < 1:
            raise ValueError("schedule.mode 'async' trains on rollouts up to max_staleness versions old: "
                             "max_staleness must be >= 1")
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


class WandbSection(BaseModel):
    model_config = STRICT

    project: str = Field(min_length=1)
    """Weights & Biases project the run's metrics are logged to (needs `pip install 'blip3o-rl[wandb]'`)."""
    mode: Literal["online", "offline"] = "online"
    """online: stream to the W&B server (needs `wandb login`); offline: files under the run's folder, for `wandb sync`."""

    @model_validator(mode="after")
    def _wandb_installed(self) -> "WandbSection":
        """Refused at load, before Ray starts, when the optional package is missing."""
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError(f"W&B logging is configured but the wandb package is not installed: {INSTALL_HINT}")
        return self


class LoggingSection(BaseModel):
    model_config = STRICT

    runs_dir: Path = Path("runs")
    """Run store (SQLite), sample images and checkpoints live here."""
    samples_per_step: int = Field(4, ge=0)
    """Sample images recorded per step (spread over the groups)."""
    wandb: WandbSection | None = None
    """Also log every step's metrics to Weights & Biases (None: the run store and dashboard only)."""
    alarms: dict[str, Annotated[float, Field(gt=0)]] = {"policy/logprob_diff": 0.05, "diffusion/logprob_diff": 1e-4}
    """metric -> threshold: a value above it is an `alarm` event and an `alarm:` console line, once per
    crossing (rl/run/alarms.py); {}: none. The defaults watch the sampler/learner log-prob gap at the
    sampling weights. AR (max over the step's image tokens): <= 1.5e-5 in fp32 (1.4e-6 over the glyph
    demo run), 4-5e-3 in bf16, while one update moves the log-probs by 0.06-0.13: 0.05 is a sampler
    serving other weights than the learner's. SANA (per-step SDE log-prob, a mean over the latent): 0 to
    2e-7 in fp32 and bf16; 1e-4 is Flow-GRPO's ratio clip range (a lossy bf16 adapter merge drifted 8.4e-4)."""


class RaySection(BaseModel):
    model_config = STRICT

    address: str | None = None
    """Cluster to join; None: the one of `ray job submit` (RAY_ADDRESS), else a new local one."""
    num_cpus: int | None = None
    """CPUs of a new local cluster (None = Ray's count)."""
    role_resources: bool = False
    """Ask each actor for its role's custom Ray resource ({"rollout": 1}, "decoder", "learner",
    "reward"), which deploy/cluster.yaml and deploy/kuberay-rayjob.yaml give each role's nodes, so
    every role lands on its own node group (rl/run/placement.py)."""


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
    train: list[Literal["ar", "diffusion"]] = Field(["ar"], min_length=1)
    """The policies the run updates from its one reward: `ar` (GRPO on the image tokens, `learner`),
    `diffusion` (Flow-GRPO on SANA's transformer, `diffusion_learner`), or both, each from its own
    advantages with its own optimizer and learning rate. A policy not listed stays frozen."""
    learner: LearnerConfig | None = None
    """The AR policy's learner; required when `train` has `ar`."""
    diffusion_learner: DiffusionLearnerConfig | None = None
    """The SANA decoder's learner; required when `train` has `diffusion`. With it every step is
    decoded with its SDE sampler (`diffusion_learner.sampling`) instead of `decoder.decoder`'s
    ODE steps, for the AR policy's rewards too; in-run eval keeps the ODE sampler."""
    schedule: ScheduleSection = ScheduleSection()
    faults: FaultsSection = FaultsSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection | None = None
    """In-run evaluation; None (absent) = off."""
    guard: GuardSection | None = None
    """Reward-hacking guard; None (absent) = off (the `images/*` statistics are logged either way)."""
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
        for section in ("learner", "diffusion_learner"):
            if isinstance(raw.get(section), dict):
                raw[section].setdefault("model", path)
        return raw

    @model_validator(mode="before")
    @classmethod
    def _lora_defaults(cls, raw):
        """The workers serve the adapter the learner trains: `learner.lora` is copied to the rollout
        engine and the decoder unless they name their own (which must then be the same)."""
        if not isinstance(raw, dict):
            return raw
        if isinstance(raw.get("learner"), dict) and raw["learner"].get("lora") is not None:
            for section, key in (("rollout", "engine"), ("decoder", "decoder")):
                inner = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
                if isinstance(inner, dict):
                    inner.setdefault("lora", raw["learner"]["lora"])
        # likewise the decoders serve the transformer adapter the diffusion learner trains
        diffusion, decoder = raw.get("diffusion_learner"), raw.get("decoder")
        if isinstance(diffusion, dict) and diffusion.get("lora") is not None and isinstance(decoder, dict) \
                and isinstance(decoder.get("decoder"), dict):
            decoder["decoder"].setdefault("transformer_lora", diffusion["lora"])
        return raw

    @model_validator(mode="before")
    @classmethod
    def _source_reader_defaults(cls, raw):
        """Edit prompts: the rollout reads a source image with the decoder's inverse, so the decoder's kind
        and glyph settings are copied to the rollout engine unless it names its own."""
        if not isinstance(raw, dict) or not isinstance(raw.get("rollout"), dict) or not isinstance(raw.get("decoder"), dict):
            return raw
        engine, decoder = raw["rollout"].get("engine"), raw["decoder"].get("decoder")
        if isinstance(engine, dict) and isinstance(decoder, dict):
            if isinstance(decoder.get("glyph"), dict):
                engine.setdefault("glyph", dict(decoder["glyph"]))
            if decoder.get("kind") in ("glyph", "sana"):
                engine.setdefault("source_tokenizer", "glyph" if decoder["kind"] == "glyph" else "ta_tok")
        return raw

    @model_validator(mode="after")
    def _edits_have_a_mix(self) -> "TrainConfig":
        """An edit has no task reward of its own (no quoted target, no GenEval line): the mix says how it is scored."""
        if self.data.edits and self.rewards.mix is None:
            raise ValueError(
                "edit sources need rewards.mix: an edit prompt has no task reward of its own. Mix an edit check "
                "(edit_ocr, edit_color, or a judge over http) with consistency (docs/editing.md), e.g. "
                "[{name: edit, scorer: edit_ocr, weight: 1.0}, {name: keep, scorer: consistency, weight: 0.5}]")
        return self

    @model_validator(mode="after")
    def _learners_match_train(self) -> "TrainConfig":
        """Each trained policy has its learner, and no learner is configured for a frozen policy."""
        if len(set(self.train)) != len(self.train):
            raise ValueError(f"train {self.train} names a policy twice")
        for policy, section, learner in (("ar", "learner", self.learner),
                                         ("diffusion", "diffusion_learner", self.diffusion_learner)):
            if policy in self.train and learner is None:
                raise ValueError(f"train has '{policy}': the '{section}' section is required")
            if policy not in self.train and learner is not None:
                raise ValueError(f"'{section}' is set but train ({self.train}) does not update that policy: "
                                 f"add '{policy}' to train or remove the section")
        if self.schedule.alternate and len(self.train) < 2:
            raise ValueError("schedule.alternate takes turns between two policies: it needs train [ar, diffusion]")
        if "diffusion" in self.train:
            if self.schedule.mode != "sync":
                raise ValueError("train has 'diffusion': schedule.mode must be 'sync', whatever "
                                 "schedule.max_staleness (Flow-GRPO trains on-policy: the SDE rollouts must come "
                                 "from the transformer version being updated; async steps in flight would not)")
            if "glyph" in (self.model.make_tiny, self.decoder.decoder.kind):
                raise ValueError("train has 'diffusion' but the decoder is the glyph decoder (no diffusion model): "
                                 "use a sana model")
        return self

    @model_validator(mode="after")
    def _same_lora_everywhere(self) -> "TrainConfig":
        trained = self.diffusion_learner.lora if self.diffusion_learner is not None else None
        if self.decoder.decoder.transformer_lora != trained:
            raise ValueError(f"decoder.decoder.transformer_lora ({self.decoder.decoder.transformer_lora}) must equal "
                             f"diffusion_learner.lora ({trained}): the decoders serve the transformer the diffusion "
                             "learner publishes")
        if self.learner is None:  # the AR policy is frozen: the workers serve its weights as loaded
            for where, lora in (("rollout.engine.lora", self.rollout.engine.lora),
                                ("decoder.decoder.lora", self.decoder.decoder.lora)):
                if lora is not None:
                    raise ValueError(f"{where} is set but the AR policy is not trained (no learner.lora to serve)")
            return self
        for where, lora in (("rollout.engine.lora", self.rollout.engine.lora), ("decoder.decoder.lora",
                                                                                self.decoder.decoder.lora)):
            if lora != self.learner.lora:
                raise ValueError(f"{where} ({lora}) must equal learner.lora ({self.learner.lora}): the workers "
                                 "serve the weights the learner publishes")
        return self

    @model_validator(mode="after")
    def _sampling_matches_learner(self) -> "TrainConfig":
        sampling = self.rollout.engine.sampling
        if self.learner is not None and sampling.temperature != self.learner.grpo.temperature:
            raise ValueError(
                f"rollout.engine.sampling.temperature ({sampling.temperature}) must equal "
                f"learner.grpo.temperature ({self.learner.grpo.temperature}): log-probs must match sampling"
            )
        return self

    @model_validator(mode="after")
    def _eval_prompts_not_trained(self) -> "TrainConfig":
        """The in-run eval's prompts are in no training source, `allow_eval_prompts` ones included
        (checked again once the run has written its synthetic sets: `check_eval_not_trained`)."""
        check_eval_not_trained(self)  # an overlap is a ValueError: pydantic reports it
        return self


def check_eval_not_trained(config: TrainConfig) -> None:
    """EvalPromptOverlapError if a prompt of the in-run eval is in a training source (a synthetic set the
    run has not written yet has none to compare)."""
    if config.eval is None or config.eval.every == 0:
        return
    from rl.prompts.sources import check_not_trained, load_source

    eval_items = chosen_eval_prompts(config.eval)
    for index, source in enumerate(config.data.sources):
        if not source.written_by_run:
            check_not_trained(eval_items, load_source(source), f"eval ({config.eval.bench}) vs data.sources.{index}")


ROOT_ENV = "BLIP3O_RL_ROOT"
# Every path a config reads or writes, as dotted keys into the YAML ("*" = each list item).
# "model" keys may also name a hub id (org/name): kept as one unless it exists under the root or
# this run writes it (make_tiny).
PATH_KEYS = {
    "model.path": "model",
    "rollout.engine.model": "model",
    "decoder.decoder.model": "model",
    "learner.model": "model",
    "diffusion_learner.model": "model",
    "rewards.server.geneval.detector": "model",
    "rewards.server.geneval.clip": "model",
    "rewards.server.ocr.models_dir": "path",
    "rewards.server.clipscore.model": "model",
    "rewards.server.clipscore.processor": "model",
    "rewards.server.pickscore.model": "model",
    "rewards.server.pickscore.processor": "model",
    "rewards.server.aesthetic.model": "model",
    "rewards.server.aesthetic.processor": "model",
    "rewards.server.aesthetic.head": "model",
    "rewards.server.consistency.clip.model": "model",
    "rewards.server.consistency.clip.processor": "model",
    "decoder.decoder.glyph.font_path": "path",
    "rollout.engine.glyph.font_path": "path",
    "data.sources.*.path": "path",
    "eval.edit_data.path": "path",
    "eval.edit_data.images": "path",
    "logging.runs_dir": "path",
}
# Ray 2.60 runs a job's driver in <temp dir>/session_*/runtime_resources/working_dir_files/
# _ray_pkg_<hash> (measured; Ray's working_dir plugin names the folder), deleted with the session.
RAY_WORKING_DIR = ("runtime_resources", "working_dir_files")


def run_root() -> Path:
    """Where relative config paths start: `$BLIP3O_RL_ROOT`, else the current directory."""
    value = os.environ.get(ROOT_ENV)
    if not value:
        return Path.cwd()
    root = Path(value).expanduser()
    if not (root.is_absolute() and root.is_dir()):
        raise ConfigError(f"{ROOT_ENV}={value} is not an existing absolute directory on this machine: set it to the "
                          "directory relative config paths start from here (docs/deploying.md, \"Where a run's files go\")")
    return root


def dotted_items(node, keys: list[str]):
    """(parent, key) of every value at the dotted `keys` inside `node` that is present."""
    if not keys:
        return
    key, rest = keys[0], keys[1:]
    if key == "*":
        children = list(enumerate(node)) if isinstance(node, list) else []
    else:
        children = [(key, node[key])] if isinstance(node, dict) and key in node else []
    for child_key, child in children:
        if rest:
            yield from dotted_items(child, rest)
        else:
            yield node, child_key


def written_keys(raw: dict) -> set[str]:
    """The `PATH_KEYS` this run writes to."""
    model, rewards = raw.get("model"), raw.get("rewards")
    written = {"logging.runs_dir"}
    if isinstance(model, dict) and model.get("make_tiny"):
        written.add("model.path")
    if isinstance(rewards, dict) and rewards.get("make_tiny_geneval"):
        written |= {"rewards.server.geneval.detector", "rewards.server.geneval.clip"}
    return written


def resolve_paths(raw: dict, root: Path) -> dict:
    """A copy of the raw config with every relative path of `PATH_KEYS` made absolute under `root`."""
    raw = copy.deepcopy(raw)
    section = raw.setdefault("logging", {})
    if isinstance(section, dict):  # the default runs_dir is relative too
        section.setdefault("runs_dir", str(LoggingSection.model_fields["runs_dir"].default))
    written = written_keys(raw)
    for dotted, kind in PATH_KEYS.items():
        for parent, key in dotted_items(raw, dotted.split(".")):
            value = parent[key]
            if not isinstance(value, str) or not value:
                continue  # None and wrong types: validation reports them
            path = Path(value).expanduser()
            if path.is_absolute():
                parent[key] = str(path)
            elif kind == "model" and dotted not in written and looks_like_hub_id(value) and not (root / path).exists():
                continue  # a hub id
            else:
                parent[key] = str(root / path)
    return raw


def in_ray_working_dir(path: Path) -> bool:
    """True if `path` lies in the temporary copy of the code a Ray job runs in."""
    parts = Path(os.path.abspath(path)).parts
    return any(parts[i:i + 2] == RAY_WORKING_DIR for i in range(len(parts) - 1))


def refuse_ray_working_dir(raw: dict) -> None:
    """One clear line instead of a run whose outputs vanish with the Ray session."""
    for dotted in sorted(written_keys(raw)):
        for parent, key in dotted_items(raw, dotted.split(".")):
            if isinstance(parent[key], str) and in_ray_working_dir(Path(parent[key])):
                raise ConfigError(
                    f"{dotted} is {parent[key]}, inside Ray's temporary copy of the job's code (deleted with the "
                    f"session): set {ROOT_ENV} to the directory whose runs/ should hold the run (deploy/ray_job.sh "
                    "sets it to the repository), or give an absolute path")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key written twice in one mapping is an error (plain YAML
    keeps the last one silently: an edit that misses the first would not take effect)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: dict | None = None, root: Path | None = None) -> "TrainConfig":
    """Read and validate a YAML config; `overrides` (dotted keys) win over the file. Relative paths
    are made absolute under `root` (default: `run_root()`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
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
    raw = resolve_paths(raw, root or run_root())
    refuse_ray_working_dir(raw)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        lines = [f"{path}: invalid config"]
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            lines.append(f"  {key}: {problem['msg']}")
        raise ConfigError("\n".join(lines)) from None
