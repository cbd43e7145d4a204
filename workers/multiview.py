"""Cases for a multi-view model: whole groups in view order, one ``[B, V, C, H, W]`` input.

A multi-view model takes every view of a case at once (``camaudit run --views L-CC,L-MLO``).
The worker keeps a shard's items in source order but feeds the model whole cases: a case is
complete when every item of its group has been decoded. A case lacking a declared view, or
holding one twice, or whose view cannot be read, fails as a whole (``--missing-view fail``)
with a reason naming the case and the view: its items are never explained alone. With
``--missing-view zeros`` a missing or unreadable view is a black image in its place, and the
case's other views are explained. The engine's per-view results (``[B, V, K, ...]``) are
flattened back to one row per item, so maps, raw maps and patch scores are written exactly as
for single images, each item with its own source and boxes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from workers.cam import CamEngine, CamResult
from workers.images import DecodedPixels, normalise_batch, stack_pixels
from workers.shard_rows import failed_item_row

if TYPE_CHECKING:
    from workers.shard import ShardWork, WorkItem

__all__ = ["case_batches", "explain_cases", "order_cases"]

Decoded = tuple[DecodedPixels, bytes | None]


def order_cases(items: list[WorkItem]) -> list[WorkItem]:
    """Items of one group next to each other, groups in order of their first item."""
    first: dict[object, int] = {}
    for n, item in enumerate(items):
        first.setdefault(item.group_id if item.group_id is not None else ("single", n), n)
    return sorted(
        items,
        key=lambda item: (
            first[item.group_id if item.group_id is not None else ("single", items.index(item))],
        ),
    )


def _problem(members: list[WorkItem], views: list[str], missing_view: str) -> str | None:
    group = members[0].group_id
    if group is None:
        return "a multi-view run needs a group_id on every item (the case it belongs to)"
    named = [m.view for m in members]
    if any(v is None for v in named):
        return f"case {group}: an item has no view; a multi-view run needs the view of every item"
    unknown = sorted({v for v in named if v not in views})
    if unknown:
        return f"case {group}: view {unknown[0]} is not one of the run's views ({', '.join(views)})"
    twice = sorted({v for v in named if named.count(v) > 1})
    if twice:
        return f"case {group}: view {twice[0]} appears {named.count(twice[0])} times"
    missing = [v for v in views if v not in named]
    if missing and missing_view == "fail":
        wanted = ", ".join(views)
        return f"case {group}: view {missing[0]} is missing (views: {wanted}; --missing-view zeros fills it)"
    return None


def case_batches(
    work: ShardWork, stream: Iterator[tuple[WorkItem, Decoded | str]]
) -> Iterator[tuple[list[tuple[WorkItem, DecodedPixels]], list[dict[str, Any]]]]:
    """(batch of whole cases, rows of failed items) as cases complete; ``batch_size`` cases a batch."""
    views = list(work.views or [])
    sizes: dict[object, int] = {}
    for n, item in enumerate(work.items):
        key = item.group_id if item.group_id is not None else ("single", n)
        sizes[key] = sizes.get(key, 0) + 1
    waiting: dict[object, list[tuple[WorkItem, Decoded | str]]] = {}
    batch: list[tuple[WorkItem, DecodedPixels]] = []
    cases = 0
    for n, (item, opened) in enumerate(stream):
        key = item.group_id if item.group_id is not None else ("single", n)
        waiting.setdefault(key, []).append((item, opened))
        if len(waiting[key]) < sizes.get(key, 1):
            continue
        arrived = waiting.pop(key)
        members = [m for m, _ in arrived]
        failed: list[dict[str, Any]] = []
        problem = _problem(members, views, work.missing_view)
        unreadable = [(m, o) for m, o in arrived if isinstance(o, str)]
        if problem is None and unreadable and work.missing_view == "fail":
            m, reason = unreadable[0]
            problem = f"case {m.group_id}: view {m.view} cannot be read: {reason}"
        if problem is not None:
            yield [], [failed_item_row(m, problem) for m in members]
            continue
        failed = [failed_item_row(m, str(o)) for m, o in unreadable]
        good = [(m, o[0]) for m, o in arrived if not isinstance(o, str)]
        if failed:
            yield [], failed
        if not good:
            continue
        batch.extend(sorted(good, key=lambda pair: views.index(str(pair[0].view))))
        cases += 1
        if cases == work.batch_size:
            yield batch, []
            batch, cases = [], 0
    if batch:
        yield batch, []


def explain_cases(
    engine: CamEngine,
    batch: list[tuple[WorkItem, DecodedPixels]],
    views: list[str],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    targets: Any,
    device: torch.device,
) -> CamResult:
    """One ``[B, V, C, H, W]`` forward for the batch's cases; results flattened to one row per item."""
    order: dict[object, int] = {}
    slots = []
    for item, _ in batch:
        case = order.setdefault(item.group_id, len(order))
        slots.append(case * len(views) + views.index(str(item.view)))
    pixels = stack_pixels([img for _, img in batch])
    full = torch.zeros((len(order) * len(views), *pixels.shape[1:]), dtype=torch.uint8)
    full[slots] = pixels
    x = normalise_batch(full.to(device), mean, std)
    x = x.reshape(len(order), len(views), *x.shape[1:])
    if isinstance(targets, torch.Tensor):
        first = {}
        for n, (item, _) in enumerate(batch):
            first.setdefault(item.group_id, n)
        targets = targets[list(first.values())]
    result = engine(x, targets=targets)
    cases = [slot // len(views) for slot in slots]
    return result.select_images(cases, views_of=[slot % len(views) for slot in slots])
