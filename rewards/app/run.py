"""`blip3o-rl rewards serve`: flags -> Settings -> uvicorn. Unset flags fall back to the
`BLIP3O_RL_REWARDS_*` environment variables (e.g. the token), then to the defaults."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from pydantic import ValidationError

log = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument("--scorers", help="comma-separated: ocr, geneval, compressibility, incompressibility, clipscore, pickscore, aesthetic (default ocr,geneval)")
    parser.add_argument("--token", help="require this bearer token (or BLIP3O_RL_REWARDS_TOKEN)")
    parser.add_argument("--ocr-size", choices=["small", "tiny"], help="PP-OCRv6 model size (default small)")
    parser.add_argument("--max-items", type=int, help="most items per request (default 64)")
    parser.add_argument("--batch-size", type=int, help="most items per model call (default 16)")
    parser.add_argument("--detector", help="Mask2Former checkpoint (hub id or directory)")
    parser.add_argument("--clip", help="CLIP checkpoint (hub id or directory)")
    parser.add_argument("--python-scorer", action="append", metavar="NAME=MODULE:FUNCTION",
                        help="serve a user function f(images, prompts, metadatas) as /v1/rewards/NAME (repeatable)")


class UserError(Exception):
    """Bad flags or a missing model: one line, exit 2."""


def settings_from_args(args: argparse.Namespace):
    from rewards.app.settings import Settings

    given = {key: getattr(args, key) for key in ("host", "port", "token", "max_items", "batch_size")}
    overrides = {key: value for key, value in given.items() if value is not None}
    if args.scorers is not None:
        overrides["scorers"] = [name.strip() for name in args.scorers.split(",") if name.strip()]
    if args.python_scorer:
        pairs = [entry.partition("=") for entry in args.python_scorer]
        if any(not name or not spec for name, _, spec in pairs):
            raise UserError("--python-scorer wants NAME=module:function")
        overrides["python_scorers"] = {name: spec for name, _, spec in pairs}
    if args.ocr_size is not None:
        overrides["ocr"] = {"size": args.ocr_size}
    geneval = {key: getattr(args, key) for key in ("detector", "clip") if getattr(args, key) is not None}
    if geneval:
        overrides["geneval"] = geneval
    try:
        return Settings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"invalid setting {where}: {first['msg']}") from None


def warn_if_open(host: str, token, what: str) -> None:
    """A warning on stderr when `host` is not a loopback address and there is no token (the reward
    API's and the dashboard's start)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and token is None:
        print(f"blip3o-rl: warning: {what} on {host} without a token", file=sys.stderr)


def serve_from_args(args: argparse.Namespace) -> None:
    """Load the scorers, then serve until interrupted."""
    import uvicorn

    from policy.model_dir import CheckpointNotFoundError
    from rewards.app.main import create_app, load_scorers

    try:
        settings = settings_from_args(args)
        warn_if_open(settings.host, settings.token, "serving")
        try:
            scorers = load_scorers(settings)  # before binding: a missing model is an error, not a half-up server
        # ValueError: a python scorer (--python-scorer) that does not import
        except (FileNotFoundError, OSError, ValueError, CheckpointNotFoundError) as error:
            raise UserError(f"cannot load scorers: {error}") from None
    except UserError as error:
        print(f"blip3o-rl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    uvicorn.run(create_app(settings, scorers), host=settings.host, port=settings.port, log_level="info")
