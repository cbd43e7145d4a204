"""Shards that never split a group: every item of a case (its views) lands in the same shard.

A case seen from several views is explained and judged as one, so its items must be in one
shard: one worker, one commit. Items keep their source order (their ordinals); only the shard
each one belongs to follows the groups. Items without a group are groups of one. A shard is
closed when the next group would overflow it; a group larger than a shard gets a shard of its
own rather than being cut.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["cut_shards"]


def cut_shards(group_ids: Sequence[str | None], shard_size: int) -> list[int]:
    """The shard index of every item, in item order; groups in order of their first item."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    members: dict[object, list[int]] = {}
    for n, group in enumerate(group_ids):
        members.setdefault(group if group is not None else ("single", n), []).append(n)
    shard_of = [0] * len(group_ids)
    shard, filled = 0, 0
    for items in members.values():
        if filled and filled + len(items) > shard_size:
            shard, filled = shard + 1, 0
        for n in items:
            shard_of[n] = shard
        filled += len(items)
    return shard_of
