"""Turning a run request into rows: validate everything first, then cut shards.

A bad model reference, layer, method or source must fail here, before a single shard is
enqueued, with a message that says what would be right.
"""

from __future__ import annotations

import difflib
import platform
import uuid
from collections import Counter
from dataclasses import dataclass
from importlib import metadata

import torch
from sqlalchemy import insert, select

from scheduler.grouping import cut_shards
from scheduler.sources import SourceItem, list_source
from schema.db import session_scope, upgrade
from schema.models import Item, Run, RunStatus, Shard, ShardStatus
from schema.payloads import RunSpec
from schema.settings import Settings
from workers.cam import METHODS, CamConfigError, CamEngine
from workers.cam.targets import TargetSpec
from workers.device_defaults import defaults_for
from workers.fetch import allowed_roots
from workers.models import LoadedModel, load_model_cached, resolve_layer
from workers.preprocess import Preprocess, PreprocessError, parse_mode
from workers.run_counters import recount_counts
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


def run_preprocess(loaded: LoadedModel, spec: RunSpec) -> Preprocess:
    """The model's own preprocessing with the run's ``--preprocess`` / ``--input-size`` applied."""
    if spec.preprocess is None and spec.input_size is None:
        return loaded.preprocess
    mode, crop_pct = parse_mode(spec.preprocess) if spec.preprocess else (None, None)
    try:
        return loaded.preprocess.with_overrides(resize=mode, size=spec.input_size, crop_pct=crop_pct)
    except PreprocessError as exc:
        raise PlanError(f"preprocessing override does not work for {loaded.ref}: {exc}") from exc


def _probe_targets(spec: RunSpec) -> TargetSpec:
    """What the probe forward explains: the run's own targets where they do not need an item."""
    if spec.targets is None or depends_on_item(spec.targets):
        return None
    try:
        return batch_spec(spec.targets, spec.max_targets)
    except TargetSpecError as error:
        raise PlanError(str(error)) from None


def resolve_layers(
    loaded: LoadedModel, spec: RunSpec, size: tuple[int, int] | None = None
) -> tuple[list[str], str]:
    """Check the named layers exist and the methods and targets run on them, with one cheap probe
    forward; returns the layers and the target spec (the default decided by the model's head)."""
    layers = spec.layers or ([loaded.default_layer] if loaded.default_layer else None)
    for name in layers or []:
        resolve_layer(loaded.model, name)
    probe_methods = [m for m in spec.methods if m not in EXPENSIVE_METHODS] or ["gradcam"]
    if spec.views:  # the engine refuses perturbation methods on multi-view input before computing
        probe_methods = list(spec.methods)
    engine = CamEngine(loaded.model, layers=layers, methods=probe_methods, amp=False, reshape=loaded.reshape)
    device = next(loaded.model.parameters()).device
    height, width = size or loaded.preprocess.size
    shape = (1, len(spec.views), 3, height, width) if spec.views else (1, 3, height, width)
    try:
        result = engine(torch.zeros(*shape, device=device), targets=_probe_targets(spec))
    except CamConfigError as error:
        if spec.targets is None:
            raise
        raise PlanError(f"targets {spec.targets!r}: {error}") from None
    return list(result.layers), spec.targets or _default_targets(result.logits)


def _default_targets(logits: torch.Tensor | None) -> str:
    """A single-logit binary head explains its positive logit; any other head its top class."""
    single = logits is not None and (logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1))
    return "positive" if single else "top1"


@dataclass(frozen=True)
class Validated:
    loaded: LoadedModel
    preprocess: Preprocess  # what the run applies: the model's own unless overridden
    layers: list[str]
    targets: str  # the run's target spec, or the default its model's head decides
    items: list[SourceItem]


def validate(spec: RunSpec, settings: Settings) -> Validated:
    check_methods(spec.methods)
    loaded = load_model_cached(spec.model, spec.checkpoint, device="cpu")
    preprocess = run_preprocess(loaded, spec)
    layers, targets = resolve_layers(loaded, spec, preprocess.size)
    items = list_source(spec.source, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    return Validated(loaded, preprocess, layers, targets, items)


def plan_run(spec: RunSpec, settings: Settings, *, baseline_run_id: str | None = None) -> PlannedRun:
    checked = validate(spec, settings)
    loaded, layers, targets, items = checked.loaded, checked.layers, checked.targets, checked.items
    upgrade(settings.database_url)
    run_id = uuid.uuid4().hex[:16]
    if spec.shard_size is None:
        spec = spec.model_copy(update={"shard_size": defaults_for(settings.device).shard_size})
    if spec.layout is None:  # recorded, so every worker and reader of the run agrees
        spec = spec.model_copy(update={"layout": settings.layout})
    assert spec.shard_size is not None
    shard_of = cut_shards([item.group_id for item in items], spec.shard_size)
    shard_sizes = Counter(shard_of)
    shard_count = len(shard_sizes)
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
                preprocess=checked.preprocess.as_dict(),
                patch_size=spec.patch_size,
                top_patches=spec.top_patches,
                class_names=loaded.class_names,
                # Where items may be read from: decided once, by whoever planned the run.
                config={
                    **spec.model_dump(),
                    "source_roots": allowed_roots(spec.source, settings.source_roots),
                    **({"weights": loaded.weights} if loaded.weights else {}),
                },
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
                        "n_items": shard_sizes[i],
                    }
                    for i in range(shard_count)
                ],
            ).scalars()
        )
        rows = [
            {
                "run_id": run_id,
                "shard_id": shard_ids[shard_of[n]],
                "ordinal": n,
                "source_uri": item.uri,
                "label": item.label,
                "box": item.box,
                "group_id": item.group_id,
                "view": item.view,
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
        if run.status == RunStatus.DELETING:
            raise PlanError(
                f"run {run_id} is being deleted; nothing to resume. "
                f"`camaudit gc --run {run_id}` finishes the job"
            )
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
            shard.lease_expires_at = None
        # Commits keep the counters by adding each shard's change; failed shards made pending
        # again change them here, so the run is recounted from its shards once (resume is rare).
        counts = recount_counts(session, run_id)
        run.shards_done, run.shards_failed = counts.shards_done, counts.shards_failed
        run.n_done, run.n_failed = counts.n_done, counts.n_failed
        if shards and run.status in RunStatus.TERMINAL:
            run.status = RunStatus.RUNNING
            run.finished_at = None
        return [shard.id for shard in shards]
