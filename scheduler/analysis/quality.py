"""How good are a run's explanations? Localisation, faithfulness and a sanity check.

Three questions, each answered with a standard measure:

* **Do the maps point at the object?** Where items carry a label and an object box (source
  pixels), the stored map of the labelled class (PNG, model-input size) is read back. The
  *pointing game* scores a hit when the map's maximum (the first one in row-major order)
  falls inside the box; *energy-in-box* is the fraction of the map's mass inside it. The box
  is mapped to input pixels through the run's recorded transform (stretch, centre crop or
  letterbox: ``workers.preprocess``); an input pixel counts as inside when its centre, mapped
  back to the source, is. ``box_fraction`` (the share of input pixels inside the box) is
  energy-in-box's chance level: a map spread evenly scores exactly that. Items whose run
  holds no map of their labelled class (top-1 targets and a wrong prediction) cannot be
  scored and are counted as ``unexplained``; items whose box reaches outside what a centre
  crop kept are counted as ``clipped`` and not scored either: the model never saw all of the
  object, so no map could point at it there.
* **Do the maps name the pixels the model needs?** Deletion and insertion (Petsiuk et al.,
  RISE, 2018) on a sample: the most salient pixels (by the stored map) are removed in
  ``steps`` equal steps, replaced by the dataset mean (zeros after normalisation), and the
  target class's softmax probability is recorded; insertion starts from a blurred image and
  puts the most salient pixels back. The area under each curve (x from 0 to 1) is reported:
  a lower deletion AUC and a higher insertion AUC mean a more faithful map. The same curves
  for a random pixel order are reported as method ``random``, the bar to beat.
* **Do the maps depend on what the model learned?** The model-randomisation check (Adebayo
  et al., Sanity Checks for Saliency Maps, 2018): re-initialise the last ``randomise``
  parameterised modules of a copy of the model and compute the same maps with it. Maps that
  barely change (high correlation) describe the input, not the model.

The target of an item in faithfulness and the sanity check is its top-1 prediction where the
run explained that class, else the class of its strongest stored map.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from sqlalchemy import select
from torch import nn

from scheduler.analysis.drift import pearson
from scheduler.query import DELETING, QueryError, get_run
from scheduler.render import read_item_source
from schema.db import session_scope
from schema.models import Heatmap, Item, ItemStatus, Run
from workers.cam import CamEngine
from workers.images import decode_image
from workers.localisation import box_mask
from workers.map_reads import StoredMap, read_map_png
from workers.models import LoadedModel, ModelLoadError, load_model
from workers.preprocess import Preprocess
from workers.runtime import pick_device
from workers.storage import ObjectNotFoundError, Storage, open_storage

__all__ = [
    "Faithfulness",
    "Localisation",
    "LocalisationReport",
    "QualityError",
    "QualityReport",
    "SanityCheck",
    "assess_quality",
    "faithfulness",
    "localisation",
    "parameterised_modules",
    "randomised_copy",
    "sanity_check",
]

READERS = 16
_IN_CHUNK = 500  # ids per IN (...) list


class QualityError(ValueError):
    """The run cannot be assessed (unknown, no usable items, the model changed or cannot load)."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Localisation:
    """Pointing game and energy-in-box of one method and layer; ``target_class`` None = all classes."""

    method: str
    layer: str
    target_class: int | None
    class_name: str | None
    n: int
    pointing_game: float
    energy_in_box: float
    box_fraction: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LocalisationReport:
    boxed_items: int
    unexplained: int
    methods: list[Localisation] = field(default_factory=list)
    classes: list[Localisation] = field(default_factory=list)
    clipped: int = 0  # boxed items whose box the crop cut: not scored

    def get(self, method: str, layer: str | None = None) -> Localisation:
        for row in self.methods:
            if row.method == method and (layer is None or row.layer == layer):
                return row
        raise KeyError(f"no localisation figures for {method!r}; have {[r.method for r in self.methods]}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "boxed_items": self.boxed_items,
            "unexplained": self.unexplained,
            "clipped": self.clipped,
            "methods": [r.as_dict() for r in self.methods],
            "classes": [r.as_dict() for r in self.classes],
        }


