"""Raising a finalised run's alerts and delivering them to its webhooks, one attempt at a time.

The control queue's tasks call these; retries and their back-off belong to the task, the
record of every attempt (count, last error, delivery time) to the ``alerts`` rows. A webhook
that cannot be reached leaves the run as it was: only the delivery columns say so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select

from scheduler.alerts import Judgement, RunFacts, evaluate, run_facts, run_rules, store_judgements
from scheduler.run_locks import run_lock
from scheduler.webhooks import DeliveryError, build_notification, post, webhook_url
from schema.alert_rules import WebhookTarget
from schema.db import session_scope
from schema.models import Alert, AlertState, Run, utcnow
from schema.settings import Settings

log = logging.getLogger("camaudit.alerts")


@dataclass(frozen=True)
class RaisedAlerts:
    facts: RunFacts
    judged: list[Judgement]
    targets: list[WebhookTarget]
    undelivered: int

    @property
    def to_deliver(self) -> bool:
        return bool(self.targets) and self.undelivered > 0


def raise_alerts(database_url: str, facts: RunFacts) -> RaisedAlerts | None:
    """Judge the run's rules against what its finalisation stored; None when it has no rules."""
    run_id = facts.run_id
    with session_scope(database_url) as session:
        config = session.execute(select(Run.config).where(Run.id == run_id)).scalar_one()
    rules, targets = run_rules(config)
    if rules is None:
        return None
    judged = evaluate(rules, facts)
    rows = store_judgements(database_url, run_id, judged)
    for j in judged:
        level = logging.WARNING if j.fired else logging.INFO
        log.log(level, "run=%s alert %s %s: %s", run_id, j.rule, j.state, j.message)
    undelivered = sum(1 for r in rows if r.state == AlertState.FIRED and r.delivered_at is None)
    return RaisedAlerts(facts, judged, targets, undelivered)


@dataclass
class Attempt:
    """What one delivery attempt achieved: targets (by index) that accepted, the last error."""

    run_id: str
    accepted: list[int] = field(default_factory=list)
    error: str | None = None
    attempts: int = 0
    complete: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "accepted": self.accepted,
            "error": self.error,
            "attempts": self.attempts,
            "complete": self.complete,
        }


def deliver_once(settings: Settings, run_id: str, accepted: list[int]) -> Attempt:
    """POST the run's notification to every webhook that has not accepted it yet, and record it.

    One deliverer of a run at a time: a second one waits, then finds the alerts delivered and
    posts nothing (two finalisations of one run may each have asked for a delivery).
    """
    with run_lock(settings.database_url, "deliver", run_id, wait=True):
        return _deliver_once(settings, run_id, accepted)


def _deliver_once(settings: Settings, run_id: str, accepted: list[int]) -> Attempt:
    database_url = settings.database_url
    with session_scope(database_url) as session:
        config = session.execute(select(Run.config).where(Run.id == run_id)).scalar_one_or_none()
        alerts = list(
            session.execute(select(Alert).where(Alert.run_id == run_id).order_by(Alert.id)).scalars()
        )
    attempt = Attempt(run_id, accepted=list(accepted))
    fired = [a for a in alerts if a.state == AlertState.FIRED]
    if config is None or not fired or all(a.delivered_at is not None for a in fired):
        attempt.complete = True  # deleted, re-evaluated quiet, or already delivered by an earlier message
        return attempt
    _rules, targets = run_rules(config)
    notification = build_notification(run_facts(database_url, run_id), alerts, settings.public_url)
    errors: list[str] = []
    for index, target in enumerate(targets, start=1):
        if index in attempt.accepted:
            continue
        try:
            post(webhook_url(target), notification, timeout_s=settings.alert_timeout_s)
        except DeliveryError as exc:
            errors.append(f"webhook {index} (${{{target.variable}}}): {exc}")
            continue
        attempt.accepted.append(index)
    attempt.error = "; ".join(errors) or None
    attempt.complete = not errors
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Alert).where(
                Alert.run_id == run_id, Alert.state == AlertState.FIRED, Alert.delivered_at.is_(None)
            )
        ).scalars()
        now = utcnow()
        for row in rows:
            row.attempts += 1
            attempt.attempts = row.attempts
            if attempt.error:
                row.last_error = attempt.error
            if attempt.complete:
                row.delivered_at = now
    if attempt.complete:
        log.info("run=%s alert notification delivered to %d webhook(s)", run_id, len(targets))
    return attempt
