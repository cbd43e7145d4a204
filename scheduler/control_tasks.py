"""Control-queue tasks: starting scheduled audits from Celery beat."""

from __future__ import annotations

from scheduler.audits import audit_settings, load_audits, pick_audit, previous_good_run
from scheduler.plan import plan_run
from scheduler.runner import enqueue
from schema.settings import get_settings
from workers.celery_app import CONTROL_QUEUE, app


@app.task(name="camaudit.start_audit", queue=CONTROL_QUEUE)
def start_audit_task(audit_file: str, name: str) -> str:
    audit = pick_audit(load_audits(audit_file), name)
    settings = audit_settings(audit, get_settings())
    baseline = previous_good_run(settings.database_url, audit.name)
    planned = plan_run(audit.run_spec(), settings, baseline_run_id=baseline)
    enqueue(planned.run_id, planned.shard_ids, settings)
    return planned.run_id


@app.task(name="camaudit.finalize_run", queue=CONTROL_QUEUE, max_retries=3, default_retry_delay=10)
def finalize_run_task(run_id: str) -> str:
    """After a run's last shard: drift against its baseline and other run-level summaries."""
    from scheduler.finalize import finalize_run

    settings = get_settings()
    finalize_run(
        settings.database_url, run_id, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    return run_id
