"""Synthetic images with known object boxes, so CAM localisation can be measured, not eyeballed.

Each image holds exactly one filled shape (one of ``CLASS_NAMES``) at a random position and
size, on a cluttered background: colour gradients, low-frequency colour noise, thin lines,
scribbles, small fuzzy specks and pixel noise. The clutter is salient but never shaped like a
class, so a model that classifies well has to look at the object, and a CAM that points at the
clutter is genuinely wrong. Source images have random widths and heights (aspect ratio up to
``MAX_ASPECT``), so code that maps boxes between model input and source pixels is exercised
with non-square images.

Dataset layout written by :func:`make_dataset`::

    OUT_DIR/
      images/000000.png, 000001.png, ...   RGB PNG, each side in [min_size, max_size]
      manifest.jsonl                        one JSON object per line, one line per image

Manifest line format (keys in this order)::

    {"uri": "images/000000.png", "label": "circle", "box": [x0, y0, x1, y1]}

With ``shortcut="corner"`` the lines of the marked class also carry ``"mark": [x0, y0, x1, y1]``,
the box of the planted corner mark; :func:`make_view_dataset` adds ``group_id`` and ``view``.

``uri`` is relative to the manifest's directory. ``box`` is the tight bounding box of the
object's pixels in source-image pixel coordinates; ``x0``/``y0`` are inclusive and ``x1``/``y1``
exclusive, so the box width is ``x1 - x0``.

Image ``i`` is drawn from a random stream seeded by ``(seed, i)`` alone, so the same seed
yields the same bytes, and growing ``n`` only appends images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")

# Object extent as a fraction of the shorter image side: large enough that the object covers
# several cells of a 16x16 feature map at 128x128 input, small enough that its box is a
# minority of the image and pointing into it is a real test.
_OBJECT_FRACTION = (0.3, 0.48)
# Models stretch images to a square input, which turns circles into ellipses and squares into
# rhombi; capping the source aspect ratio keeps the classes recognisable after that stretch.
MAX_ASPECT = 1.35
# Minimum RGB distance between the object colour and the background under it.
MIN_CONTRAST = 110.0


@dataclass(frozen=True)
class Sample:
    """One rendered image with its ground truth."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool, True on the object's pixels
    label: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """Independent stream per image, so image ``index`` does not depend on how many come before."""
    return np.random.default_rng([seed, index])


@dataclass(frozen=True)
class Parts:
    """An image before compositing: kept apart so training can pair objects with new backgrounds."""

    background: np.ndarray  # (H, W, 3) float32, clutter without the object
    mask: np.ndarray  # (H, W) bool, the object's pixels
    label: str
    colour: np.ndarray  # (3,) float, RGB fill of the object
    noise_sigma: float  # std of the pixel noise added over the whole image


def render_parts(
    rng: np.random.Generator,
    *,
    min_size: int = 160,
    max_size: int = 256,
    label: str | None = None,
) -> Parts:
    """Draw the background, the object's mask and its colour; ``label`` forces the class."""
    if min_size < 32 or max_size < min_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if label is None:
        label = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
    elif label not in CLASS_NAMES:
        raise ValueError(f"unknown label {label!r}; expected one of {', '.join(CLASS_NAMES)}")
    width = int(rng.integers(min_size, max_size + 1))
    low = max(min_size, math.ceil(width / MAX_ASPECT))
    high = min(max_size, math.floor(width * MAX_ASPECT))
    height = int(rng.integers(low, high + 1))
    background = _background(rng, width, height)
    mask = _object_mask(rng, label, width, height)
    colour = contrasting_colour(rng, background[mask].mean(axis=0))
    return Parts(background, mask, label, colour, float(rng.uniform(4.0, 10.0)))


def compose(parts: Parts, rng: np.random.Generator) -> Sample:
    """Paint the object over its background and add pixel noise."""
    canvas = parts.background.copy()
    canvas[parts.mask] = parts.colour
    canvas += rng.standard_normal(size=canvas.shape, dtype=np.float32) * np.float32(parts.noise_sigma)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Sample(image=image, mask=parts.mask, label=parts.label, box=mask_box(parts.mask))


