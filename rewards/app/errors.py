"""Every error leaves as JSON `{"error": code, "message": ..., "item": index or null}`, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rewards.app.schemas import ErrorBody
from rewards.errors import RewardInputError

log = logging.getLogger(__name__)


UNAUTHORIZED_MESSAGE = "missing or wrong bearer token (Authorization: Bearer <token>)"
"""The 401 message of a missing or wrong token (the run dashboard answers with the same)."""
BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
"""A 401's header naming the scheme that would succeed (RFC 7235 requires one on every 401)."""


class ApiError(Exception):
    """An error with an HTTP status, a machine code, a human message and the item it concerns."""

    def __init__(self, status: int, code: str, message: str, item: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.item, self.headers = status, code, message, item, headers


def error_response(status: int, code: str, message: str, item: int | None = None, headers=None) -> JSONResponse:
    body = ErrorBody(error=code, message=message, item=item)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _item_index(loc: tuple) -> int | None:
    """The item index in a pydantic error location like ("body", "items", 3, "image")."""
    for key, value in zip(loc, loc[1:]):
        if key == "items" and isinstance(value, int):
            return value
    return None


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}")
    loc = tuple(first.get("loc", ()))
    where = ".".join(str(part) for part in loc[1:]) or "body"
    message = f"{where}: {first.get('msg')}"
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problems)"
    return error_response(422, "invalid_request", message, _item_index(loc))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.item, headers=exc.headers)


async def _input_error(request: Request, exc: RewardInputError) -> JSONResponse:
    return error_response(422, exc.code, exc.message, exc.item)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RewardInputError, _input_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
