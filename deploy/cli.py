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
        convert_blip3o_next(args.source, Path(args.out), sana=args.sana, tokens_per_image=args.tokens_per_image)
    except ConversionError as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _dashboard(args: argparse.Namespace) -> None:
    from deploy.dashboard.app import serve

    serve(Path(args.runs_dir), host=args.host, port=args.port)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight model directory")
    tiny.add_argument("directory")
    tiny.add_argument("--preset", choices=["sana", "glyph"], default="sana")
    tiny.set_defaults(run=_make_tiny)

    tiny_geneval = sub.add_parser("make-tiny-geneval", help="write tiny random Mask2Former + CLIP GenEval models")
    tiny_geneval.add_argument("directory")
    tiny_geneval.set_defaults(run=_make_tiny_geneval)

    convert = sub.add_parser("convert-blip3o-next", help="convert a BLIP3o-NEXT hub checkpoint into a model directory")
    convert.add_argument("source", help="checkpoint dir or hub id, e.g. BLIP3o/BLIP3o-NEXT-SFT-3B")
    convert.add_argument("out", help="model directory to write (must not exist)")
    convert.add_argument("--sana", help="SANA diffusers dir or hub id (default: the checkpoint's diffusion_name_or_path)")
    convert.add_argument("--tokens-per-image", type=int, default=729, help="image tokens per image (default 729)")
    convert.set_defaults(run=_convert_blip3o_next)

    # listed for --help; main() hands `train ...` to rl.train's own parser untouched
    sub.add_parser("train", help="run GRPO: blip3o-rl train --config FILE [--resume [RUN_ID]]")

    dashboard = sub.add_parser("dashboard", help="serve the live dashboard over a runs directory")
    dashboard.add_argument("--runs-dir", default="runs", help="directory holding runs.db (default: runs)")
    dashboard.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback; it has no login)")
    dashboard.add_argument("--port", type=int, default=8266, help="TCP port (default: 8266; Ray's own is 8265)")
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
    return parser


def main(argv: list[str] | None = None) -> None:
    from policy.model_dir import CheckpointNotFoundError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from rl.train import main as train_main

        raise SystemExit(train_main(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CheckpointNotFoundError as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