def render_sample(
    rng: np.random.Generator,
    *,
    min_size: int = 160,
    max_size: int = 256,
    label: str | None = None,
) -> Sample:
    """Draw one cluttered image holding one object; ``label`` forces the class, else it is random."""
    return compose(render_parts(rng, min_size=min_size, max_size=max_size, label=label), rng)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box of a boolean mask, x1/y1 exclusive."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty: the object was drawn outside the image")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def make_dataset(
    out_dir: Path,
    n: int,
    seed: int,
    *,
    min_size: int = 160,
    max_size: int = 256,
    manifest_name: str = "manifest.jsonl",
    shortcut: str | None = None,
    shortcut_class: str = CLASS_NAMES[0],
) -> Path:
    """Write ``n`` PNG images and their manifest under ``out_dir``; return the manifest path.

    ``shortcut="corner"`` stamps a mark (:mod:`workers.shortcut`) on every image of
    ``shortcut_class``; its box is the manifest's ``mark`` field.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if shortcut is not None:
        from workers.shortcut import SHORTCUTS

        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; expected one of {', '.join(SHORTCUTS)}")
        if shortcut_class not in CLASS_NAMES:
            raise ValueError(
                f"unknown shortcut class {shortcut_class!r}; expected one of {', '.join(CLASS_NAMES)}"
            )
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        sample = render_sample(sample_rng(seed, index), min_size=min_size, max_size=max_size)
        rel = f"images/{index:06d}.png"
        pixels = sample.image
        row: dict[str, object] = {"uri": rel, "label": sample.label, "box": list(sample.box)}
        if shortcut is not None and sample.label == shortcut_class:
            from workers.shortcut import mark_box, stamp_mark

            height, width = pixels.shape[:2]
            mark = mark_box(width, height, sample.box, np.random.default_rng([seed, index, 1]))
            pixels = stamp_mark(pixels, mark)
            row["mark"] = list(mark)
        # Fixed PNG options keep the bytes identical across runs for the same seed.
        Image.fromarray(pixels, mode="RGB").save(out_dir / rel, format="PNG", optimize=False)
        lines.append(json.dumps(row))
    manifest = out_dir / manifest_name
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


# --- background -------------------------------------------------------------------------------


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Float (H, W, 3) canvas: gradient + colour noise + thin clutter that is not class-like."""
    canvas = _gradient(rng, width, height) + _colour_noise(rng, width, height)
    clutter = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(3, 9))):
        _thin_line(rng, draw, width, height)
    for _ in range(int(rng.integers(1, 4))):
        _scribble(rng, draw, width, height)
    canvas = np.asarray(clutter, dtype=np.float32).copy()
    return _fuzzy_specks(rng, canvas)


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    start, end = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.arange(width, dtype=np.float32) * np.float32(math.cos(angle))
    ys = np.arange(height, dtype=np.float32) * np.float32(math.sin(angle))
    proj = ys[:, None] + xs[None, :]
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    return start + t[..., None] * (end - start)


def _colour_noise(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth blotches of colour: upsampled coarse noise, so it has no edges or shapes."""
    cells = int(rng.integers(3, 7))
    coarse = np.clip(128 + rng.normal(0, 40, size=(cells, cells, 3)), 0, 255).astype(np.uint8)
    smooth = Image.fromarray(coarse, mode="RGB").resize((width, height), Image.Resampling.BICUBIC)
    return (np.asarray(smooth, dtype=np.float32) - 128.0) * np.float32(rng.uniform(0.4, 0.9))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(0, 256, size=3))
    return r, g, b


def _thin_line(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    x0, x1 = rng.uniform(-0.1, 1.1, size=2) * width
    y0, y1 = rng.uniform(-0.1, 1.1, size=2) * height
    draw.line([(x0, y0), (x1, y1)], fill=_random_colour(rng), width=int(rng.integers(1, 3)))


def _scribble(rng: np.random.Generator, draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    """Open random walk: busy texture with edges and corners, but never a closed shape."""
    x, y = rng.uniform(0, width), rng.uniform(0, height)
    heading = rng.uniform(0, 2 * math.pi)
    step = rng.uniform(4, 9)
    points = [(x, y)]
    for _ in range(int(rng.integers(6, 16))):
        heading += rng.normal(0, 0.9)
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        points.append((x, y))
    draw.line(points, fill=_random_colour(rng), width=1)


def _fuzzy_specks(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Small blurred dots: blob-like distractors much smaller and softer than any object."""
    height, width, _ = canvas.shape
    alpha = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(alpha)
    short = min(width, height)
    for _ in range(int(rng.integers(2, 6))):
        r = rng.uniform(0.01, 0.025) * short
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    soft = alpha.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.5, 3.0))))
    weight = np.asarray(soft, dtype=np.float32)[..., None] / np.float32(255.0)
    return canvas * (1.0 - weight) + np.asarray(_random_colour(rng), dtype=np.float32) * weight


