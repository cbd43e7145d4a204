"""Turning a run request into rows: validate everything first, then cut shards.

A bad model reference, layer, method or source must fail here, before a single shard is
enqueued, with a message that says what would be right.
"""

from __future__ import annotations

import difflib
import platform
import uuid
from dataclasses import dataclass
from importlib import metadata

import torch
from sqlalchemy import insert, select

from scheduler.sources import SourceItem, list_source
from schema.db import session_scope, upgrade
from schema.models import Item, Run, RunStatus, Shard, ShardStatus
from schema.payloads import RunSpec
from schema.settings import Settings
from workers.cam import METHODS, CamConfigError, CamEngine
from workers.cam.targets import TargetSpec
from workers.models import LoadedModel, load_model_cached, resolve_layer
from workers.run_targets import TargetSpecError, batch_spec, depends_on_item

# Methods whose check would cost hundreds of forward passes; their shape logic is shared with the rest.
EXPENSIVE_METHODS = frozenset({"scorecam", "ablationcam"})


class PlanError(ValueError):
    """The run request cannot work; nothing has been written or enqueued."""


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    n_items: int
    shard_ids: list[int]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("camaudit", "torch", "torchvision", "numpy", "pillow", "sqlalchemy", "celery", "boto3"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def check_methods(methods: list[str]) -> None:
    for method in methods:
        if method not in METHODS:
            close = difflib.get_close_matches(method, list(METHODS), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PlanError(f"unknown CAM method {method!r}{hint} (valid: {', '.join(METHODS)})")


def _probe_targets(spec: RunSpec) -> TargetSpec:
    """What the probe forward explains: the run's own targets where they do not need an item."""
    if spec.targets is None or depends_on_item(spec.targets):
        return None
    try:
        return batch_spec(spec.targets, spec.max_targets)
    except TargetSpecError as error:
        raise PlanError(str(error)) from None


def resolve_layers(loaded: LoadedModel, spec: RunSpec) -> tuple[list[str], str]:
    """Check the named layers exist and the methods and targets run on them, with one cheap probe
    forward; returns the layers and the target spec (the default decided by the model's head)."""
    layers = spec.layers or ([loaded.default_layer] if loaded.default_layer else None)
    for name in layers or []:
        resolve_layer(loaded.model, name)
    probe_methods = [m for m in spec.methods if m not in EXPENSIVE_METHODS] or ["gradcam"]
    engine = CamEngine(loaded.model, layers=layers, methods=probe_methods, amp=False)
    device = next(loaded.model.parameters()).device
    height, width = loaded.preprocess.size
    try:
        result = engine(torch.zeros(1, 3, height, width, device=device), targets=_probe_targets(spec))
    except CamConfigError as error:
        if spec.targets is None:
            raise
        raise PlanError(f"targets {spec.targets!r}: {error}") from None
    return list(result.layers), spec.targets or _default_targets(result.logits)


def _default_targets(logits: torch.Tensor | None) -> str:
    """A single-logit binary head explains its positive logit; any other head its top class."""
    single = logits is not None and (logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1))
    return "positive" if single else "top1"


def validate(spec: RunSpec, settings: Settings) -> tuple[LoadedModel, list[str], str, list[SourceItem]]:
    check_methods(spec.methods)
    loaded = load_model_cached(spec.model, spec.checkpoint, device="cpu")
    layers, targets = resolve_layers(loaded, spec)
    items = list_source(spec.source, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    return loaded, layers, targets, items


def plan_run(spec: RunSpec, settings: Settings, *, baseline_run_id: str | None = None) -> PlannedRun:
    loaded, layers, targets, items = validate(spec, settings)
    upgrade(settings.database_url)
    run_id = uuid.uuid4().hex[:16]
    shard_count = (len(items) + spec.shard_size - 1) // spec.shard_size
    with session_scope(settings.database_url) as session:
        session.add(
            Run(
                id=run_id,
                name=spec.name,
                audit_name=spec.audit_name,
                model_ref=loaded.ref,
                checkpoint_uri=spec.checkpoint,
                checkpoint_sha256=loaded.checkpoint_sha256,
                methods=spec.methods,
                layers=layers,
                target_spec=targets,
                source_uri=spec.source,
                output_uri=settings.storage_url,
                preprocess=loaded.preprocess.as_dict(),
                patch_size=spec.patch_size,
                top_patches=spec.top_patches,
                class_names=loaded.class_names,
                config=spec.model_dump(),
                versions=package_versions(),
                n_items=len(items),
                n_shards=shard_count,
                baseline_run_id=baseline_run_id,
            )
        )
        session.flush()
        shard_ids = list(
            session.execute(
                insert(Shard).returning(Shard.id, sort_by_parameter_order=True),
                [
                    {
                        "run_id": run_id,
                        "index": i,
                        "n_items": min(spec.shard_size, len(items) - i * spec.shard_size),
                    }
                    for i in range(shard_count)
                ],
            ).scalars()
        )
        rows = [
            {
                "run_id": run_id,
                "shard_id": shard_ids[n // spec.shard_size],
                "ordinal": n,
                "source_uri": item.uri,
                "label": item.label,
                "box": item.box,
                "group_id": item.group_id,
            }
            for n, item in enumerate(items)
        ]
        for start in range(0, len(rows), 5000):
            session.execute(insert(Item), rows[start : start + 5000])
    return PlannedRun(run_id=run_id, n_items=len(items), shard_ids=shard_ids)


def reopen_run(database_url: str, run_id: str) -> list[int]:
    """Make a run's unfinished shards runnable again; done shards are never redone."""
    with session_scope(database_url) as session:
        run = session.execute(select(Run).where(Run.id == run_id).with_for_update()).scalar_one()
        shards = list(
            session.execute(
                select(Shard)
                .where(Shard.run_id == run_id, Shard.status != ShardStatus.DONE)
                .order_by(Shard.index)
            ).scalars()
        )
        for shard in shards:
            shard.status = ShardStatus.PENDING
            shard.error = None
        if shards and run.status in RunStatus.TERMINAL:
            run.status = RunStatus.RUNNING
            run.finished_at = None
            run.shards_failed = 0
        return [shard.id for shard in shards]
