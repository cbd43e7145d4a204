"""A planted shortcut: a small mark in a corner of every image of one class.

Real datasets leak the label through things that are not the object (a hospital's ruler, a
photographer's watermark). A model trained on such data may learn the mark instead of the
object, with a fine accuracy; an audit has to catch it. The mark is a two-colour checker
square (12 % of the shorter side, at least 10 pixels) in a corner the object does not touch,
so "does this region overlap the mark" has a clean answer.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MARK_COLOURS", "SHORTCUTS", "mark_box", "stamp_mark"]

SHORTCUTS = ("corner",)
MARK_COLOURS = ((255, 0, 255), (255, 255, 255))
_MARGIN = 2


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def mark_box(
    width: int, height: int, object_box: tuple[int, int, int, int], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A corner square (x1/y1 exclusive) off the object's box; the emptiest corner if all touch it."""
    side = max(10, round(0.12 * min(width, height)))
    far_x, far_y = width - _MARGIN - side, height - _MARGIN - side
    corners = [
        (x, y, x + side, y + side)
        for x, y in ((_MARGIN, _MARGIN), (far_x, _MARGIN), (_MARGIN, far_y), (far_x, far_y))
    ]
    free = [c for c in corners if not _overlaps(c, object_box)]
    if not free:
        raise ValueError("the object covers every corner; no room for a mark")
    return free[int(rng.integers(len(free)))]


def stamp_mark(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The image with a 2 x 2 checker of :data:`MARK_COLOURS` painted over ``box``."""
    out = image.copy()
    x0, y0, x1, y1 = box
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    first, second = (np.asarray(c, dtype=np.uint8) for c in MARK_COLOURS)
    out[y0:ym, x0:xm] = first
    out[ym:y1, xm:x1] = first
    out[y0:ym, xm:x1] = second
    out[ym:y1, x0:xm] = second
    return out
