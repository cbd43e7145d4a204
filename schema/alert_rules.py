"""Alert rules and notification targets of an audit.

They travel with the run (in ``runs.config``) from the process that plans it to the control
worker that finalises it, so they live with the other shared contracts. A webhook target is
only ever the *name* of an environment variable: the URL itself is a secret, read when an
alert is sent and never written to a file, a row or a log.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

RULE_STATUSES = ("finished", "partial", "failed")
ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _MethodRule(_Rule):
    method: str | None = None

    @field_validator("method")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.strip().lower() if value else None


class DriftedClassesRule(_MethodRule):
    """Fires when more than ``above`` classes drifted against the baseline run."""

    above: int = Field(ge=0, description="number of drifted (method, layer, class) rows")


class CorrelationRule(_MethodRule):
    """Fires when any class's mean correlation with the baseline is below ``below``."""

    below: float = Field(gt=-1.0, le=1.0, description="Pearson correlation, -1 to 1")


class PointingGameRule(_MethodRule):
    """Fires when a method's pointing game (any layer) is below ``below``."""

    below: float = Field(gt=0.0, le=1.0, description="fraction of boxed items hit, 0 to 1")


class FailedItemsRule(_Rule):
    """Fires when the failed fraction of the run's items is above ``above``."""

    above: float = Field(ge=0.0, lt=1.0, description="fraction of the run's items, 0 to 1")


class DurationRule(_Rule):
    """Fires when the run took longer than ``above`` seconds from start to end."""

    above: float = Field(gt=0.0, description="seconds")


class AlertRules(BaseModel):
    """What makes an audit run worth telling someone about; every rule is optional."""

    model_config = ConfigDict(extra="forbid")

    drifted_classes: DriftedClassesRule | None = None
    mean_correlation: CorrelationRule | None = None
    pointing_game: PointingGameRule | None = None
    failed_items: FailedItemsRule | None = None
    status: list[Literal["finished", "partial", "failed"]] | None = None
    duration_s: DurationRule | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _known_statuses(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            for status in value:
                if status not in RULE_STATUSES:
                    raise ValueError(
                        f"unknown run status {status!r}{closest(str(status), RULE_STATUSES)}; "
                        f"a run ends {', '.join(RULE_STATUSES)}"
                    )
        return value

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in type(self).model_fields)

    def methods_named(self) -> dict[str, str]:
        """Rule name -> CAM method it is restricted to, for checking against the audit's methods."""
        named = {
            "drifted_classes": self.drifted_classes.method if self.drifted_classes else None,
            "mean_correlation": self.mean_correlation.method if self.mean_correlation else None,
            "pointing_game": self.pointing_game.method if self.pointing_game else None,
        }
        return {rule: method for rule, method in named.items() if method}


class WebhookTarget(BaseModel):
    """A webhook whose URL is taken from the environment variable named here, at send time."""

    model_config = ConfigDict(extra="forbid")

    webhook: str

    @field_validator("webhook")
    @classmethod
    def _environment_reference(cls, value: str) -> str:
        # The value is never echoed: a pasted URL is exactly what must not reach a log.
        if not ENV_REFERENCE.match(value.strip()):
            raise ValueError(
                "a webhook is written as ${VARIABLE}, e.g. ${CAMAUDIT_ALERT_WEBHOOK}, and the URL is set "
                "in that environment variable of the control worker; a URL in the audit file would be "
                "a secret kept in plain text"
            )
        return value.strip()

    @property
    def variable(self) -> str:
        match = ENV_REFERENCE.match(self.webhook)
        assert match is not None  # checked by the validator
        return match.group(1)


def closest(name: str, valid: Iterable[str]) -> str:
    """`` (did you mean X?)`` for a misspelt name, or nothing when no valid name is close."""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
