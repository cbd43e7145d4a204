"""Figures of a finished SQLite run computed with plain SQL, PIL and numpy, for tests to compare the
analysis modules and the report with.

Nothing here imports the code under test: the rows are read with ``sqlite3`` and the stored PNGs
are cut out of their files by the byte range on their rows, so a bug in the query, localisation
or report code cannot cancel itself out in the comparison.
"""

from __future__ import annotations

import io
import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def connect(database_url: str) -> sqlite3.Connection:
    assert database_url.startswith("sqlite:///"), database_url
    return sqlite3.connect(database_url.removeprefix("sqlite:///"))


def rows(database_url: str, sql: str, *params: object) -> list[tuple]:
    with connect(database_url) as db:
        return db.execute(sql, params).fetchall()


def stored_png(output_uri: str, key: str, offset: int | None, length: int | None) -> np.ndarray:
    """A map PNG as uint8 [H, W], read from the run's folder (a packed tar member or a file)."""
    with open(Path(output_uri) / key, "rb") as f:
        if offset is not None:
            f.seek(offset)
        data = f.read() if length is None else f.read(length)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


def stretch_mask(box: list[float], source: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Input pixels of a stretched image whose centres, in source pixels, lie in the box (edges in)."""
    (width, height), (rows_, cols) = source, size
    xs = (np.arange(cols) + 0.5) * width / cols
    ys = (np.arange(rows_) + 0.5) * height / rows_
    return ((ys >= box[1]) & (ys <= box[3]))[:, None] & ((xs >= box[0]) & (xs <= box[2]))[None, :]


@dataclass
class Tally:
    n: int = 0
    hits: int = 0
    energy: float = 0.0
    box: float = 0.0

    @property
    def pointing_game(self) -> float:
        return self.hits / self.n

    @property
    def energy_in_box(self) -> float:
        return self.energy / self.n

    @property
    def box_fraction(self) -> float:
        return self.box / self.n


def localisation(database_url: str, run_id: str) -> tuple[dict[str, Tally], dict[tuple[str, int], Tally]]:
    """Pointing game and energy-in-box per method and per (method, class) of a stretched run."""
    preprocess, names, output = rows(
        database_url, "select preprocess, class_names, output_uri from runs where id = ?", run_id
    )[0]
    preprocess, names = json.loads(preprocess), json.loads(names)
    assert preprocess["resize"] == "stretch", "the hand computation knows the stretch transform only"
    size = tuple(preprocess["size"])
    maps = rows(
        database_url,
        "select h.method, h.target_class, h.object_key, h.object_offset, h.object_length, i.box, i.width, "
        "i.height, i.label from heatmaps h join items i on i.id = h.item_id where h.run_id = ? "
        "and i.status = 'done' and i.box is not null and i.label is not null",
        run_id,
    )
    per_method: dict[str, Tally] = defaultdict(Tally)
    per_class: dict[tuple[str, int], Tally] = defaultdict(Tally)
    for method, target, key, offset, length, box, width, height, label in maps:
        if names.index(label) != target:
            continue  # a map of another class than the labelled one
        levels = stored_png(output, key, offset, length).astype(np.float64)
        mask = stretch_mask(json.loads(box), (width, height), size)
        peak = divmod(int(np.argmax(levels)), levels.shape[1])
        for tally in (per_method[method], per_class[method, target]):
            tally.n += 1
            tally.hits += bool(mask[peak])
            tally.energy += levels[mask].sum() / levels.sum()
            tally.box += mask.mean()
    return dict(per_method), dict(per_class)