@dataclass(frozen=True)
class Faithfulness:
    """Deletion and insertion of one method and layer, averaged over the sample."""

    method: str
    layer: str
    n: int
    deletion_auc: float
    insertion_auc: float
    deletion_curve: list[float]
    insertion_curve: list[float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SanityCheck:
    """Mean correlation of the trained model's maps with those of its randomised copy."""

    method: str
    layer: str
    n: int
    randomised: list[str]
    mean_correlation: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QualityReport:
    run_id: str
    localisation: LocalisationReport
    faithfulness: list[Faithfulness] | None = None
    sanity: list[SanityCheck] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "localisation": self.localisation.as_dict(),
            "faithfulness": None if self.faithfulness is None else [f.as_dict() for f in self.faithfulness],
            "sanity": None if self.sanity is None else [s.as_dict() for s in self.sanity],
        }


# --------------------------------------------------------------------------- shared reading


def _open_run(database_url: str, run_id: str) -> Run:
    try:
        run = get_run(database_url, run_id)
    except QueryError as exc:
        raise QualityError(str(exc)) from exc
    if run.status == DELETING:
        raise QualityError(f"run {run_id} is being deleted; assess runs that are kept")
    return run


def _storage(run: Run, endpoint_url: str | None, region: str | None) -> Storage:
    return open_storage(run.output_uri, endpoint_url=endpoint_url, region=region, create_bucket=False)


def _read_png(storage: Storage, heatmap: StoredMap) -> np.ndarray:
    try:
        return read_map_png(storage, heatmap)
    except ObjectNotFoundError as exc:
        raise QualityError(
            f"stored map {storage.locate(heatmap.object_key)} is missing; was the storage moved or emptied?"
        ) from exc


def _class_index(label: str | None, names: Sequence[str]) -> int | None:
    if label is None:
        return None
    if label in names:
        return list(names).index(label)
    return int(label) if label.isdigit() else None


