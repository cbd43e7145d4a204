"""From a run's stored target spec to what the CAM engine explains, item by item.

The spec is text (it is stored with the run and read by every worker): ``top1``, ``topk:N``,
``all``, ``positive``, ``above:T`` (with the run's ``max_targets``), ``classes:3,7``, ``label``,
``labels`` or ``python:package.module:fn``. Specs that do not depend on the item become one
engine argument per batch; ``label`` and ``labels`` read each item's ground truth.
"""

from __future__ import annotations

import functools
import json

import torch

from workers.cam.targets import ScoreFn, TargetSpec
from workers.models import ModelLoadError, import_callable

FUNCTION_PREFIX = "python:"


class TargetSpecError(ValueError):
    """A target spec that cannot work; the message says what would be right."""


@functools.cache
def load_score_function(spec: str) -> ScoreFn:
    """The callable named by ``python:package.module:fn``; wrong names list the closest ones."""
    module_name, _, attr_path = spec.removeprefix(FUNCTION_PREFIX).partition(":")
    if not module_name or not attr_path:
        raise TargetSpecError(f"target functions look like 'python:package.module:fn', got {spec!r}")
    try:
        return import_callable(module_name, attr_path)
    except ModelLoadError as error:
        raise TargetSpecError(f"target function {spec!r}: {error}") from None


def batch_spec(spec: str, max_targets: int | None) -> TargetSpec:
    """The engine's argument for a spec that does not depend on the item (not label/labels/classes)."""
    if spec == "top1":
        return None
    if spec.startswith(FUNCTION_PREFIX):
        return load_score_function(spec)
    if spec.startswith("above:") and max_targets:
        return f"{spec}:{max_targets}"
    return spec


def depends_on_item(spec: str) -> bool:
    return spec in ("label", "labels") or spec.startswith("classes:")


def item_labels(label: str | None) -> list[str]:
    """An item's ground-truth labels: one label, or a JSON list of them (multi-label manifests)."""
    if label is None or not label.strip():
        return []
    text = label.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            return [text]
        if isinstance(values, list):
            return [str(value) for value in values]
    return [text]


def class_index(label: str, names: list[str]) -> int | None:
    """A label's class: its position among the model's class names, or a class number."""
    if label in names:
        return names.index(label)
    if label.isdigit():
        return int(label)
    return None


def label_targets(
    labels: list[str | None], names: list[str], *, every: bool
) -> tuple[object, list[str | None]]:
    """Per item, the class of its label (``every=False``) or of each of its labels; and per-item errors.

    A failed item gets a placeholder class so the batch keeps its shape; the caller drops it.
    """
    errors: list[str | None] = [None] * len(labels)
    rows: list[list[int]] = []
    for index, label in enumerate(labels):
        wanted = item_labels(label) if every else ([label] if label is not None else [])
        classes = [class_index(one, names) for one in wanted]
        unknown = [one for one, cls in zip(wanted, classes, strict=True) if cls is None]
        if not wanted:
            errors[index] = "item has no label to explain"
        elif unknown:
            errors[index] = f"label {unknown[0]!r} is not one of the model's classes"
        rows.append([cls for cls in classes if cls is not None] or [0])
    if every:
        return rows, errors
    return torch.tensor([row[0] for row in rows], dtype=torch.int64), errors
