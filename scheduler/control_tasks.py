"""Control-queue tasks: starting scheduled audits from Celery beat, finalising runs, alerting."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

from scheduler.audits import audit_settings, load_audits, pick_audit, previous_good_run
from scheduler.plan import plan_run
from scheduler.runner import enqueue
from schema.settings import Settings, get_settings
from workers.celery_app import CONTROL_QUEUE, app

log = logging.getLogger("camaudit.control")


@app.task(name="camaudit.start_audit", queue=CONTROL_QUEUE)
def start_audit_task(audit_file: str, name: str) -> str:
    audit = pick_audit(load_audits(audit_file), name)
    settings = audit_settings(audit, get_settings())
    baseline = previous_good_run(settings.database_url, audit.name)
    planned = plan_run(audit.run_spec(), settings, baseline_run_id=baseline)
    enqueue(planned.run_id, planned.shard_ids, settings)
    return planned.run_id


@app.task(bind=True, name="camaudit.finalize_run", queue=CONTROL_QUEUE, max_retries=3, default_retry_delay=10)
def finalize_run_task(self: Task, run_id: str) -> str:
    """After a run's last shard: drift against its baseline, other run-level summaries, alerts."""
    from scheduler.finalize import finalize_run
    from workers import metrics

    settings = get_settings()
    finalised = finalize_run(
        settings.database_url, run_id, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    if finalised is None:
        return run_id
    _retain(settings, run_id)
    _analyze_results(settings, run_id)
    raised = finalised.alerts
    metrics.record_audit(finalised.facts, fired=sum(j.fired for j in raised.judged) if raised else 0)
    if raised is not None and raised.to_deliver:
        if self.request.is_eager:
            result = deliver_alerts_task.apply((run_id,), throw=False)
            if result.failed():  # delivery is recorded in its rows; the run itself is complete
                log.error("run=%s alert delivery task failed: %s", run_id, type(result.result).__name__)
        else:
            deliver_alerts_task.apply_async((run_id,), queue=CONTROL_QUEUE)
    return run_id


def _retain(settings: Settings, run_id: str) -> None:
    """The audit's retention, once its new run is complete; a failure is logged, not the run's."""
    from scheduler.retention import retain_after

    try:
        kept = retain_after(
            settings.database_url, run_id, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
        )
    except Exception as exc:  # the run itself is finalised; the next one retries the retention
        log.error("run=%s retention failed: %s: %s", run_id, type(exc).__name__, exc)
        return
    if kept is not None and kept.deleted:
        log.info("run=%s retention of audit %s deleted %d runs", run_id, kept.audit, len(kept.deleted))


def _analyze_results(settings: Settings, run_id: str) -> None:
    """Fresh planner statistics on the partitioned result tables once a run's rows have landed."""
    from schema.db import session_scope
    from schema.partitions import analyze_parents

    started = time.monotonic()
    try:
        with session_scope(settings.database_url) as session:
            tables = analyze_parents(session.connection())
    except Exception as exc:  # queries still answer, only their plans may be worse
        log.error("run=%s ANALYZE of the result tables failed: %s: %s", run_id, type(exc).__name__, exc)
        return
    if tables:
        log.info("run=%s analysed %s in %.1fs", run_id, ", ".join(tables), time.monotonic() - started)


def alert_backoff(settings: Settings, attempt: int) -> float:
    """Seconds before retry ``attempt`` (1-based): the configured back-off, doubling, at most 10 min."""
    return float(min(settings.alert_backoff_s * 2 ** (attempt - 1), 600.0))


@app.task(bind=True, name="camaudit.deliver_alerts", queue=CONTROL_QUEUE, max_retries=None)
def deliver_alerts_task(self: Task, run_id: str, accepted: list[int] | None = None) -> dict[str, Any]:
    """POST a run's fired alerts to its webhooks, retrying with back-off; never fails the run.

    Webhooks that accepted are carried into the retry, so a retry posts only to the others.
    The attempt count lives in the alert rows, so a redelivered message does not start over.
    """
    from scheduler.notify import deliver_once
    from scheduler.webhooks import DeliveryError

    settings = get_settings()
    attempt = deliver_once(settings, run_id, accepted or [])
    if attempt.complete:
        return attempt.as_dict()
    if attempt.attempts >= settings.alert_attempts:
        log.error(
            "run=%s alert notification not delivered after %d attempts: %s",
            run_id,
            attempt.attempts,
            attempt.error,
        )
        return attempt.as_dict()
    delay = alert_backoff(settings, attempt.attempts)
    log.warning(
        "run=%s alert notification attempt %d failed (%s); retrying in %.1fs",
        run_id,
        attempt.attempts,
        attempt.error,
        delay,
    )
    if self.request.is_eager:
        time.sleep(delay)  # Celery's eager retries ignore the countdown; embedded mode backs off here
    raise self.retry(
        args=(run_id,),
        kwargs={"accepted": attempt.accepted},
        countdown=delay,
        exc=DeliveryError(attempt.error or "not delivered"),
    )
