"""What a user asks for when starting a run, validated before any work is planned."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TARGET_PATTERN = re.compile(
    r"^(top1|all|label|labels|positive|topk:[1-9]\d*|classes:\d+(,\d+)*|above:[^:]*"
    r"|python:[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)$"
)
TARGET_FORMS = (
    "top1, topk:N, all, label, labels, classes:3,7, positive, above:T (0 < T < 1) or python:package.module:fn"
)


class RunSpec(BaseModel):
    """Everything that decides a run's results; stored with the run so it can be reproduced."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: str
    model: str = "demo"
    checkpoint: str | None = None
    methods: list[str] = Field(default_factory=lambda: ["gradcam", "cam"])
    layers: list[str] | None = None
    # None: 'positive' for a single-logit binary head, else 'top1' (decided when planning)
    targets: str | None = None
    max_targets: int | None = Field(None, ge=1)
    patch_size: int = Field(32, ge=1)
    top_patches: int = Field(5, ge=1)
    top_k_predictions: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(256, ge=1)
    name: str | None = None
    audit_name: str | None = None
    overlay: bool = False

    @field_validator("methods")
    @classmethod
    def _methods_not_empty(cls, value: list[str]) -> list[str]:
        value = [m.strip().lower() for m in value if m.strip()]
        if not value:
            raise ValueError("at least one CAM method is needed, e.g. gradcam,cam")
        return list(dict.fromkeys(value))

    @field_validator("targets")
    @classmethod
    def _targets_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value.startswith("python:"):
            value = value.lower()
        if not TARGET_PATTERN.match(value):
            raise ValueError(f"targets {value!r} is not understood; use {TARGET_FORMS}")
        if value.startswith("above:"):
            text = value.removeprefix("above:")
            try:
                threshold = float(text)
            except ValueError:
                threshold = float("nan")
            if not 0 < threshold < 1:
                raise ValueError(
                    f"targets {value!r}: the threshold must be a probability strictly between 0 and 1, "
                    "e.g. above:0.5"
                )
        return value

    @model_validator(mode="after")
    def _max_targets_needs_a_threshold(self) -> RunSpec:
        if self.max_targets is not None and not (self.targets or "").startswith("above:"):
            raise ValueError(
                f"max_targets caps 'above:T' targets; with targets={self.targets or 'the default'} it "
                "would be ignored: use --targets above:0.5 --max-targets N, or drop --max-targets"
            )
        return self
