"""`blip3o-rl` command line: one entry point, a subcommand per job.

User errors (missing checkpoint, bad config) print one clear line and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _make_tiny(args: argparse.Namespace) -> None:
    from policy.tiny import PRESETS, make_tiny

    paths = make_tiny(Path(args.directory), PRESETS[args.preset])
    print(f"wrote tiny '{args.preset}' model to {paths.root}")


def _make_tiny_geneval(args: argparse.Namespace) -> None:
    from rewards.tiny import make_tiny_geneval_models

    detector, clip = make_tiny_geneval_models(Path(args.directory))
    print(f"wrote tiny GenEval models: detector {detector}, clip {clip}")


def _convert_blip3o_next(args: argparse.Namespace) -> None:
    from policy.convert import ConversionError, convert_blip3o_next

    try:
        convert_blip3o_next(args.source, Path(args.out), sana=args.sana, tokens_per_image=args.tokens_per_image,
                            ta_tok=args.ta_tok)
    except ConversionError as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _plan(args: argparse.Namespace) -> None:
    from rl.memory_plan import run_plan
    from rl.run.config import ConfigError

    try:
        report, verdict = run_plan(args.config, args.model_shape, args.device_gib, args.host_gib)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report)
    if not verdict.fits:
        for problem in verdict.problems:
            print(f"blip3o-rl: does not fit: {problem}", file=sys.stderr)
        raise SystemExit(2)
    print("\nfits")


def _dashboard(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from deploy.dashboard.app import serve
    from deploy.dashboard.settings import DashboardSettings

    given = {key: getattr(args, key) for key in ("runs_dir", "host", "port", "token")}
    try:  # a flag wins; an unset one falls back to BLIP3O_RL_DASHBOARD_*, then to the default
        settings = DashboardSettings(**{key: value for key, value in given.items() if value is not None})
    except ValidationError as error:
        first = error.errors()[0]
        print(f"blip3o-rl: error: invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    serve(settings)


def _export_tensorboard(args: argparse.Namespace) -> None:
    from deploy.dashboard.tensorboard_export import export_tensorboard
    from rl.run_store import RunStore, UnknownRunError

    store = RunStore(Path(args.runs_dir))
    try:
        written = export_tensorboard(store, args.run_id, Path(args.out))
    except UnknownRunError as error:
        print(f"blip3o-rl: error: {error} in {args.runs_dir}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote TensorBoard events for {args.run_id} to {written}")


def _rewards_serve(args: argparse.Namespace) -> None:
    from rewards.app.run import serve_from_args

    serve_from_args(args)


def _rewards_loadtest(args: argparse.Namespace) -> None:
    import httpx

    from rewards.loadtest import LoadTestError, run_load_test

    try:
        report = run_load_test(
            args.url, args.clients, args.seconds, token=args.token, server_pid=args.server_pid, seed=args.seed,
            max_items=args.max_items,
        )
    except httpx.TransportError as error:
        print(f"blip3o-rl: error: cannot reach {args.url}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except LoadTestError as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report.to_json())
    if not report.ok:
        raise SystemExit(1)


def _prompts(args: argparse.Namespace) -> None:
    from rl.prompts.generators import PromptSetError, write_prompt_set

    try:
        write_prompt_set(args.prompts_command, Path(args.out), args.n, args.seed)
    except PromptSetError as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _prompts_edit(args: argparse.Namespace) -> None:
    from rl.prompts.edit_synthetic import write_edit_set
    from rl.prompts.generators import PromptSetError

    try:
        write_edit_set(Path(args.out), args.n, args.seed, args.split, words=args.words or (),
                       targets=args.targets or ())
    except PromptSetError as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _eval(args: argparse.Namespace) -> None:
    from rl.evaluation.command import main as eval_main

    eval_main(args)


def _export(args: argparse.Namespace) -> None:
    from policy.lora import export_merged

    if not args.merge:
        print("blip3o-rl: error: export needs --merge (a LoRA checkpoint's policy/ is already the adapter vLLM "
              "serves as a LoRARequest; --merge folds it into a model directory)", file=sys.stderr)
        raise SystemExit(2)
    try:
        out = export_merged(Path(args.source), Path(args.out), base=args.base)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote the merged model directory {out}")


def _rehearse(args: argparse.Namespace) -> None:
    from rl.rehearsal.command import main as rehearse_main

    raise SystemExit(rehearse_main(args))


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight model directory")
    tiny.add_argument("directory")
    from policy.tiny import PRESETS

    tiny.add_argument("--preset", choices=sorted(PRESETS), default="sana",
                      help="sana/glyph: tiny CPU models; blip3o-next-shape: BLIP3o-NEXT's real widths, 2 layers deep")
    tiny.set_defaults(run=_make_tiny)

    tiny_geneval = sub.add_parser("make-tiny-geneval", help="write tiny random Mask2Former + CLIP GenEval models")
    tiny_geneval.add_argument("directory")
    tiny_geneval.set_defaults(run=_make_tiny_geneval)

    convert = sub.add_parser("convert-blip3o-next", help="convert a BLIP3o-NEXT hub checkpoint into a model directory")
    convert.add_argument("source", help="checkpoint dir or hub id, e.g. BLIP3o/BLIP3o-NEXT-SFT-3B")
    convert.add_argument("out", help="model directory to write (must not exist)")
    convert.add_argument("--sana", help="SANA diffusers dir or hub id, e.g. Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers "
                         "(default: the checkpoint's diffusion_name_or_path; the public checkpoints say DIFFUSION there, "
                         "so pass it)")
    convert.add_argument("--tokens-per-image", type=int, default=729, help="image tokens per image (default 729)")
    convert.add_argument("--ta-tok", help="keep the TA-Tok image tokenizer (edit prompts need it): a ta_tok.pth, its "
                         "directory, or the hub id csuhan/TA-Tok (default: the tower is dropped)")
    convert.set_defaults(run=_convert_blip3o_next)

    plan = sub.add_parser("plan", help="memory each role of a config needs, and whether it fits (exit 2 if not)")
    plan.add_argument("--config", required=True, help="run config (YAML)")
    plan.add_argument("--model-shape", help="plan for this shape instead of reading the model directory: "
                      "blip3o-next-3b (full depth) or a make-tiny preset (needed when the directory does not exist)")
    plan.add_argument("--device-gib", type=float, default=80.0, help="memory of each GPU (default 80: A100/H100 80GB)")
    plan.add_argument("--host-gib", type=float, help="RAM shared by the CPU roles (default: this machine's MemTotal)")
    plan.set_defaults(run=_plan)

    # listed for --help; main() hands `train ...` to rl.run.train's own parser untouched
    sub.add_parser("train", help="run GRPO: blip3o-rl train --config FILE [--resume [RUN_ID]]")

    dashboard = sub.add_parser("dashboard", help="serve the live dashboard over a runs directory")
    dashboard.add_argument("--runs-dir", help="directory holding runs.db (default: runs)")
    dashboard.add_argument("--host", help="interface to bind (default: 127.0.0.1, loopback)")
    dashboard.add_argument("--port", type=int, help="TCP port (default: 8266; Ray's own is 8265)")
    dashboard.add_argument("--token", help="require this bearer token on the API and the page (default: none, open); "
                           "prefer BLIP3O_RL_DASHBOARD_TOKEN: a flag shows in the process list")
    dashboard.set_defaults(run=_dashboard)

    export = sub.add_parser("export-tensorboard", help="write a run's metrics as TensorBoard event files")
    export.add_argument("--runs-dir", default="runs")
    export.add_argument("--run", dest="run_id", required=True, help="run id (see the dashboard or /api/runs)")
    export.add_argument("--out", required=True, help="TensorBoard log directory")
    export.set_defaults(run=_export_tensorboard)

    rewards = sub.add_parser("rewards", help="reward service (GenEval, OCR)")
    rewards_sub = rewards.add_subparsers(dest="rewards_command", required=True)
    rewards_serve = rewards_sub.add_parser("serve", help="serve the reward REST API (uvicorn)")
    from rewards.app.run import add_serve_arguments

    add_serve_arguments(rewards_serve)
    rewards_serve.set_defaults(run=_rewards_serve)
    loadtest = rewards_sub.add_parser("loadtest", help="load a running reward server; print the report as JSON")
    loadtest.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    loadtest.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    loadtest.add_argument("--seconds", type=float, default=60.0, help="how long each client sends (default 60)")
    loadtest.add_argument("--token", help="the server's bearer token, if it has one")
    loadtest.add_argument("--server-pid", type=int, help="server process id, to sample its memory (RSS)")
    loadtest.add_argument("--seed", type=int, default=0, help="seed of the items and of the request mix")
    loadtest.add_argument("--max-items", type=int, default=64, help="the server's --max-items (default 64)")
    loadtest.set_defaults(run=_rewards_loadtest)

    evaluation = sub.add_parser("eval", help="benchmark a model or run checkpoint: GenEval, OCR or edits (resumable)")
    from rl.evaluation.command import add_arguments as add_eval_arguments

    add_eval_arguments(evaluation)
    evaluation.set_defaults(run=_eval)

    export_model = sub.add_parser("export", help="a LoRA run's adapter merged into a model directory (--merge)")
    export_model.add_argument("source", help="a run checkpoint (runs/checkpoints/<run_id>/step-N) or an adapter dir")
    export_model.add_argument("out", help="model directory to write (must not exist)")
    export_model.add_argument("--merge", action="store_true", help="merge the adapter into the base model's AR weights")
    export_model.add_argument("--base", help="base model directory (default: the one named in adapter_config.json)")
    export_model.set_defaults(run=_export)

    rehearse = sub.add_parser("rehearse", help="run a GPU config on this CPU (tiny models, gloo, small counts; "
                              "precision, transports and streams kept); exit 0 if it completes and log-probs agree")
    from rl.rehearsal.command import add_arguments as add_rehearse_arguments

    add_rehearse_arguments(rehearse)
    rehearse.set_defaults(run=_rehearse)

    prompts = sub.add_parser("prompts", help="write a training prompt set disjoint from every evaluation set")
    prompts_sub = prompts.add_subparsers(dest="prompts_command", required=True)
    for kind, help_text, default_n in (
        ("geneval", "GenEval metadata lines by Flow-GRPO's recipe (GenEval's generator, tag weights)", 5000),
        ("ocr", "text-rendering prompts, each with its target text in double quotes", 4000),
    ):
        maker = prompts_sub.add_parser(kind, help=help_text)
        maker.add_argument("--out", required=True, help="file to write (replaced if it exists)")
        maker.add_argument("--n", type=_at_least_one, default=default_n, help=f"lines to write (default {default_n})")
        maker.add_argument("--seed", type=int, default=0, help="the same seed writes the same file (default 0)")
        maker.set_defaults(run=_prompts)
    edit = prompts_sub.add_parser("edit", help="synthetic edits for the CPU demos: rendered words, masks, "
                                               "'change the word X to Y' (train and eval use disjoint words)")
    edit.add_argument("--out", required=True, help="JSONL to write (replaced); images/ and masks/ go beside it")
    edit.add_argument("--n", type=_at_least_one, default=256, help="edits to write (default 256)")
    edit.add_argument("--seed", type=int, default=0, help="the same seed writes the same set (default 0)")
    edit.add_argument("--split", choices=["train", "eval"], default="train",
                      help="train: the training words; eval: the evaluation words (default train)")
    edit.add_argument("--words", nargs="+", help="source words instead of the split's (a row holds two of them)")
    edit.add_argument("--targets", nargs="+", help="words the edits change to (default: three distinct source words "
                                                    "an edit); each must fit the tiles of the word it replaces")
    edit.set_defaults(run=_prompts_edit)
    return parser


def main(argv: list[str] | None = None) -> None:
    from policy.model_dir import CheckpointNotFoundError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from rl.run.train import main as train_main

        raise SystemExit(train_main(argv[1:], prog="blip3o-rl train"))  # its usage line and resume hint
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CheckpointNotFoundError as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
