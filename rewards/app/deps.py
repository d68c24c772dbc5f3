"""FastAPI dependencies: settings, auth, limits, and the scorers (tests override the latter)."""

from __future__ import annotations

import hmac
from typing import Annotated, Protocol

import numpy as np
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rewards.app.batching import Batcher
from rewards.app.errors import BEARER_CHALLENGE, UNAUTHORIZED_MESSAGE, ApiError
from rewards.app.settings import Settings
from rewards.geneval_rules import GenevalMetadata, GenevalResult
from rewards.ocr import OcrResult
from rewards.scorer import ServedScorer

_bearer = HTTPBearer(auto_error=False, description="Bearer token, when the server was started with one")


class OcrScorerLike(Protocol):
    def score(self, images: list[np.ndarray], targets: list[str]) -> list[OcrResult]: ...


class GenevalScorerLike(Protocol):
    def score(self, images: list[np.ndarray], metadatas: list[GenevalMetadata]) -> list[GenevalResult]: ...


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """401 unless the server has no token or the request carries the right one."""
    token = get_settings(request).token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE, headers=BEARER_CHALLENGE)


def check_item_count(count: int, settings: Settings) -> None:
    if count > settings.max_items:
        raise ApiError(
            413, "too_many_items", f"{count} items in one request; the limit is {settings.max_items}", settings.max_items
        )


def _scorer(request: Request, name: str):
    """The scorer; 503 while the server loads (retry), 404 if it does not run it (retrying cannot help)."""
    if not request.app.state.ready:
        raise ApiError(503, "loading", "the scorers are still loading; retry shortly")
    scorer = request.app.state.scorers.get(name)
    if scorer is None:
        running = ", ".join(sorted(request.app.state.scorers)) or "none"
        raise ApiError(404, "scorer_not_loaded",
                       f"this server does not run the {name} scorer; it runs: {running} (rewards serve --scorers)")
    return scorer


def get_ocr_scorer(request: Request) -> OcrScorerLike:
    return _scorer(request, "ocr")


def get_geneval_scorer(request: Request) -> GenevalScorerLike:
    return _scorer(request, "geneval")


def get_generic_scorer(request: Request, name: str) -> ServedScorer:
    """A generic scorer (not a route-specific one such as ocr/geneval); 404 like `_scorer`."""
    scorer = _scorer(request, name)
    if not isinstance(scorer, ServedScorer):
        raise ApiError(404, "scorer_not_loaded", f"{name} has its own route, not /v1/rewards/{{name}}")
    return scorer


def get_batcher(request: Request) -> Batcher:
    return request.app.state.batchers[request.url.path]


SettingsDep = Annotated[Settings, Depends(get_settings)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
