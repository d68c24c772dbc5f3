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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a tiny random-weight model directory")
    tiny.add_argument("directory")
    tiny.add_argument("--preset", choices=["sana", "glyph"], default="sana")
    tiny.set_defaults(run=_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> None:
    from policy.model_dir import CheckpointNotFoundError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CheckpointNotFoundError as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
