"""How an audit run ended, as an exit code: so cron, CI and Kubernetes CronJobs can tell.

| code | meaning |
| --- | --- |
| 0 | the run finished (or ended partial) and no alert rule fired |
| 2 | the audit file or a setting is wrong; nothing was started |
| 3 | at least one alert rule fired |
| 4 | the run failed (every shard failed); takes precedence over 3 |
| 5 | the run ended but its alert rules were not judged in time (finalisation failed or is late) |
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select

from scheduler.alerts import alert_dict, run_alerts, run_rules
from schema.db import session_scope
from schema.models import Alert, AlertState, Run, RunStatus

EXIT_OK = 0
EXIT_ALERT = 3
EXIT_RUN_FAILED = 4
EXIT_NOT_EVALUATED = 5


@dataclass(frozen=True)
class AuditOutcome:
    status: str
    has_rules: bool
    alerts: list[Alert] | None  # None: the rules were not judged (yet)

    @property
    def fired(self) -> list[Alert]:
        return [a for a in self.alerts or [] if a.state == AlertState.FIRED]

    @property
    def exit_code(self) -> int:
        if self.status == RunStatus.FAILED:
            return EXIT_RUN_FAILED
        if self.has_rules and self.alerts is None:
            return EXIT_NOT_EVALUATED
        return EXIT_ALERT if self.fired else EXIT_OK

    def as_dict(self) -> dict[str, object]:
        return {
            "exit_code": self.exit_code,
            "alerts_evaluated": self.alerts is not None,
            "alerts": [alert_dict(a) for a in self.alerts or []],
        }


def audit_outcome(
    database_url: str, run_id: str, *, timeout_s: float = 0.0, poll_s: float = 0.5
) -> AuditOutcome:
    """The ended run's status and alerts, waiting up to ``timeout_s`` for its finalisation."""
    deadline = time.monotonic() + timeout_s
    while True:
        with session_scope(database_url) as session:
            status, config = session.execute(select(Run.status, Run.config).where(Run.id == run_id)).one()
        has_rules = run_rules(config)[0] is not None
        alerts = run_alerts(database_url, run_id)
        if not has_rules or alerts or status not in RunStatus.TERMINAL or time.monotonic() >= deadline:
            return AuditOutcome(status, has_rules, alerts if alerts or not has_rules else None)
        time.sleep(poll_s)
