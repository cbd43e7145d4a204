"""The drift page's data: ``scheduler.analysis.drift.diff_runs`` laid out as headings, figures and tables.

The page renders whatever the report holds (figures, per-class rows, ranked movers) rather
than a fixed list of fields, so the drift report can grow without the page falling behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DriftUnavailableError", "DriftView", "Table", "drift_view", "layout"]


class DriftUnavailableError(RuntimeError):
    """This installation has no drift comparison (``scheduler.analysis.drift`` is missing)."""


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]


@dataclass(frozen=True)
class DriftView:
    figures: list[tuple[str, Any]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _title(key: str) -> str:
    return key.replace("_", " ").strip().capitalize()


def _cell(value: Any) -> Any:
    if isinstance(value, list | tuple) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(map(str, value))
    return value


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return Table(title, columns, [{k: _cell(row.get(k)) for k in columns} for row in rows])


def layout(report: dict[str, Any], prefix: str = "") -> DriftView:
    """Scalars become figures; lists of records and mappings of records become tables."""
    view = DriftView()
    for key, value in report.items():
        title = f"{prefix}{_title(key)}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            view.tables.append(_table(title, value))
        elif isinstance(value, list) and not value:
            view.tables.append(Table(title, [], []))
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            view.tables.append(_table(title, [{"key": k, **v} for k, v in value.items()]))
        elif isinstance(value, dict):
            nested = layout(value, prefix=f"{title} · ")
            view.figures.extend(nested.figures)
            view.tables.extend(nested.tables)
        else:
            view.figures.append((title, _cell(value)))
    return view


def drift_view(
    database_url: str,
    run_a: str,
    run_b: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    threshold: float = 0.5,
    limit: int = 50,
) -> DriftView:
    """Compare run A (before) with run B (after); errors of the comparison propagate unchanged."""
    try:
        from scheduler.analysis.drift import diff_runs
    except ModuleNotFoundError as exc:
        if exc.name != "scheduler.analysis.drift":
            raise
        raise DriftUnavailableError(
            "this installation has no drift comparison (module scheduler.analysis.drift is missing); "
            "upgrade camaudit to a version that ships `scheduler/analysis/drift.py`"
        ) from exc
    diff = diff_runs(
        database_url, run_a, run_b, endpoint_url=endpoint_url, region=region, threshold=threshold, limit=limit
    )
    return layout(diff.as_dict())