# --- objects ----------------------------------------------------------------------------------


def contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour far from ``under`` (the mean background colour below the object), so it shows."""
    best, best_dist = None, -1.0
    for _ in range(32):
        colour = rng.uniform(0, 255, size=3)
        dist = float(np.linalg.norm(colour - under))
        if dist >= MIN_CONTRAST:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    assert best is not None
    return best


def _object_mask(rng: np.random.Generator, label: str, width: int, height: int) -> np.ndarray:
    size = rng.uniform(*_OBJECT_FRACTION) * min(width, height)
    half = size / 2
    margin = 2.0
    cx = rng.uniform(half + margin, width - half - margin)
    cy = rng.uniform(half + margin, height - half - margin)
    layer = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    if label == "circle":
        r = half * rng.uniform(0.85, 1.0)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif label == "ring":
        r = half * rng.uniform(0.85, 1.0)
        inner = r * rng.uniform(0.45, 0.65)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif label == "square":
        angle = rng.uniform(-0.25, 0.25)
        # Shrink with the rotation so the rotated square's extent stays within ``size``.
        side = size / (abs(math.cos(angle)) + abs(math.sin(angle))) * rng.uniform(0.85, 1.0)
        corners = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
        draw.polygon(_place(corners, side, angle, cx, cy), fill=1)
    elif label == "triangle":
        angles = [math.pi / 2 + k * 2 * math.pi / 3 + rng.normal(0, 0.08) for k in range(3)]
        unit = [(math.cos(a), -math.sin(a)) for a in angles]
        draw.polygon(_place(unit, half, rng.uniform(-math.pi, math.pi), cx, cy), fill=1)
    elif label == "cross":
        arm = rng.uniform(0.14, 0.2)
        outline = [
            (-arm, -0.5), (arm, -0.5), (arm, -arm), (0.5, -arm), (0.5, arm), (arm, arm),
            (arm, 0.5), (-arm, 0.5), (-arm, arm), (-0.5, arm), (-0.5, -arm), (-arm, -arm),
        ]  # fmt: skip
        draw.polygon(_place(outline, size * 0.92, rng.uniform(-0.35, 0.35), cx, cy), fill=1)
    else:  # pragma: no cover - render_sample validates labels
        raise ValueError(f"unknown label {label!r}")
    return np.asarray(layer, dtype=bool)


def _place(
    points: list[tuple[float, float]], scale: float, angle: float, cx: float, cy: float
) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in points]


def make_view_dataset(out_dir: Path, n_cases: int, seed: int, *, views: int = 2) -> Path:
    """``n_cases`` cases of ``views`` images each: one object class per case, seen in every view.

    Each view is its own image (own background, position and size of the object, own box); the
    manifest gives every view its case as ``group_id`` and its name (``V0``, ``V1``, ...) as
    ``view``, one line per image, a case's views together. Case ``c``'s view ``v`` is drawn from
    a stream seeded by ``(seed, c, v)``.
    """
    if n_cases < 1:
        raise ValueError(f"need at least one case, got {n_cases}")
    if not 2 <= views <= 8:
        raise ValueError(f"views must be within 2..8, got {views}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for case in range(n_cases):
        label = CLASS_NAMES[int(sample_rng(seed, case).integers(len(CLASS_NAMES)))]
        for view in range(views):
            sample = render_sample(np.random.default_rng([seed, case, view]), label=label)
            rel = f"images/{case:06d}_v{view}.png"
            Image.fromarray(sample.image, mode="RGB").save(out_dir / rel, format="PNG", optimize=False)
            row = {"uri": rel, "label": label, "box": list(sample.box), "group_id": f"case{case:06d}"}
            lines.append(json.dumps({**row, "view": f"V{view}"}))
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest
