"""Named audits from a YAML file: ``audit run`` now, ``beat`` on their schedules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from scheduler.cli.options import (
    BrokerUrl,
    DatabaseUrl,
    S3Endpoint,
    console,
    err,
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
    wait: Annotated[
        bool, typer.Option(help="with a broker: wait for the run and its alerts; the exit code tells")
    ] = False,
    alerts_timeout: Annotated[
        float, typer.Option(help="seconds to wait for the alerts after the run ends (with a broker)")
    ] = 600.0,
    json_out: Annotated[
        bool, typer.Option("--json", help="also print the alerts and the exit code as JSON")
    ] = False,
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    s3_endpoint_url: S3Endpoint = None,
) -> None:
    """Run one audit now (for cron or Kubernetes CronJobs); its baseline is its last finished run.

    Once the run is over (always without a broker, with --wait otherwise) the exit code says how
    it went: 0 ok, 3 an alert fired, 4 the run failed, 5 its alerts were not judged in time.
    """
    from scheduler.audit_outcome import audit_outcome
    from scheduler.audits import AuditError, audit_settings, load_audits, pick_audit, previous_good_run

    settings = make_settings(
        database_url=database_url, broker_url=broker_url, s3_endpoint_url=s3_endpoint_url
    )
    setup_logging(settings.log_level)
    with failing_on(AuditError):
        audit = pick_audit(load_audits(audits), name)
    settings = audit_settings(audit, settings)
    baseline = previous_good_run(settings.database_url, audit.name)
    run_id = start_run(audit.run_spec(), settings, wait=wait, baseline_run_id=baseline)
    info = run_status(settings.database_url, run_id)
    info["baseline_run_id"] = baseline
    if not (settings.embedded or wait):
        console.print_json(json.dumps(info))
        return
    outcome = audit_outcome(
        settings.database_url, run_id, timeout_s=0.0 if settings.embedded else alerts_timeout
    )
    if json_out:
        info.update(outcome.as_dict())
    console.print_json(json.dumps(info))
    for alert in outcome.alerts or []:
        colour = {"fired": "bold red", "skipped": "yellow"}.get(alert.state, "green")
        err.print(f"alert [{colour}]{alert.state}[/] {alert.rule}: {escape(alert.message)}", highlight=False)
    if outcome.alerts is None:
        err.print(f"run {run_id}: its alert rules were not judged; `camaudit status {run_id}` shows the run")
    raise typer.Exit(outcome.exit_code)


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
