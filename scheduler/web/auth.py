"""Who may read the pages: anyone on this machine, or whoever holds the access token.

The pages show source images and model behaviour, which may be confidential, so a server
reachable from other machines must not start without a token. Without a token, requests must
also name this machine in their ``Host`` header (``localhost``, ``127.0.0.1``, ``::1``): a web
page on another site could otherwise point a name it controls at 127.0.0.1 (DNS rebinding)
and read the pages from the visitor's browser. A browser cannot send an
``Authorization`` header by itself, so ``?token=`` is accepted once: the answer sets an
HttpOnly cookie and redirects to the same page without the token, which keeps it out of the
address bar, the history and ``Referer`` headers. Scripts send ``Authorization: Bearer``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

__all__ = [
    "COOKIE",
    "READ_METHODS",
    "RedactToken",
    "WebConfigError",
    "check_exposure",
    "is_loopback",
    "token_guard",
]

COOKIE = "camaudit_token"
READ_METHODS = frozenset({"GET", "HEAD"})
OPEN_PATHS = frozenset({"/healthz"})
MIN_TOKEN_LENGTH = 8


class WebConfigError(ValueError):
    """The server would start in a way that exposes data or cannot work."""


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse a server other machines can reach unless it has a token, and refuse weak tokens."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise WebConfigError(
            f"the access token is {len(token)} characters long; use at least {MIN_TOKEN_LENGTH}, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
        )
    if token is None and not is_loopback(host):
        raise WebConfigError(
            f"--host {host} lets other machines read the runs, so an access token is required: "
            "pass --token TOKEN or set CAMAUDIT_WEB_TOKEN, or bind to 127.0.0.1 / localhost / ::1"
        )


_BRACKETED_HOST = re.compile(r"\[([^\[\]]*)\](?::[0-9]+)?")


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``.

    A bracketed name that is not ``[address]`` or ``[address]:port`` gives no name at all, so a
    malformed header is refused rather than guessed at.
    """
    header = header.strip()
    if header.startswith("["):
        bracketed = _BRACKETED_HOST.fullmatch(header)
        return bracketed.group(1) if bracketed else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _refuse(message: str) -> Response:
    return PlainTextResponse(message, status_code=401, headers={"WWW-Authenticate": "Bearer"})


Handler = Callable[[Request], Awaitable[Response]]


def token_guard(token: str | None) -> Callable[[Request, Handler], Awaitable[Response]]:
    """HTTP middleware: only reads, and with a token, only for requests that carry it."""

    async def guard(request: Request, call_next: Handler) -> Response:
        if request.method not in READ_METHODS:
            return PlainTextResponse(
                f"{request.method} is not allowed: this server is read-only (GET and HEAD only)",
                status_code=405,
                headers={"Allow": "GET, HEAD"},
            )
        if token is None:
            host = request.headers.get("host", "")
            if not is_loopback(_host_name(host)):
                return PlainTextResponse(
                    "this server has no access token, so it answers only requests for localhost, "
                    f"127.0.0.1 or [::1], not Host {host[:100]!r}; start it with --token to serve "
                    "other names",
                    status_code=400,
                )
            return await call_next(request)
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        given = request.query_params.get("token")
        if given is not None:
            if not _matches(given, token):
                return _refuse("the token in ?token= is not this server's access token")
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            answer = RedirectResponse(target, status_code=303)
            answer.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
            return answer
        bearer = _bearer(request)
        if bearer is not None:
            if _matches(bearer, token):
                return await call_next(request)
            return _refuse("the bearer token is not this server's access token")
        if _matches(request.cookies.get(COOKIE), token):
            return await call_next(request)
        return _refuse(
            "this server needs its access token: open any page once with ?token=TOKEN "
            "(a cookie keeps you signed in) or send the header 'Authorization: Bearer TOKEN'"
        )

    return guard


_TOKEN_IN_URL = re.compile(r"(?<=[?&]token=)[^&\s\"]*")


class RedactToken(logging.Filter):
    """Access logs print each request's query string; the one carrying ``?token=`` must not leak."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_URL.sub("***", a) if isinstance(a, str) else a for a in record.args)
        return True
