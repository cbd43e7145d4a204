"""Celery tasks. Embedded mode runs these very functions in-process through ``Task.apply``."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from schema.redact import redact
from schema.settings import get_settings
from workers.celery_app import CONTROL_QUEUE, SHARD_QUEUE, app
from workers.shard import explain_shard, fail_shard, worker_name

log = logging.getLogger("camaudit.worker")

MAX_RETRIES = 3
# The database unreachable (a restart, a failover) is not the shard's fault: it gets more
# tries, spread over about five minutes, before the shard is failed.
DATABASE_RETRIES = 10


class ShardAttemptError(RuntimeError):
    """What a failed attempt reports to Celery (retry logs, events, results): type and message, redacted.

    The original exception is not passed on: its message may carry a database or broker URL with
    its password, and Celery would show it in Flower and store it with the task's result.
    """


def retry_delay(retries: int) -> float:
    return min(2.0**retries, 60.0)


def database_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


@app.task(name="camaudit.explain_shard", bind=True, max_retries=MAX_RETRIES, queue=SHARD_QUEUE)
def explain_shard_task(self: Task, run_id: str, shard_id: int) -> dict[str, Any]:
    settings = get_settings()
    retries = int(self.request.retries or 0)
    worker = worker_name(None if self.request.is_eager else self.request.hostname)
    try:
        outcome = explain_shard(run_id, shard_id, settings, worker=worker, retry_in_s=retry_delay(retries))
    except Exception as exc:
        error = redact(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}".removeprefix("builtins."))
        limit = DATABASE_RETRIES if database_unreachable(exc) else MAX_RETRIES
        if retries < limit:
            log.warning(
                "run=%s shard_id=%d attempt %d failed (%s); retrying", run_id, shard_id, retries + 1, error
            )
            raise self.retry(
                exc=ShardAttemptError(error), countdown=retry_delay(retries), max_retries=limit
            ) from None
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
