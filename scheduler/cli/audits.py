"""Named audits from a YAML file: ``audit run`` now, ``beat`` on their schedules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from scheduler.cli.options import (
    BrokerUrl,
    DatabaseUrl,
    S3Endpoint,
    console,
    fail,
    failing_on,
    make_settings,
    setup_logging,
)
from scheduler.cli.root import app, audit_app
from scheduler.cli.runs import run_status, start_run

AuditFile = Annotated[Path, typer.Option("--audits", help="YAML file with an 'audits:' list")]


@audit_app.command("run")
def audit_run(
    name: str,
    audits: AuditFile = Path("audits.yaml"),
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Run one audit now (for cron or Kubernetes CronJobs); its baseline is its last finished run."""
    from scheduler.audits import AuditError, audit_settings, load_audits, pick_audit, previous_good_run

    settings = make_settings(
        database_url=database_url, broker_url=broker_url, s3_endpoint_url=s3_endpoint_url
    )
    setup_logging(settings.log_level)
    with failing_on(AuditError):
        audit = pick_audit(load_audits(audits), name)
    settings = audit_settings(audit, settings)
    baseline = previous_good_run(settings.database_url, audit.name)
    run_id = start_run(audit.run_spec(), settings, wait=False, baseline_run_id=baseline)
    info = run_status(settings.database_url, run_id)
    info["baseline_run_id"] = baseline
    console.print_json(json.dumps(info))


@app.command()
def beat(audits: AuditFile, loglevel: str = "INFO", broker_url: BrokerUrl = None) -> None:
    """Run Celery beat: start each audit of the file on its cron schedule."""
    from scheduler.audits import AuditError, beat_schedule, load_audits
    from workers.celery_app import configure

    settings = make_settings(broker_url=broker_url)
    if settings.embedded:
        fail("beat needs a broker: set --broker-url or CAMAUDIT_BROKER_URL")
    with failing_on(AuditError):
        schedule = beat_schedule(load_audits(audits), str(audits.resolve()))
    celery = configure(settings)
    celery.conf.beat_schedule = schedule
    celery.start(["beat", "--loglevel", loglevel, "--schedule", "/tmp/camaudit-beat-schedule"])
