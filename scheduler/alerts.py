"""Alert rules judged against a finalised run: what the run measured, which rules fired, the rows.

Evaluation is a pure function of a run's facts (its counts, times, stored drift and quality
rows), so it is tested without a database and gives the same answer when a run is finalised
again. Storing is an upsert on (run, rule) that keeps the delivery columns: a rule that
fired and was delivered is not delivered twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select

from schema.alert_rules import AlertRules, WebhookTarget
from schema.db import session_scope
from schema.models import Alert, AlertState, ClassDrift, Run, RunQuality, RunStatus, utcnow

log = logging.getLogger("camaudit.alerts")

DRIFT_RULES = ("drifted_classes", "mean_correlation")
TOP_CLASSES = 10


@dataclass(frozen=True)
class ClassFact:
    method: str
    layer: str
    target_class: int
    class_name: str
    mean_correlation: float
    l1_shift: float
    drifted: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "class": self.class_name,
            "class_index": self.target_class,
            "method": self.method,
            "layer": self.layer,
            "mean_correlation": round(self.mean_correlation, 4),
            "l1_shift": round(self.l1_shift, 4),
        }


@dataclass(frozen=True)
class QualityFact:
    method: str
    layer: str
    n: int
    pointing_game: float


@dataclass(frozen=True)
class RunFacts:
    """What a finalised run measured; ``drift`` is None when it was not compared with a baseline."""

    run_id: str
    audit_name: str | None
    status: str
    n_items: int
    n_failed: int
    duration_s: float | None
    finished_at: datetime | None
    baseline_run_id: str | None
    drift: list[ClassFact] | None
    quality: list[QualityFact]

    @property
    def failed_fraction(self) -> float:
        return self.n_failed / self.n_items if self.n_items else 0.0

    def drifted(self, method: str | None = None) -> list[ClassFact]:
        """Drifted classes, least similar first."""
        return sorted(
            (c for c in self.drift or [] if c.drifted and method in (None, c.method)),
            key=lambda c: c.mean_correlation,
        )


@dataclass(frozen=True)
class Judgement:
    rule: str
    state: str
    message: str
    value: float | None = None
    threshold: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def fired(self) -> bool:
        return self.state == AlertState.FIRED


def evaluate(rules: AlertRules, facts: RunFacts) -> list[Judgement]:
    """Judge every configured rule; drift rules are skipped when the run had no baseline."""
    judged: list[Judgement] = []
    no_drift = _no_drift_reason(facts)
    if rules.drifted_classes is not None:
        rule = rules.drifted_classes
        if no_drift:
            judged.append(Judgement("drifted_classes", AlertState.SKIPPED, no_drift))
        else:
            drifted = facts.drifted(rule.method)
            judged.append(
                _compare(
                    "drifted_classes",
                    len(drifted),
                    rule.above,
                    above=True,
                    what=f"drifted classes{_on(rule.method)}",
                    detail={"classes": [c.as_dict() for c in drifted[:TOP_CLASSES]]},
                )
            )
    if rules.mean_correlation is not None:
        rule = rules.mean_correlation
        classes = sorted(
            (c for c in facts.drift or [] if rule.method in (None, c.method)),
            key=lambda c: c.mean_correlation,
        )
        if no_drift or not classes:
            reason = no_drift or f"no class{_on(rule.method)} is shared with baseline {facts.baseline_run_id}"
            judged.append(Judgement("mean_correlation", AlertState.SKIPPED, reason))
        else:
            below = [c for c in classes if c.mean_correlation < rule.below]
            worst = classes[0]
            judged.append(
                _compare(
                    "mean_correlation",
                    worst.mean_correlation,
                    rule.below,
                    above=False,
                    what=f"worst class correlation with the baseline{_on(rule.method)} "
                    f"({worst.class_name}, {worst.method}/{worst.layer})",
                    detail={"classes": [c.as_dict() for c in below[:TOP_CLASSES]]},
                )
            )
    if rules.pointing_game is not None:
        rule = rules.pointing_game
        rows = [q for q in facts.quality if q.n and rule.method in (None, q.method)]
        if not rows:
            judged.append(
                Judgement(
                    "pointing_game",
                    AlertState.SKIPPED,
                    f"no boxed item was scored{_on(rule.method)}: the pointing game needs labels and boxes",
                )
            )
        else:
            worst_q = min(rows, key=lambda q: q.pointing_game)
            judged.append(
                _compare(
                    "pointing_game",
                    worst_q.pointing_game,
                    rule.below,
                    above=False,
                    what=f"pointing game of {worst_q.method}/{worst_q.layer}",
                    detail={
                        "methods": [
                            {"method": q.method, "layer": q.layer, "n": q.n, "pointing_game": q.pointing_game}
                            for q in rows
                        ]
                    },
                )
            )
    if rules.failed_items is not None:
        judged.append(
            _compare(
                "failed_items",
                facts.failed_fraction,
                rules.failed_items.above,
                above=True,
                what=f"failed fraction of items ({facts.n_failed} of {facts.n_items})",
            )
        )
    if rules.status is not None:
        fired = facts.status in rules.status
        judged.append(
            Judgement(
                "status",
                AlertState.FIRED if fired else AlertState.OK,
                f"run ended {facts.status}, "
                + ("one of " if fired else "not one of ")
                + ", ".join(rules.status),
                detail={"status": facts.status, "alert_on": list(rules.status)},
            )
        )
    if rules.duration_s is not None:
        if facts.duration_s is None:
            judged.append(Judgement("duration_s", AlertState.SKIPPED, "the run has no start or end time"))
        else:
            judged.append(
                _compare(
                    "duration_s", facts.duration_s, rules.duration_s.above, above=True, what="duration (s)"
                )
            )
    return judged


def _no_drift_reason(facts: RunFacts) -> str | None:
    if facts.baseline_run_id is None:
        who = f"audit {facts.audit_name!r}" if facts.audit_name else "this run"
        return f"first run of {who}: no baseline run to compare with, drift rules skipped"
    if facts.drift is None:
        return f"drift against baseline {facts.baseline_run_id} was not computed"
    return None


def _on(method: str | None) -> str:
    return f" ({method})" if method else ""


def _compare(
    rule: str, value: float, threshold: float, *, above: bool, what: str, detail: dict[str, Any] | None = None
) -> Judgement:
    fired = value > threshold if above else value < threshold
    side = "above" if above else "below"
    return Judgement(
        rule,
        AlertState.FIRED if fired else AlertState.OK,
        f"{what} = {value:.4g}, {'' if fired else 'not '}{side} {threshold:g}",
        value=float(value),
        threshold=float(threshold),
        detail={"comparison": side, **(detail or {})},
    )


# --------------------------------------------------------------------------- facts from SQL


def run_facts(database_url: str, run_id: str) -> RunFacts:
    """A run's counts and times with the drift and quality rows its finalisation stored."""
    with session_scope(database_url) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ValueError(f"run {run_id} does not exist")
        names = list(run.class_names or [])
        drift: list[ClassFact] | None = None
        if run.baseline_run_id is not None:
            rows = session.execute(
                select(ClassDrift).where(
                    ClassDrift.run_id == run_id, ClassDrift.baseline_run_id == run.baseline_run_id
                )
            ).scalars()
            drift = [
                ClassFact(
                    method=r.method,
                    layer=r.layer,
                    target_class=r.target_class,
                    class_name=names[r.target_class]
                    if 0 <= r.target_class < len(names)
                    else str(r.target_class),
                    mean_correlation=r.mean_correlation,
                    l1_shift=r.l1_shift,
                    drifted=r.drifted,
                )
                for r in rows
            ]
            baseline = session.get(Run, run.baseline_run_id)
            if not drift and (baseline is None or baseline.status not in RunStatus.TERMINAL):
                drift = None
        quality = [
            QualityFact(q.method, q.layer, q.n, q.pointing_game)
            for q in session.execute(select(RunQuality).where(RunQuality.run_id == run_id)).scalars()
        ]
        started = run.started_at or run.created_at
        duration = (run.finished_at - started).total_seconds() if run.finished_at and started else None
        return RunFacts(
            run_id=run.id,
            audit_name=run.audit_name,
            status=run.status,
            n_items=run.n_items,
            n_failed=run.n_failed,
            duration_s=duration,
            finished_at=run.finished_at,
            baseline_run_id=run.baseline_run_id,
            drift=drift,
            quality=quality,
        )


