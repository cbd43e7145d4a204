"""What a user asks for when starting a run, validated before any work is planned."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schema.alert_rules import AlertRules, WebhookTarget
from schema.retention import Retention
from schema.settings import parse_layout

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
    # None: by device (workers/device_defaults.py): the worker's for batches, the planner's for shards
    batch_size: int | None = Field(None, ge=1)
    shard_size: int | None = Field(None, ge=1)
    score_batch_size: int | None = Field(None, ge=1, description="images per Score-/Ablation-CAM forward")
    name: str | None = None
    audit_name: str | None = None
    overlay: bool = False
    # Where maps go: one tar per shard, method and layer, or one object per map (workers/packing.py);
    # None: the settings' (CAMAUDIT_LAYOUT). The planned run records the one it used.
    layout: Literal["packed", "files"] | None = None
    # Overrides of the model's own preprocessing: "stretch", "center-crop[:PCT]", "letterbox"
    # and an input size (H, W); None keeps what the weights, config or checkpoint define.
    preprocess: str | None = None
    input_size: tuple[int, int] | None = None
    # An audit's rules travel with its runs to the finalisation that evaluates them.
    alerts: AlertRules | None = None
    notify: list[WebhookTarget] = Field(default_factory=list)
    # An audit's retention travels with its runs too: applied once the run is finalised.
    retention: Retention | None = None
    group_fusion: Literal["mean", "max"] = "mean"
    views: list[str] | None = None
    missing_view: Literal["fail", "zeros"] = "fail"

    @field_validator("views")
    @classmethod
    def _views_distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        value = [v.strip() for v in value if v.strip()]
        if len(value) < 2 or len(set(value)) != len(value):
            raise ValueError(f"views must name at least two distinct views in input order, got {value}")
        return value

    @field_validator("layout", mode="before")
    @classmethod
    def _layout_name(cls, value: object) -> object:
        return parse_layout(value) if isinstance(value, str) else value

    @field_validator("methods")
    @classmethod
    def _methods_not_empty(cls, value: list[str]) -> list[str]:
        value = [m.strip().lower() for m in value if m.strip()]
        if not value:
            raise ValueError("at least one CAM method is needed, e.g. gradcam,cam")
        return list(dict.fromkeys(value))

    @field_validator("preprocess")
    @classmethod
    def _preprocess_mode(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from workers.preprocess import parse_mode

        mode, crop_pct = parse_mode(value)  # PreprocessError is a ValueError: pydantic reports it
        return mode if crop_pct is None else f"{mode}:{crop_pct}"

    @field_validator("input_size", mode="before")
    @classmethod
    def _input_size(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
            try:
                numbers = [int(p) for p in parts]
            except ValueError:
                raise ValueError(
                    f"input size {value!r} must be H,W or one side, e.g. 224,224 or 384"
                ) from None
            value = numbers
        if isinstance(value, int):
            value = [value, value]
        if isinstance(value, list | tuple) and len(value) == 1:
            value = [value[0], value[0]]
        if isinstance(value, list | tuple) and (
            len(value) != 2 or any(int(v) < 8 or int(v) > 4096 for v in value)
        ):
            raise ValueError(f"input size {value!r} must be two sides of 8..4096 pixels (H, W)")
        return value

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
