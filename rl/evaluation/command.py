"""`blip3o-rl eval`: resolve what to evaluate, start the workers and a reward API, run `rl.evaluation.harness`.

    --model DIR              a blip3o-rl model directory (or hub id): its own weights, version 0
    --model RUN_DIR[:STEP]   runs/checkpoints/<run_id>: the run's base model loaded by the workers,
                             then the checkpoint's `policy/` weights pushed into them with
                             `update_weights(version)`, the path trained weights always take;
                             the latest complete checkpoint unless STEP is given
    --model RUN_DIR/step-N   one checkpoint directly

`--bench edit --data FILE [--format F]` evaluates edits (rl/evaluation/edit_bench.py): each line's
source image and instruction through the same workers, the edited image scored by the reward API's
consistency and edit checks, CLIP-I / CLIP-T when it serves clipscore, and a judge (`--judge-url`).

A run's base model, prompt template, sampling and decoder settings come from the config the run
store recorded for it (`runs.db` two levels above RUN_DIR), so the policy is evaluated the way it
was trained; `--base-model DIR` replaces that lookup (then the model's defaults apply).

Workers run in this process (an in-process vLLM engine, as the rollout worker always uses, and the
decoder worker): no Ray cluster to start for a one-off eval, one process to stop or resume.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from policy.model_dir import LAYOUT_FILE, CheckpointNotFoundError, resolve_model_dir


class EvalCommandError(RuntimeError):
    """A problem the user can fix (bad --model, missing run store, unreachable reward API): one line."""


@dataclass(frozen=True)
class EvalModel:
    """What the workers load and which weights go on top."""

    rollout: object
    """RolloutConfig of the engine (its `model` is the base model directory)."""
    decoder: object
    """DecoderConfig."""
    checkpoint: Path | None
    """step-N directory whose `policy/` (AR) and `diffusion_policy/` (SANA transformer) weights are
    loaded into the workers, those the run trained (None: the model's own)."""
    policy_version: int
    label: str
    """How reports name it."""
    decoder_version: int = 0
    """The checkpoint's transformer version (a run that trained the decoder)."""


def split_step(spec: str) -> tuple[str, int | None]:
    """'runs/checkpoints/r1:20' -> ('runs/checkpoints/r1', 20); a spec without :DIGITS is left whole."""
    path, sep, tail = spec.rpartition(":")
    return (path, int(tail)) if sep and tail.isdigit() else (spec, None)


def resolve_eval_model(spec: str, *, base_model: str | None = None) -> EvalModel:
    from rl.checkpoint import TRAINER_FILE, CheckpointDir
    from rollout.config import RolloutConfig
    from rollout.decoder_config import DecoderConfig

    path_text, step = split_step(spec)
    path = Path(path_text).expanduser()
    if (path / LAYOUT_FILE).is_file() or not path.exists():
        if step is not None:
            raise EvalCommandError(f"'{path}' is a model directory, not a run directory: ':{step}' means nothing there")
        model_dir = str(resolve_model_dir(path_text).root.resolve())
        return EvalModel(RolloutConfig(model=model_dir), DecoderConfig(model=model_dir), None, 0, model_dir)
    if (path / TRAINER_FILE).is_file():  # a step-N checkpoint itself
        if step is not None:
            raise EvalCommandError(f"'{path}' is already one checkpoint; drop ':{step}'")
        checkpoint = path
    else:
        checkpoints = CheckpointDir(path)
        complete = checkpoints.complete_steps()
        if not complete:
            raise EvalCommandError(f"'{path}' is neither a model directory ({LAYOUT_FILE}) nor a run directory "
                                   "with complete checkpoints (step-N/trainer.json)")
        if step is None:  # the `latest` pointer, else the newest complete step
            checkpoint = checkpoints.latest() or checkpoints.path_for(complete[-1])
        elif step in complete:
            checkpoint = checkpoints.path_for(step)
        else:
            raise EvalCommandError(f"run directory {path} has no complete checkpoint of step {step}; complete steps: "
                                   f"{', '.join(map(str, complete))}")
    state = CheckpointDir(checkpoint.parent).load_state(checkpoint)
    if not any((checkpoint / export).is_dir() for export in ("policy", "diffusion_policy")):
        raise EvalCommandError(f"checkpoint {checkpoint} has no policy/ or diffusion_policy/ export to evaluate")
    if base_model is not None:
        model_dir = str(resolve_model_dir(base_model).root.resolve())
        rollout, decoder = RolloutConfig(model=model_dir), DecoderConfig(model=model_dir)
    else:
        rollout, decoder = run_configs(checkpoint.parent.parent.parent, state.run_id)
    label = f"{checkpoint.resolve()} (run {state.run_id}, step {state.step}) on {rollout.model}"
    return EvalModel(rollout, decoder, checkpoint, state.policy_version, label, state.decoder_version)


def run_configs(runs_dir: Path, run_id: str):
    """The rollout engine and decoder configs the run store recorded for `run_id`."""
    from pydantic import ValidationError

    from rl.run_store import DB_NAME, RunStore, UnknownRunError
    from rollout.config import RolloutConfig
    from rollout.decoder_config import DecoderConfig

    store = RunStore.existing(runs_dir)
    if store is None:
        raise EvalCommandError(f"no run store ({runs_dir / DB_NAME}) to find run {run_id}'s base model in; "
                               "pass --base-model DIR")
    try:
        config = store.get_run(run_id).config
    except UnknownRunError:
        raise EvalCommandError(f"run {run_id} is not in {runs_dir / DB_NAME}; pass --base-model DIR") from None
    try:
        return (RolloutConfig.model_validate(config["rollout"]["engine"]),
                DecoderConfig.model_validate(config["decoder"]["decoder"]))
    except (KeyError, TypeError, ValidationError) as error:
        raise EvalCommandError(f"run {run_id}'s recorded config has no usable rollout.engine / decoder.decoder "
                               f"({type(error).__name__}); pass --base-model DIR") from None


def load_policy_weights(policy_dir: Path) -> dict:
    """{hf_name: tensor} of a checkpoint's Hugging Face export (all its safetensors shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(policy_dir).glob("*.safetensors"))
    if not files:
        raise EvalCommandError(f"no *.safetensors weights in {policy_dir}")
    weights: dict = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def start_workers(model: EvalModel):
    """In-process rollout and decoder workers serving `model` (checkpoint weights loaded)."""
    from rl.evaluation.harness import LocalWorkers
    from rollout.ar_worker import ARRolloutWorker
    from rollout.decoder_worker import DiffusionDecoderWorker

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # progress lines, not engine INFO lines
    rollout = ARRolloutWorker(model.rollout)
    decoder = DiffusionDecoderWorker(model.decoder)
    if model.checkpoint is not None and (model.checkpoint / "policy").is_dir():  # absent: the AR policy was frozen
        weights = load_policy_weights(model.checkpoint / "policy")
        rollout.update_weights(model.policy_version, weights)
        decoder.update_weights(model.policy_version, weights)
    if model.checkpoint is not None and (model.checkpoint / "diffusion_policy").is_dir():  # the trained transformer
        decoder.update_decoder_weights(model.decoder_version, load_policy_weights(model.checkpoint / "diffusion_policy"))
    return LocalWorkers(rollout, decoder)


def server_flags(args: argparse.Namespace, edit_scorers: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `rewards serve` flags and extra environment of the server an eval starts for its bench.
    Edit: `edit_scorers` (what the lines need, consistency at least); with --clip, that CLIP as
    consistency's (CLIP-I) and as clipscore without its "A photo depicts " prefix (CLIP-T is the plain cosine)."""
    if args.bench != "edit":
        flags = ["--scorers", args.bench]
        flags += ["--ocr-size", args.ocr_size] if args.bench == "ocr" else []
        flags += [f for key in ("detector", "clip") if getattr(args, key) for f in (f"--{key}", getattr(args, key))]
        return flags, {}
    scorers = ",".join(dict.fromkeys(["consistency", *edit_scorers]))
    env = {"BLIP3O_RL_REWARDS_CONSISTENCY__CLIP__MODEL": args.clip, "BLIP3O_RL_REWARDS_CLIPSCORE__MODEL": args.clip,
           "BLIP3O_RL_REWARDS_CLIPSCORE__PREFIX": ""} if args.clip else {}
    return ["--scorers", scorers, "--ocr-size", args.ocr_size], env


def reward_endpoint(args: argparse.Namespace, log: Path, edit_scorers: list[str] | None = None):
    """(endpoint, server to stop or None, the scorers it serves): --reward-url, else a `rewards serve`
    child of this process. The edit bench's API must serve `edit_scorers` (but clipscore: without it
    the eval asks for no CLIP metric)."""
    from rewards.client import RewardClient
    from rewards.local_server import start_reward_server
    from rl.scoring.service import RewardEndpoint

    server = None
    url = args.reward_url
    if url is None:
        flags, extra_env = server_flags(args, edit_scorers or [])
        env = {**os.environ, **extra_env,
               **({"BLIP3O_RL_REWARDS_TOKEN": args.reward_token} if args.reward_token else {})}
        try:
            server = start_reward_server(flags, env=env, log=log)
        except RuntimeError as error:
            raise EvalCommandError(f"could not start a reward server ({' '.join(flags)}): {error}") from None
        url = server.url

    async def ask():
        async with RewardClient(url, token=args.reward_token, retry_budget_s=60.0) as client:
            return await client.readiness()

    try:
        readiness = asyncio.run(ask())
    except Exception as error:
        if server:
            server.stop()
        raise EvalCommandError(f"reward API at {url} did not answer /readyz: {error}") from None
    needed = [name for name in edit_scorers or [] if name != "clipscore"] if args.bench == "edit" else [args.bench]
    missing = [name for name in needed if name not in readiness.scorers]
    if missing:
        if server:
            server.stop()
        raise EvalCommandError(f"the reward API at {url} runs {readiness.scorers}, not {', '.join(missing)}")
    endpoint = RewardEndpoint(url=url, token=args.reward_token, timeout_s=args.reward_timeout, outage_budget_s=300.0,
                              backoff_s=0.5, limits=readiness.limits)
    return endpoint, server, list(readiness.scorers)


def apply_overrides(model: EvalModel, args: argparse.Namespace) -> EvalModel:
    """--device / --dtype / --threads on both workers (CPU float32 by default; the run's values for a run)."""
    engine, decoder = {}, {}
    for key in ("device", "dtype"):
        if getattr(args, key):
            engine[key] = decoder[key] = getattr(args, key)
    if args.threads:
        engine["num_threads"] = decoder["num_threads"] = args.threads
    return EvalModel(model.rollout.model_copy(update=engine), model.decoder.model_copy(update=decoder),
                     model.checkpoint, model.policy_version, model.label, model.decoder_version)


def _stop_started_server(pending) -> None:
    """The workers failed: stop the reward server this eval started, if it came up at all."""
    try:
        _, server, _ = pending.result()
    except Exception:
        return
    if server:
        server.stop()


def edit_data(args: argparse.Namespace):
    """The edit bench's EditData from --data / --format / --images / --language (None for the other benches)."""
    from rl.evaluation.edit_bench import EditData

    given = [flag for flag, value in (("--data", args.data), ("--format", args.format), ("--images", args.images))
             if value is not None]
    if args.bench != "edit":
        if given:
            raise EvalCommandError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --bench edit")
        return None
    if args.data is None:
        raise EvalCommandError("--bench edit needs --data FILE (an edit JSONL, ImgEdit's JSON, GEdit-Bench's "
                               "parquet or PIE-Bench's mapping_file.json)")
    if args.prompts is not None:
        raise EvalCommandError("--bench edit reads --data, not --prompts")
    return EditData(path=Path(args.data).resolve(), format=args.format,
                    images=Path(args.images).resolve() if args.images else None,
                    language=None if args.language == "all" else args.language)


def run(args: argparse.Namespace) -> int:
    from rl.evaluation.edit_bench import EditScoring, needed_scorers
    from rl.evaluation.harness import EvalMismatchError, EvalProgress, EvalSpec, SampleStore, edit_lines, evaluate
    from rl.prompts.edit import EditDataError

    out = Path(args.out)
    if out.suffix != ".json":
        raise EvalCommandError(f"--out must name a .json file, got {out}")
    results_dir = out.with_suffix("")
    data = edit_data(args)  # flag mistakes before anything resolves or loads
    model = apply_overrides(resolve_eval_model(args.model, base_model=args.base_model), args)
    flags = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    sampling = model.rollout.sampling.model_copy(update={k: v for k, v in flags.items() if v is not None})
    spec = EvalSpec(bench=args.bench, model=model.label, images_per_prompt=args.images_per_prompt, limit=args.limit,
                    seed=args.seed, sampling=sampling, chunk_images=args.chunk_images,
                    prompt_file=Path(args.prompts).resolve() if args.prompts else None, edit_data=data)
    store = SampleStore(results_dir)
    edit_scorers: list[str] = []
    try:  # before any model loads: a directory of another eval is refused at once, and so is a bad edit file
        store.open(spec.identity(model.policy_version))
        if spec.edit_data is not None:
            edit_scorers = needed_scorers([line for _, line in edit_lines(spec, results_dir / "data")], bool(args.clip))
    except (EvalMismatchError, EditDataError) as error:
        raise EvalCommandError(str(error)) from None
    results_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:  # the reward server loads its models while the workers load theirs
        pending_endpoint = pool.submit(reward_endpoint, args, results_dir / "reward_server.log", edit_scorers)
        try:
            workers = start_workers(model)
        except BaseException:
            _stop_started_server(pending_endpoint)
            raise
        endpoint, server, scorers = pending_endpoint.result()
    try:
        print(f"eval {args.bench}: workers up in {time.perf_counter() - t0:.1f} s; reward API {endpoint.url}; "
              f"results in {results_dir}", file=sys.stderr, flush=True)

        def show(p: EvalProgress) -> None:
            rate = p.new / p.seconds if p.seconds > 0 else 0.0
            left = f", about {(p.total - p.done) / rate:.0f} s left" if rate > 0 and p.done < p.total else ""
            print(f"eval {args.bench}: {p.done}/{p.total} images ({100 * p.done / p.total:.0f}%), "
                  f"{rate:.2f} images/s{left}", file=sys.stderr, flush=True)

        clip = {"clipscore", "consistency"} <= set(scorers)  # CLIP-T from clipscore, CLIP-I from consistency
        scoring = EditScoring(clip=clip, judge_url=args.judge_url, judge_token=args.judge_token)
        try:
            report = evaluate(workers, endpoint, spec, store, progress=show, edit_scoring=scoring)
        except KeyboardInterrupt:
            print(f"eval interrupted; results so far are in {results_dir}: run the same command to continue",
                  file=sys.stderr, flush=True)
            return 130
    finally:
        if server:
            server.stop()
    document = {**report.model_dump(mode="json"), "results_dir": str(results_dir),
                "samples_file": str(store.samples_path), "images_dir": str(results_dir / "images")}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2))
    os.replace(tmp, out)
    print(report.markdown(), flush=True)
    print(f"\nwrote {out} ({report.images} images, {report.new_images} new)", file=sys.stderr, flush=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rl.prompts.edit_benchmarks import FORMATS

    parser.add_argument("--model", required=True,
                        help="model directory, or run directory runs/checkpoints/<run_id>[:STEP] (default: latest checkpoint)")
    parser.add_argument("--bench", required=True, choices=["geneval", "ocr", "edit"])
    parser.add_argument("--out", required=True, help="summary JSON; images and samples.jsonl go to its name without .json")
    parser.add_argument("--images-per-prompt", type=int, default=None,
                        help="default: 4 for geneval, 1 for ocr and edit")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate K prompts (spread over the GenEval tags; edit: the first K lines)")
    parser.add_argument("--prompts", default=None, help="own prompt file in the bench's format (GenEval metadata "
                        "JSONL / one quoted-text prompt a line); default: the benchmark set")
    parser.add_argument("--data", default=None, help="edit: the edit file (our JSONL, ImgEdit's JSON, GEdit-Bench's "
                        "parquet or its folder, PIE-Bench's mapping_file.json)")
    parser.add_argument("--format", default=None, choices=FORMATS,
                        help="edit: the --data file's format (default: told from the file)")
    parser.add_argument("--images", default=None, help="edit: ImgEdit's / PIE-Bench's source image folder (default: "
                        "the file's folder / annotation_images/ beside it)")
    parser.add_argument("--language", default="en", choices=["en", "cn", "all"],
                        help="edit, GEdit-Bench: the instruction language evaluated (default en)")
    parser.add_argument("--judge-url", default=None, help="edit: an http scorer answering a judge's score "
                        "(e.g. examples/vlm_judge's http://HOST:9100/score), given the instruction and source image")
    parser.add_argument("--judge-token", default=None, help="the judge's bearer token")
    parser.add_argument("--seed", type=int, default=0, help="row (p, s) uses seed + p*N + s (default 0)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the run's / 1.0")
    parser.add_argument("--top-k", type=int, default=None, help="default: the run's / the model's generation config")
    parser.add_argument("--top-p", type=float, default=None, help="default: the run's / the model's generation config")
    parser.add_argument("--chunk-images", type=int, default=16, help="images per generate/decode/score call (default 16)")
    parser.add_argument("--base-model", default=None, help="for a run directory: load this model dir instead of the "
                        "one its run store records")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda, for both workers")
    parser.add_argument("--dtype", default=None, help="float32 (default, CPU) or bfloat16 (GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the workers (default: environment)")
    parser.add_argument("--reward-url", default=None, help="a running reward API; default: start one for this eval")
    parser.add_argument("--reward-token", default=None, help="the reward API's bearer token")
    parser.add_argument("--reward-timeout", type=float, default=300.0, help="seconds per reward request (default 300)")
    parser.add_argument("--ocr-size", choices=["small", "tiny"], default="small",
                        help="started server's PP-OCRv6 size (ocr; edit: edit_ocr)")
    parser.add_argument("--detector", default=None, help="started server's Mask2Former (dir or hub id)")
    parser.add_argument("--clip", default=None, help="started server's CLIP (dir or hub id): GenEval's colour "
                        "classifier; edit: CLIP-I and CLIP-T (without it, the edit bench reports no CLIP metrics)")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> None:
    """Entry point of `blip3o-rl eval` (user errors: one line, exit 2)."""
    from pydantic import ValidationError

    signal.signal(signal.SIGTERM, _interrupt)  # a terminated eval stops its reward server and can resume
    try:
        code = run(args)
    except (EvalCommandError, CheckpointNotFoundError) as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValidationError as error:  # e.g. --limit 0, --top-p 2
        first = error.errors()[0]
        print(f"blip3o-rl: error: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    if code:
        raise SystemExit(code)