def _spread(values: list[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` values evenly spread over the list: deterministic, and covers the whole run."""
    if limit is None or len(values) <= limit:
        return values
    if limit <= 0:
        return []
    picks = np.unique(np.linspace(0, len(values) - 1, limit).round().astype(int))
    return [values[i] for i in picks]


def _heatmaps_of(database_url: str, item_ids: list[int]) -> dict[int, list[Heatmap]]:
    found: dict[int, list[Heatmap]] = defaultdict(list)
    with session_scope(database_url) as session:
        for start in range(0, len(item_ids), _IN_CHUNK):
            chunk = item_ids[start : start + _IN_CHUNK]
            for h in session.execute(select(Heatmap).where(Heatmap.item_id.in_(chunk))).scalars():
                found[h.item_id].append(h)
        session.expunge_all()
    return found


def _names(run: Run) -> list[str]:
    return [str(n) for n in run.class_names or []]


def _class_name(run: Run, target: int | None) -> str | None:
    names = _names(run)
    return names[target] if target is not None and 0 <= target < len(names) else None


# --------------------------------------------------------------------------- localisation


def point_and_energy(levels: np.ndarray, mask: np.ndarray) -> tuple[bool, float]:
    """(Is the map's first maximum inside the mask, the fraction of the map's mass inside it)."""
    peak = np.unravel_index(int(np.argmax(levels)), levels.shape)
    total = float(levels.sum(dtype=np.float64))
    energy = float(levels[mask].sum(dtype=np.float64)) / total if total > 0 else 0.0
    return bool(mask[peak]), energy


@dataclass
class _Tally:
    n: int = 0
    hits: int = 0
    energy: float = 0.0
    box: float = 0.0

    def add(self, hit: bool, energy: float, box_fraction: float) -> None:
        self.n += 1
        self.hits += hit
        self.energy += energy
        self.box += box_fraction


def localisation(
    database_url: str,
    run_id: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    max_items: int | None = None,
) -> LocalisationReport:
    """Pointing game and energy-in-box from the stored maps of items with a label and a box.

    ``max_items`` bounds the items read (evenly spread over the run); None reads them all.
    """
    run = _open_run(database_url, run_id)
    names = _names(run)
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Item.id, Item.label, Item.box, Item.width, Item.height)
            .where(
                Item.run_id == run_id,
                Item.status == ItemStatus.DONE,
                Item.box.is_not(None),
                Item.label.is_not(None),
            )
            .order_by(Item.ordinal)
        ).all()
    boxed = [
        (item_id, target, box, (int(w), int(h)))
        for item_id, label, box, w, h in rows
        if box and w and h and (target := _class_index(label, names)) is not None
    ]
    boxed = _spread(boxed, max_items)
    geometry = Preprocess.from_dict(run.preprocess, geometry_only=True)
    heatmaps = _heatmaps_of(database_url, [item_id for item_id, *_ in boxed])
    jobs = []
    unexplained = clipped = 0
    for item_id, target, box, size in boxed:
        transform = geometry.transform(*size)
        if transform.clips(box):
            clipped += 1
            continue
        own = [h for h in heatmaps.get(item_id, []) if h.target_class == target]
        unexplained += not own
        jobs.extend((h, box, transform) for h in own)
    storage = _storage(run, endpoint_url, region)
    per_method: dict[tuple[str, str], _Tally] = defaultdict(_Tally)
    per_class: dict[tuple[str, str, int], _Tally] = defaultdict(_Tally)
    with ThreadPoolExecutor(READERS, "quality-read") as pool:
        maps = pool.map(lambda job: _read_png(storage, job[0]), jobs)
        for (heatmap, box, transform), levels in zip(jobs, maps, strict=True):
            if levels.shape != (transform.input[1], transform.input[0]):
                raise QualityError(
                    f"stored map {heatmap.object_key} is {levels.shape[1]}x{levels.shape[0]}, "
                    f"not the run's input size {transform.input[0]}x{transform.input[1]}"
                )
            mask = box_mask(box, transform)
            hit, energy = point_and_energy(levels, mask)
            fraction = float(mask.mean())
            per_method[heatmap.method, heatmap.layer].add(hit, energy, fraction)
            per_class[heatmap.method, heatmap.layer, heatmap.target_class].add(hit, energy, fraction)

    def row(method: str, layer: str, target: int | None, t: _Tally) -> Localisation:
        return Localisation(
            method, layer, target, _class_name(run, target), t.n, t.hits / t.n, t.energy / t.n, t.box / t.n
        )

    return LocalisationReport(
        boxed_items=len(boxed),
        unexplained=unexplained,
        clipped=clipped,
        methods=[row(m, layer, None, t) for (m, layer), t in sorted(per_method.items())],
        classes=[row(m, layer, c, t) for (m, layer, c), t in sorted(per_class.items())],
    )


# --------------------------------------------------------------------------- the sample


@dataclass
class _Sample:
    """Decoded images of a few items, each with one target and its stored map per (method, layer)."""

    item_ids: list[int]
    images: torch.Tensor  # [N, 3, H, W] normalised, on the CPU
    targets: torch.Tensor  # [N] int64
    maps: dict[tuple[str, str], dict[int, StoredMap]]  # (method, layer) -> {row in sample: its map}


def _choose_target(item: Item, own: list[Heatmap]) -> int:
    classes = {h.target_class for h in own}
    if item.pred_class is not None and item.pred_class in classes:
        return int(item.pred_class)
    return int(max(own, key=lambda h: h.target_score).target_class)


def _load_sample(
    database_url: str, run: Run, sample: int, endpoint_url: str | None, region: str | None
) -> _Sample:
    if sample < 1:
        raise QualityError(
            f"sample is how many items to re-run through the model and must be >= 1, got {sample}"
        )
    with session_scope(database_url) as session:
        items = list(
            session.execute(
                select(Item)
                .where(Item.run_id == run.id, Item.status == ItemStatus.DONE)
                .order_by(Item.ordinal)
            ).scalars()
        )
        session.expunge_all()
    # Twice the sample is listed so that items whose source no longer decodes can be replaced.
    candidates = _spread(items, 2 * sample)
    heatmaps = _heatmaps_of(database_url, [i.id for i in candidates])
    usable = [i for i in candidates if heatmaps.get(i.id)]
    first = _spread(usable, sample)
    first_ids = {i.id for i in first}
    pre = Preprocess.from_dict(run.preprocess)
    chosen: list[tuple[Item, int, torch.Tensor, list[Heatmap]]] = []
    for item in first + [i for i in usable if i.id not in first_ids]:
        if len(chosen) == sample:
            break
        try:
            data = read_item_source(run, item.source_uri, endpoint_url=endpoint_url, region=region)
            decoded = decode_image(data, pre, pre.mean, pre.std, name=item.source_uri)
        except (OSError, ValueError):  # ImageDecodeError and SourceRefused are ValueErrors
            continue  # the source changed since the run; another item stands in
        own = heatmaps[item.id]
        chosen.append((item, _choose_target(item, own), decoded.tensor, own))
    if not chosen:
        raise QualityError(
            f"run {run.id} has no item with stored maps whose source image can still be read; "
            "faithfulness and the sanity check re-run the model on the source images"
        )
    maps: dict[tuple[str, str], dict[int, StoredMap]] = defaultdict(dict)
    for row, (_, target, _, own) in enumerate(chosen):
        for h in own:
            if h.target_class == target:
                maps[h.method, h.layer][row] = h
    return _Sample(
        item_ids=[c[0].id for c in chosen],
        images=torch.stack([c[2] for c in chosen]),
        targets=torch.tensor([c[1] for c in chosen], dtype=torch.int64),
        maps=dict(maps),
    )


def _load_model(run: Run, device: str) -> LoadedModel:
    try:
        loaded = load_model(run.model_ref, run.checkpoint_uri, device=pick_device(device))
    except ModelLoadError as exc:
        raise QualityError(f"cannot load the model of run {run.id} ({run.model_ref}): {exc}") from exc
    if run.checkpoint_sha256 and loaded.checkpoint_sha256 != run.checkpoint_sha256:
        raise QualityError(
            f"the checkpoint of run {run.id} changed since the run "
            f"(sha256 {run.checkpoint_sha256[:12]}… then, {(loaded.checkpoint_sha256 or 'none')[:12]}… now); "
            "figures from other weights would not describe these maps"
        )
    return loaded


# --------------------------------------------------------------------------- faithfulness


def _probabilities(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch):
            logits = model(images[start : start + batch].to(device))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise QualityError(
                    "faithfulness reads class probabilities and needs a model that returns "
                    f"logits [B, classes], got {type(logits).__name__}"
                )
            probs = torch.softmax(logits.float(), dim=1)
            out.append(probs.gather(1, targets[start : start + batch, None].to(device))[:, 0].cpu())
    return torch.cat(out)


def _blur(image: torch.Tensor) -> torch.Tensor:
    """Strong Gaussian blur (sigma a twentieth of the longer side): keeps colours, removes shapes."""
    sigma = max(image.shape[-2:]) / 20.0
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * (min(image.shape[-2:]) // 2) - 1)
    return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])


def _ranks(saliency: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Each pixel's place in the order of removal; ties (uint8 maps have many) in a seeded random order."""
    jitter = rng.random(saliency.shape)  # < 1, so it only reorders pixels of one level
    order = np.argsort(-(saliency.astype(np.float64) + jitter), axis=None, kind="stable")
    ranks = np.empty(order.size, dtype=np.int64)
    ranks[order] = np.arange(order.size)
    return torch.from_numpy(ranks.reshape(saliency.shape))


def _curves(image: torch.Tensor, blurred: torch.Tensor, ranks: torch.Tensor, steps: int) -> torch.Tensor:
    """Deletion then insertion images, ``steps + 1`` each: [2 * (steps + 1), C, H, W]."""
    pixels = ranks.numel()
    cuts = torch.tensor([round(k * pixels / steps) for k in range(steps + 1)])
    masks = (ranks[None] < cuts[:, None, None])[:, None]  # [steps + 1, 1, H, W]: pixels gone so far
    deletion = image[None] * ~masks  # the mean fill: zeros after normalisation
    insertion = torch.where(masks, image[None], blurred[None])
    return torch.cat([deletion, insertion])


def _auc(curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def _faithfulness(
    loaded: LoadedModel,
    sample: _Sample,
    storage: Storage,
    steps: int,
    seed: int,
    batch_size: int,
) -> list[Faithfulness]:
    rng = np.random.default_rng(seed)
    n, _, height, width = sample.images.shape
    saliencies: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    with ThreadPoolExecutor(READERS, "quality-read") as pool:
        for key, keys in sample.maps.items():
            rows = sorted(keys)
            found = pool.map(_read_png, [storage] * len(rows), [keys[r] for r in rows])
            saliencies[key] = dict(zip(rows, found, strict=True))
    saliencies["random", "-"] = {row: rng.random((height, width)) for row in range(n)}
    for (method, _), maps in saliencies.items():
        for row, saliency in maps.items():
            if saliency.shape != (height, width):
                raise QualityError(
                    f"stored {method} map of item {sample.item_ids[row]} is {saliency.shape}, "
                    f"not the run's input size {(height, width)}"
                )
    curves: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    for row in range(n):
        image = sample.images[row]
        blurred = _blur(image)
        keys = [key for key, maps in saliencies.items() if row in maps]
        images = torch.cat(
            [_curves(image, blurred, _ranks(saliencies[key][row], rng), steps) for key in keys]
        )
        targets = sample.targets[row].repeat(images.shape[0])
        probs = _probabilities(loaded.model, images, targets, batch_size).numpy()
        for key, part in zip(keys, np.split(probs, len(keys)), strict=True):
            curves[key].append(part)
    results = []
    for (method, layer), parts in curves.items():
        deletion = np.mean([p[: steps + 1] for p in parts], axis=0)
        insertion = np.mean([p[steps + 1 :] for p in parts], axis=0)
        results.append(
            Faithfulness(
                method=method,
                layer=layer,
                n=len(parts),
                deletion_auc=_auc(deletion),
                insertion_auc=_auc(insertion),
                deletion_curve=[float(v) for v in deletion],
                insertion_curve=[float(v) for v in insertion],
            )
        )
    return results


def faithfulness(
    database_url: str,
    run_id: str,
    *,
    sample: int = 32,
    steps: int = 10,
    device: str = "auto",
    endpoint_url: str | None = None,
    region: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> list[Faithfulness]:
    """Deletion and insertion AUCs per method and layer on ``sample`` items (plus a random order)."""
    if steps < 1:
        raise QualityError(f"steps must be >= 1 (pixels are removed in that many equal steps), got {steps}")
    run = _open_run(database_url, run_id)
    loaded = _load_model(run, device)
    picked = _load_sample(database_url, run, sample, endpoint_url, region)
    return _faithfulness(loaded, picked, _storage(run, endpoint_url, region), steps, seed, batch_size)


# --------------------------------------------------------------------------- sanity check


def parameterised_modules(model: nn.Module) -> list[str]:
    """Modules holding parameters of their own, in registration order (forward order for sequential nets)."""
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def randomised_copy(model: nn.Module, last: int, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose last ``last`` parameterised modules are re-initialised."""
    names = parameterised_modules(model)
    if not 1 <= last <= len(names):
        raise QualityError(
            f"randomise must be within 1..{len(names)} (the model's parameterised modules), got {last}"
        )
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    picked = names[-last:]
    # Seeded, but the caller's random streams (CPU and every CUDA device in use) are left as they were.
    devices = sorted({p.device.index or 0 for p in clone.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name in picked:
            module = modules[name]
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                with torch.no_grad():
                    for param in module.parameters(recurse=False):
                        param.normal_(0.0, 0.02)
    return clone.eval(), picked


def _raw_maps(engine: CamEngine, sample: _Sample, batch: int) -> dict[tuple[str, str], np.ndarray]:
    device = next(engine.model.parameters()).device
    parts: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    for start in range(0, sample.images.shape[0], batch):
        images = sample.images[start : start + batch].to(device)
        result = engine(images, targets=sample.targets[start : start + batch].to(device))
        for method, layers in result.raw.items():
            for layer, raw in layers.items():
                parts[method, layer].append(raw[:, 0].float().cpu().numpy())
    return {key: np.concatenate(chunks) for key, chunks in parts.items()}


def _sanity(
    run: Run, loaded: LoadedModel, sample: _Sample, randomise: int, seed: int, batch: int
) -> list[SanityCheck]:
    methods, layers = list(run.methods), list(run.layers)
    random_model, picked = randomised_copy(loaded.model, randomise, seed)
    reshape = loaded.reshape
    trained = _raw_maps(
        CamEngine(loaded.model, layers=layers, methods=methods, amp=False, reshape=reshape), sample, batch
    )
    scrambled = _raw_maps(
        CamEngine(random_model, layers=layers, methods=methods, amp=False, reshape=reshape), sample, batch
    )
    checks = []
    for key in sorted(trained):
        values = [pearson(a, b) for a, b in zip(trained[key], scrambled[key], strict=True)]
        checks.append(SanityCheck(key[0], key[1], len(values), picked, float(np.mean(values))))
    return checks


def sanity_check(
    database_url: str,
    run_id: str,
    *,
    sample: int = 32,
    randomise: int = 3,
    device: str = "auto",
    endpoint_url: str | None = None,
    region: str | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> list[SanityCheck]:
    """Correlation of the run's maps with a top-randomised model's, per method and layer."""
    run = _open_run(database_url, run_id)
    loaded = _load_model(run, device)
    picked = _load_sample(database_url, run, sample, endpoint_url, region)
    return _sanity(run, loaded, picked, randomise, seed, batch_size)


# --------------------------------------------------------------------------- all of it


def assess_quality(
    database_url: str,
    run_id: str,
    *,
    sample: int = 32,
    model_checks: bool = True,
    steps: int = 10,
    randomise: int = 3,
    device: str = "auto",
    endpoint_url: str | None = None,
    region: str | None = None,
    max_items: int | None = None,
    seed: int = 0,
) -> QualityReport:
    """Localisation from the stored maps; with ``model_checks`` also faithfulness and the sanity check.

    The model checks share one model load and one decoded sample of ``sample`` items.
    """
    local = localisation(database_url, run_id, endpoint_url=endpoint_url, region=region, max_items=max_items)
    if not model_checks:
        return QualityReport(run_id, local)
    if steps < 1:
        raise QualityError(f"steps must be >= 1 (pixels are removed in that many equal steps), got {steps}")
    run = _open_run(database_url, run_id)
    loaded = _load_model(run, device)
    picked = _load_sample(database_url, run, sample, endpoint_url, region)
    storage = _storage(run, endpoint_url, region)
    faithful = _faithfulness(loaded, picked, storage, steps, seed, batch_size=64)
    sanity = _sanity(run, loaded, picked, randomise, seed, batch=16)
    return QualityReport(run_id, local, faithful, sanity)
