"""How many runs of an audit to keep: ``retention: {keep_last: 7, older_than: 30d}``.

Read from an audit file (checked when the file is loaded, before any run starts) and from
``camaudit gc --audit NAME --keep-last N --older-than 30d``; the deletion itself is
``scheduler/retention.py``.
"""

from __future__ import annotations

import re
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DURATION_UNITS", "Retention", "parse_duration"]

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION_S = 100 * 365 * 86400
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(value: str, what: str = "duration") -> timedelta:
    """``12h``, ``30d``, ``2w`` … as a timedelta; anything else fails saying what would be right."""
    found = _DURATION.match(value) if isinstance(value, str) else None
    if found is None:
        units = ", ".join(f"{u}" for u in DURATION_UNITS)
        raise ValueError(
            f"{what} {value!r} is not a duration: expected a number and one unit ({units}), e.g. 12h or 30d"
        )
    amount = float(found.group(1))
    if amount <= 0:
        raise ValueError(f"{what} {value!r} must be longer than zero, e.g. 12h or 30d")
    seconds = amount * DURATION_UNITS[found.group(2)]
    if seconds > MAX_DURATION_S:  # beyond any run's age, and beyond what a timedelta can hold
        raise ValueError(f"{what} {value!r} is longer than 100 years; use e.g. 30d or 52w")
    return timedelta(seconds=seconds)


class Retention(BaseModel):
    """Which runs of one audit survive: the newest ``keep_last``, and those younger than ``older_than``.

    With both, a run is deleted only when neither keeps it. Runs still pending or running
    are never deleted, and ``keep_last`` is at least 1: the newest finished run is the
    baseline of the next one.
    """

    model_config = ConfigDict(extra="forbid")

    keep_last: int | None = Field(None, ge=1)
    older_than: str | None = None

    @field_validator("older_than")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value, "older_than")
        return value

    @model_validator(mode="after")
    def _some_rule(self) -> Retention:
        if self.keep_last is None and self.older_than is None:
            raise ValueError("retention needs keep_last (e.g. 7) or older_than (e.g. 30d), or both")
        return self

    @property
    def max_age(self) -> timedelta | None:
        return parse_duration(self.older_than, "older_than") if self.older_than is not None else None
