"""The dashboard's optional bearer token: the reward API's (rewards/app/deps.py), plus a cookie so a
browser can use the page.

Scripts send `Authorization: Bearer <token>`, as to the reward API, and get the same 401 body
(`{"error": "unauthorized", ...}`) without it. A browser cannot put a header on the page's `<img>`
requests, so the page asks for the token once (the login page below), posts it as that header to
`POST /api/session`, and gets a cookie the browser then sends with every request of this origin:

    cookie = HMAC-SHA256(key = token, message = "blip3o-rl dashboard session"), hex

HttpOnly (the page's scripts never see it), SameSite=Strict (no other site's page can use it),
Secure when served over https, no expiry (gone when the browser closes). It is derived, not the
token: a cookie that leaks does not open the reward API when both share a token. The token is never
accepted in a URL: query strings end up in access logs, browser history and Referer headers.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from rewards.app.errors import BEARER_CHALLENGE, UNAUTHORIZED_MESSAGE, error_response

COOKIE = "blip3o_rl_dashboard_session"

_bearer = HTTPBearer(auto_error=False, description="Bearer token, when the dashboard was started with one")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


class Unauthorized(Exception):
    """No token, or a wrong one, on a protected route."""


def session_value(token: SecretStr) -> str:
    """The cookie a browser holds for `token` (module docstring)."""
    return hmac.new(token.get_secret_value().encode(), b"blip3o-rl dashboard session", hashlib.sha256).hexdigest()


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _bearer_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    return credentials.credentials if credentials is not None else ""


def authorized(request: Request, credentials: Credentials) -> bool:
    """True when the dashboard has no token, or the request carries it (header) or its session cookie."""
    token: SecretStr | None = request.app.state.token
    return (token is None or _equal(_bearer_token(credentials), token.get_secret_value())
            or _equal(request.cookies.get(COOKIE, ""), session_value(token)))


def require_token(request: Request, credentials: Credentials) -> None:
    """401 unless `authorized` (every /api route but the session's)."""
    if not authorized(request, credentials):
        raise Unauthorized()


def require_bearer(request: Request, credentials: Credentials) -> None:
    """401 unless the dashboard has no token or the request carries the token itself (what opens a session)."""
    token: SecretStr | None = request.app.state.token
    if token is not None and not _equal(_bearer_token(credentials), token.get_secret_value()):
        raise Unauthorized()


def unauthorized_response(request: Request, error: Unauthorized) -> JSONResponse:
    """The reward API's 401 body (rewards/app/errors.py), with the Bearer challenge."""
    return error_response(401, "unauthorized", UNAUTHORIZED_MESSAGE, headers=BEARER_CHALLENGE)


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>blip3o-rl dashboard</title><link rel="icon" href="data:,">
<style>body{font:15px system-ui,sans-serif;margin:15vh auto;max-width:22em}input,button{font:inherit;padding:.3em}
#error{color:#b00}</style></head>
<body><h1>blip3o-rl</h1><p>This dashboard needs its token (the one it was started with).</p>
<form id="login"><input id="token" type="password" autocomplete="current-password" placeholder="token" required>
<button type="submit">Open</button></form><p id="error" role="alert"></p>
<script>
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = document.getElementById("token").value;
  const answer = await fetch("/api/session", {method: "POST", headers: {Authorization: `Bearer ${token}`}});
  if (answer.ok) location.reload();
  else document.getElementById("error").textContent = "wrong token";
});
</script></body></html>
"""


def login_page() -> HTMLResponse:
    """What a browser without the session gets for the page: 401 and a form asking for the token."""
    return HTMLResponse(LOGIN_PAGE, status_code=401, headers={**BEARER_CHALLENGE, "Cache-Control": "no-store"})


def session_response(request: Request) -> Response:
    """204 with the session cookie (no cookie when the dashboard has no token)."""
    response = Response(status_code=204)
    token: SecretStr | None = request.app.state.token
    if token is not None:
        response.set_cookie(COOKIE, session_value(token), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
    return response