def run_rules(config: dict[str, Any] | None) -> tuple[AlertRules | None, list[WebhookTarget]]:
    """The rules and targets a run was started with (``runs.config``); no rules set gives None."""
    config = config or {}
    rules = AlertRules.model_validate(config["alerts"]) if config.get("alerts") else None
    if rules is not None and rules.empty:
        rules = None
    targets = [WebhookTarget.model_validate(t) for t in config.get("notify") or []]
    return rules, targets


# --------------------------------------------------------------------------- rows


def store_judgements(database_url: str, run_id: str, judged: list[Judgement]) -> list[Alert]:
    """Write one row per judged rule; a rule that keeps firing keeps its delivery record."""
    now = utcnow()
    with session_scope(database_url) as session:
        existing = {a.rule: a for a in session.execute(select(Alert).where(Alert.run_id == run_id)).scalars()}
        for j in judged:
            row = existing.pop(j.rule, None)
            if row is None:
                row = Alert(run_id=run_id, rule=j.rule, attempts=0)
                session.add(row)
            was_fired = row.state == AlertState.FIRED
            row.state, row.message, row.detail = j.state, j.message, j.detail
            row.value, row.threshold, row.evaluated_at = j.value, j.threshold, now
            if j.fired and not was_fired:
                row.fired_at = now
                row.delivered_at, row.last_error, row.attempts = None, None, 0
            elif not j.fired:
                row.fired_at = None
        if existing:
            session.execute(delete(Alert).where(Alert.id.in_([a.id for a in existing.values()])))
        session.flush()
        return list(session.execute(select(Alert).where(Alert.run_id == run_id).order_by(Alert.id)).scalars())


def run_alerts(database_url: str, run_id: str) -> list[Alert]:
    with session_scope(database_url) as session:
        return list(session.execute(select(Alert).where(Alert.run_id == run_id).order_by(Alert.id)).scalars())


def alert_dict(alert: Alert) -> dict[str, Any]:
    """A row as ``audit run --json`` and the web UI show it."""
    return {
        "rule": alert.rule,
        "state": alert.state,
        "value": alert.value,
        "threshold": alert.threshold,
        "message": alert.message,
        "detail": alert.detail,
        "fired_at": alert.fired_at.isoformat() if alert.fired_at else None,
        "delivered_at": alert.delivered_at.isoformat() if alert.delivered_at else None,
        "attempts": alert.attempts,
        "last_error": alert.last_error,
    }


def fired_counts(database_url: str, run_ids: list[str]) -> dict[str, int]:
    """Fired rules per run, for marking runs in a listing."""
    if not run_ids:
        return {}
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Alert.run_id, Alert.rule).where(Alert.run_id.in_(run_ids), Alert.state == AlertState.FIRED)
        ).all()
    counts: dict[str, int] = {}
    for run_id, _rule in rows:
        counts[run_id] = counts.get(run_id, 0) + 1
    return counts
