"""The access token opens the pages only when it is given exactly, by whichever way it travels.

Each near miss (empty, a prefix, a suffix added, another case, padding) is tried as ``?token=``,
as ``Authorization: Bearer`` and as the cookie, on a server over an empty database; the exact
token must open the same page, so a refusal always means the check refused it.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from scheduler.web import create_app
from scheduler.web.auth import (
    COOKIE,
    MIN_TOKEN_LENGTH,
    RedactToken,
    WebConfigError,
    check_exposure,
    is_loopback,
    token_guard,
)
from schema.db import upgrade

TOKEN = "s3cret-token-for-tests"

NEAR_MISSES = {
    "empty": "",
    "one character": TOKEN[:1],
    "prefix": TOKEN[:-1],
    "suffix added": TOKEN + "x",
    "longer suffix": TOKEN + TOKEN,
    "upper case": TOKEN.upper(),
    "one letter's case": TOKEN[0].upper() + TOKEN[1:],
    "padded": "==" + TOKEN,
    "padded at the end": TOKEN + "==",
    "inner blank": TOKEN[:4] + " " + TOKEN[4:],
}


QUERY_REFUSED = "the token in ?token= is not this server's access token"
BEARER_REFUSED = "the bearer token is not this server's access token"
NO_TOKEN = (
    "this server needs its access token: open any page once with ?token=TOKEN "
    "(a cookie keeps you signed in) or send the header 'Authorization: Bearer TOKEN'"
)


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('auth') / 'runs.db'}"
    upgrade(url)
    return url


@pytest.fixture
def client(database: str) -> TestClient:
    return TestClient(create_app(database, token=TOKEN))


def test_the_exact_token_opens_the_page_each_way(client: TestClient, database: str) -> None:
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    by_query = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert by_query.status_code == 303 and by_query.headers["location"] == "/"
    assert client.get("/").status_code == 200, "the cookie the redirect set signs the browser in"
    with_cookie = TestClient(create_app(database, token=TOKEN))
    with_cookie.cookies.set(COOKIE, TOKEN)
    assert with_cookie.get("/").status_code == 200


@pytest.mark.parametrize("given", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_a_near_miss_in_the_query_is_refused(client: TestClient, given: str) -> None:
    answer = client.get("/", params={"token": given}, follow_redirects=False)
    assert answer.status_code == 401, answer.headers
    assert answer.text == QUERY_REFUSED and answer.headers["www-authenticate"] == "Bearer"
    assert COOKIE not in answer.headers.get("set-cookie", "")
    assert client.get("/").status_code == 401, "a refused token leaves no cookie behind"


@pytest.mark.parametrize("given", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_a_near_miss_as_bearer_is_refused(client: TestClient, given: str) -> None:
    answer = client.get("/", headers={"Authorization": f"Bearer {given}"})
    assert answer.status_code == 401
    assert answer.text == BEARER_REFUSED


@pytest.mark.parametrize("given", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_a_near_miss_in_the_cookie_is_refused(client: TestClient, given: str) -> None:
    client.cookies.set(COOKIE, given)
    answer = client.get("/")
    assert answer.status_code == 401 and answer.text == NO_TOKEN


def test_a_bare_request_is_told_how_to_sign_in(client: TestClient) -> None:
    answer = client.get("/")
    assert answer.status_code == 401 and answer.text == NO_TOKEN
    assert answer.headers["www-authenticate"] == "Bearer"


def test_a_wrong_bearer_is_not_rescued_by_a_right_cookie(client: TestClient) -> None:
    """Each credential is judged on its own: a request that sends a wrong one is refused."""
    client.cookies.set(COOKIE, TOKEN)
    assert client.get("/").status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    assert client.get("/?token=wrong-token", follow_redirects=False).status_code == 401


def test_other_schemes_are_not_a_bearer_token(client: TestClient) -> None:
    for header in (f"Basic {TOKEN}", f"Token {TOKEN}", TOKEN, f"Bearer{TOKEN}"):
        answer = client.get("/", headers={"Authorization": header})
        assert answer.status_code == 401 and answer.text == NO_TOKEN, header


def test_only_reads_pass_and_health_needs_no_token(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.head("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        answer = client.request(method, "/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 405 and answer.headers["allow"] == "GET, HEAD"
        assert answer.text == f"{method} is not allowed: this server is read-only (GET and HEAD only)"


def test_without_a_token_every_read_passes(database: str) -> None:
    open_client = TestClient(create_app(database, token=None), base_url="http://localhost")
    assert open_client.get("/").status_code == 200
    assert callable(token_guard(None))


def test_the_query_token_leaves_the_url_with_the_other_parameters_kept(client: TestClient) -> None:
    answer = client.get(f"/runs?page=2&token={TOKEN}&class=ring", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/runs?page=2&class=ring"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={TOKEN};") and "HttpOnly" in cookie and "Path=/" in cookie
    assert "SameSite=strict" in cookie


@pytest.mark.parametrize("host", ["[localhost]", "LocalHost", "127.1.2.3", "[::1]", "::1"])
def test_loopback_names_and_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    ["localhost.example.org", "Xlocalhost", "localhostX", "X127.0.0.1", "127.0.0.1X", "[::2]", "0.0.0.0"],
)
def test_names_that_only_look_like_loopback_are_not(host: str) -> None:
    assert not is_loopback(host)


def test_token_length_and_exposure_messages() -> None:
    check_exposure("0.0.0.0", "x" * MIN_TOKEN_LENGTH)  # exactly the minimum is enough
    with pytest.raises(WebConfigError) as short:
        check_exposure("0.0.0.0", "x" * (MIN_TOKEN_LENGTH - 1))
    assert str(short.value) == (
        f"the access token is {MIN_TOKEN_LENGTH - 1} characters long; use at least {MIN_TOKEN_LENGTH}, e.g. "
        "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
    )
    with pytest.raises(WebConfigError) as exposed:
        check_exposure("0.0.0.0", None)
    assert str(exposed.value) == (
        "--host 0.0.0.0 lets other machines read the runs, so an access token is required: "
        "pass --token TOKEN or set CAMAUDIT_WEB_TOKEN, or bind to 127.0.0.1 / localhost / ::1"
    )


def test_access_log_keeps_arguments_that_are_not_text() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4", "GET", f"/?token={TOKEN}", "1.1", 200),
        None,
    )
    assert RedactToken().filter(record)
    assert record.getMessage() == '1.2.3.4 - "GET /?token=*** HTTP/1.1" 200'


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("localhost", True),
        (" localhost:8000 ", True),
        ("127.0.0.1:80", True),
        ("[::1]", True),
        ("[::1]:8000", True),
        ("::1", True),  # a bare IPv6 address: its colons are not a port
        ("[::1", False),  # malformed brackets name nothing
        ("[::1]]", False),
        ("[::1]x", False),
        ("[::1]:", False),
        ("[[::1]]", False),
        ("localhost:80:90", False),
        ("attacker.example:8000", False),
        ("localhost.attacker.example:8000", False),
        ("", False),
        ("a" * 150 + ".example", False),
    ],
)
def test_without_a_token_the_host_header_decides(database: str, host: str, served: bool) -> None:
    """The name in ``Host``, its port and brackets taken off, must be a loopback name."""
    answer = TestClient(create_app(database)).get("/healthz", headers={"host": host})
    if served:
        assert answer.status_code == 200, answer.text
    else:
        assert answer.status_code == 400
        assert answer.text == (
            "this server has no access token, so it answers only requests for localhost, "
            f"127.0.0.1 or [::1], not Host {host[:100]!r}; start it with --token to serve other names"
        )


def test_a_request_without_a_host_header_is_refused_naming_an_empty_host() -> None:
    """HTTP/1.0 allows a request without ``Host``; it names no loopback host, so it is refused."""
    seen: list[Request] = []

    async def call_next(request: Request) -> Response:
        seen.append(request)
        return PlainTextResponse("served")

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": b"",
        "headers": [],
        "http_version": "1.0",
    }
    answer = asyncio.run(token_guard(None)(Request(scope), call_next))
    assert seen == []
    assert answer.status_code == 400
    assert answer.body.decode() == (
        "this server has no access token, so it answers only requests for localhost, "
        "127.0.0.1 or [::1], not Host ''; start it with --token to serve other names"
    )
