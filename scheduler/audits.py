"""Nightly audits: named, scheduled runs, each compared with the previous good run of its name."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from celery.schedules import crontab
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails
from sqlalchemy import select

from schema.alert_rules import AlertRules, WebhookTarget, closest
from schema.db import session_scope, upgrade
from schema.models import Run, RunStatus
from schema.payloads import RunSpec
from schema.retention import Retention
from schema.settings import Settings


class AuditError(ValueError):
    """The audit file or an audit in it is not usable."""


class Audit(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    schedule: str = Field(description="cron expression: minute hour day-of-month month day-of-week")
    source: str
    model: str = "demo"
    checkpoint: str | None = None
    methods: list[str] = Field(default_factory=lambda: ["gradcam", "cam"])
    layers: list[str] | None = None
    targets: str | None = None  # None: positive for a single-logit head, else top1
    output: str | None = None
    preprocess: str | None = None  # stretch, center-crop[:PCT] or letterbox; None: the model's own
    input_size: tuple[int, int] | None = None
    patch_size: int = 32
    top_patches: int = 5
    batch_size: int | None = Field(None, ge=1)
    shard_size: int | None = Field(None, ge=1)
    score_batch_size: int | None = Field(None, ge=1)
    layout: Literal["packed", "files"] | None = None  # None: CAMAUDIT_LAYOUT
    alerts: AlertRules | None = None
    notify: list[WebhookTarget] = Field(default_factory=list)
    # Runs of this audit to keep; older ones are deleted after each run is finalised.
    retention: Retention | None = None

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        cron_schedule(value)
        return value

    @model_validator(mode="after")
    def _rules_name_audited_methods(self) -> Audit:
        methods = [m.strip().lower() for m in self.methods]
        for rule, method in (self.alerts.methods_named() if self.alerts else {}).items():
            if method.lower() not in methods:
                raise ValueError(
                    f"alerts.{rule}.method {method!r} is not one of this audit's methods "
                    f"({', '.join(methods)}){closest(method, methods)}"
                )
        return self

    def run_spec(self) -> RunSpec:
        return RunSpec(
            source=self.source,
            model=self.model,
            checkpoint=self.checkpoint,
            methods=self.methods,
            layers=self.layers,
            targets=self.targets,
            preprocess=self.preprocess,
            input_size=self.input_size,
            patch_size=self.patch_size,
            top_patches=self.top_patches,
            batch_size=self.batch_size,
            shard_size=self.shard_size,
            score_batch_size=self.score_batch_size,
            layout=self.layout,
            name=self.name,
            audit_name=self.name,
            alerts=self.alerts,
            notify=self.notify,
            retention=self.retention,
        )


def cron_schedule(expr: str) -> crontab:
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(
            f"schedule {expr!r} needs 5 cron fields (minute hour day month weekday), e.g. '0 2 * * *'"
        )
    minute, hour, day, month, weekday = fields
    return crontab(minute=minute, hour=hour, day_of_month=day, month_of_year=month, day_of_week=weekday)


def load_audits(path: str | Path) -> dict[str, Audit]:
    path = Path(path)
    if not path.exists():
        raise AuditError(f"audit file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("audits") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise AuditError(f"{path}: expected a top-level 'audits:' list of audits")
    audits: dict[str, Audit] = {}
    for n, entry in enumerate(entries, start=1):
        try:
            audit = Audit.model_validate(entry)
            audit.run_spec()
        except ValidationError as exc:
            details = "; ".join(_explain(e) for e in exc.errors())
            raise AuditError(f"{path}: audit #{n}: {details}") from None
        if audit.name in audits:
            raise AuditError(f"{path}: audit name {audit.name!r} appears twice")
        audits[audit.name] = audit
    return audits


def _explain(error: ErrorDetails) -> str:
    """One validation error as a sentence; an unknown key lists the closest valid ones.

    The offending value is never quoted: it may be a secret pasted into the wrong key.
    """
    loc = [str(part) for part in error["loc"]]
    where = ".".join(loc) or "audit"
    if error["type"] == "extra_forbidden":
        valid = _field_names(Audit, error["loc"][:-1])
        hint = closest(loc[-1], valid)
        return f"{where}: unknown key{hint}; valid keys here: {', '.join(valid)}"
    return f"{where}: {error['msg']}"


def _field_names(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys a nested model accepts at ``loc`` (list indices skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = _model_in(field.annotation) if field else None
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def pick_audit(audits: dict[str, Audit], name: str) -> Audit:
    if name not in audits:
        close = difflib.get_close_matches(name, list(audits), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise AuditError(f"no audit named {name!r}{hint} (audits: {', '.join(audits)})")
    return audits[name]


def previous_good_run(database_url: str, audit_name: str) -> str | None:
    """The baseline of an audit run: the latest finished run of the same audit."""
    upgrade(database_url)
    with session_scope(database_url) as session:
        return session.execute(
            select(Run.id)
            .where(Run.audit_name == audit_name, Run.status == RunStatus.FINISHED)
            .order_by(Run.created_at.desc())
            .limit(1)
        ).scalar_one_or_none()


def audit_settings(audit: Audit, settings: Settings) -> Settings:
    return settings.model_copy(update={"storage_url": audit.output}) if audit.output else settings


def beat_schedule(audits: dict[str, Audit], audit_file: str) -> dict[str, Any]:
    return {
        f"audit:{a.name}": {
            "task": "camaudit.start_audit",
            "schedule": cron_schedule(a.schedule),
            "args": (audit_file, a.name),
            "options": {"queue": "control"},
        }
        for a in audits.values()
    }
