"""Passwords never reach a terminal, a log, a row or a page.

Database and broker URLs carry their password (``postgresql://user:secret@host/db``,
``redis://:secret@host``, ``amqp://user:secret@host``), and they end up in messages: what a
command connected to, an error naming where a row was missing. Everything shown or stored
goes through :func:`hide_password` (one URL) or :func:`redact` (any text, with URLs in it).
"""

from __future__ import annotations

import logging
import re

__all__ = ["MASK", "RedactSecrets", "hide_password", "install_log_redaction", "redact"]

MASK = "***"
# scheme://user:password@ -- the password runs to the last '@' before the host (unescaped '@'
# in a password is common in hand-written URLs, and must not leave its tail behind).
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*):(?P<password>[^\s/]*)@")
_PASSWORD_PARAM = re.compile(
    r"(?P<head>[?&;\s](?:password|passwd|pwd)=)(?P<password>[^&;\s'\"]+)", re.IGNORECASE
)


def hide_password(url: str | None) -> str:
    """A URL as it may be shown: the password replaced by ``***``; anything else unchanged."""
    return redact(url or "")


def redact(text: str) -> str:
    """Every password of every URL in ``text`` replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@" if m["password"] != MASK else m[0], text)
    return _PASSWORD_PARAM.sub(lambda m: f"{m['head']}{MASK}", text)


class RedactSecrets(logging.Filter):
    """A handler filter: a record's final message, with passwords in URLs hidden."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Put :class:`RedactSecrets` on every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
