"""Webhook notifications of a run's fired alerts: the JSON body, and one POST of it.

The URL is read from the environment at the moment of sending and lives only in local
variables: nothing here logs it, returns it, or puts it into an exception message (HTTP
client errors quote the URL, so they are replaced by a description of what went wrong).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3

from scheduler.alerts import TOP_CLASSES, RunFacts
from schema.alert_rules import WebhookTarget
from schema.models import Alert, AlertState

USER_AGENT = "camaudit-alerts"

# urllib3 logs each request's path at DEBUG; while a webhook is being posted those records are
# dropped, in this thread only, so S3 traffic keeps its debug logging.
_posting = threading.local()


class _QuietWhilePosting(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_posting, "active", False)


for _name in ("urllib3", "urllib3.connectionpool", "urllib3.connection", "urllib3.poolmanager"):
    logging.getLogger(_name).addFilter(_QuietWhilePosting())


class DeliveryError(Exception):
    """A webhook did not accept the notification; the message is safe to log and store."""


@dataclass(frozen=True)
class Notification:
    body: dict[str, Any]

    def encoded(self) -> bytes:
        return json.dumps(self.body, sort_keys=True).encode()


def build_notification(facts: RunFacts, alerts: list[Alert], public_url: str | None) -> Notification:
    """One message per run: Slack-style ``text`` for people, structured fields for programs."""
    fired = [a for a in alerts if a.state == AlertState.FIRED]
    skipped = [a for a in alerts if a.state == AlertState.SKIPPED]
    drifted = facts.drifted()[:TOP_CLASSES]
    links: dict[str, str] = {}
    if public_url:
        base = public_url.rstrip("/")
        links["run"] = f"{base}/runs/{facts.run_id}"
        if facts.baseline_run_id:
            links["drift"] = f"{base}/drift?a={facts.baseline_run_id}&b={facts.run_id}"
    who = f"audit {facts.audit_name}" if facts.audit_name else "run"
    lines = [
        f"camaudit {who}: run {facts.run_id} ({facts.status}) raised "
        f"{len(fired)} alert{'' if len(fired) == 1 else 's'}"
    ]
    lines += [f"• {a.rule}: {a.message}" for a in fired]
    if drifted:
        lines.append(
            "Drifted classes: "
            + ", ".join(f"{c.class_name} ({c.method}/{c.layer}, r={c.mean_correlation:.2f})" for c in drifted)
        )
    lines += [f"(skipped {a.rule}: {a.message})" for a in skipped]
    lines += [f"{name}: {url}" for name, url in links.items()]
    body = {
        # Slack reads <...> as links and mentions: a class name must not be able to ping a channel.
        "text": _slack_escape("\n".join(lines)),
        "audit": facts.audit_name,
        "run_id": facts.run_id,
        "baseline_run_id": facts.baseline_run_id,
        "status": facts.status,
        "alerts": [
            {
                "rule": a.rule,
                "value": a.value,
                "threshold": a.threshold,
                "comparison": (a.detail or {}).get("comparison"),
                "message": a.message,
            }
            for a in fired
        ],
        "drifted_classes": [c.as_dict() for c in drifted],
        "skipped": [{"rule": a.rule, "reason": a.message} for a in skipped],
        "links": links,
    }
    return Notification(body)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_url(target: WebhookTarget, environ: dict[str, str] | None = None) -> str:
    """The URL from the environment; errors name the variable, never its value."""
    env = os.environ if environ is None else environ
    url = (env.get(target.variable) or "").strip()
    if not url:
        raise DeliveryError(f"environment variable {target.variable} is not set where alerts are sent")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryError(
            f"environment variable {target.variable} does not hold an http:// or https:// URL with a host"
        )
    return url


def post(url: str, notification: Notification, *, timeout_s: float) -> int:
    """POST the body once; returns the HTTP status, raises :class:`DeliveryError` otherwise."""
    http = urllib3.PoolManager(headers={"User-Agent": USER_AGENT})
    _posting.active = True
    try:
        response = http.request(
            "POST",
            url,
            body=notification.encoded(),
            headers={"Content-Type": "application/json"},
            timeout=urllib3.Timeout(total=timeout_s),
            retries=False,
            redirect=False,
        )
    except Exception as exc:  # every client error quotes the URL: describe it instead
        raise DeliveryError(_describe(exc, timeout_s)) from None
    finally:
        _posting.active = False
        http.clear()
    if not 200 <= response.status < 300:
        raise DeliveryError(f"receiver answered HTTP {response.status}")
    return response.status


def _describe(exc: BaseException, timeout_s: float) -> str:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    # Most specific first: urllib3's connection errors are also its timeouts.
    for error in chain:
        if isinstance(error, ConnectionRefusedError):
            return "connection refused by the receiver"
        if isinstance(error, socket.gaierror):
            return "the receiver's host name does not resolve"
        if isinstance(error, urllib3.exceptions.SSLError):
            return "TLS handshake with the receiver failed"
    for error in chain:
        if isinstance(error, urllib3.exceptions.TimeoutError | TimeoutError):
            return f"no answer within {timeout_s:g}s"
        if isinstance(error, OSError) and error.strerror:
            return f"network error: {error.strerror}"
    return f"request failed ({type(exc).__name__})"
