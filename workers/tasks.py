"""Celery tasks. Embedded mode runs these very functions in-process through ``Task.apply``."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from schema.redact import redact
from schema.settings import get_settings
from workers.celery_app import CONTROL_QUEUE, SHARD_QUEUE, app
from workers.shard import explain_shard, fail_shard

log = logging.getLogger("camaudit.worker")

MAX_RETRIES = 3


class ShardAttemptError(RuntimeError):
    """What a failed attempt reports to Celery (retry logs, events, results): type and message, redacted.

    The original exception is not passed on: its message may carry a database or broker URL with
    its password, and Celery would show it in Flower and store it with the task's result.
    """


def retry_delay(retries: int) -> float:
    return min(2.0**retries, 60.0)


@app.task(name="camaudit.explain_shard", bind=True, max_retries=MAX_RETRIES, queue=SHARD_QUEUE)
def explain_shard_task(self: Task, run_id: str, shard_id: int) -> dict[str, Any]:
    settings = get_settings()
    try:
        outcome = explain_shard(run_id, shard_id, settings)
    except Exception as exc:
        retries = int(self.request.retries or 0)
        error = redact(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}".removeprefix("builtins."))
        if retries < MAX_RETRIES:
            log.warning(
                "run=%s shard_id=%d attempt %d failed (%s); retrying", run_id, shard_id, retries + 1, error
            )
            raise self.retry(exc=ShardAttemptError(error), countdown=retry_delay(retries)) from None
        log.error("run=%s shard_id=%d failed after %d attempts: %s", run_id, shard_id, retries + 1, error)
        outcome = fail_shard(settings.database_url, run_id, shard_id, error)
    if outcome.run_status is not None:
        _after_run(run_id, eager=bool(self.request.is_eager))
    return outcome.as_dict()


def _after_run(run_id: str, *, eager: bool) -> None:
    """Exactly one shard completion ends a run; it hands the run-level work to the control queue."""
    if eager:
        result = app.tasks["camaudit.finalize_run"].apply((run_id,), throw=False)
        if result.failed():
            # The run's rows and objects are complete; only its summaries are missing.
            log.error("run=%s finalisation failed: %r; `camaudit diff` redoes it", run_id, result.result)
    else:
        app.send_task("camaudit.finalize_run", (run_id,), queue=CONTROL_QUEUE)
