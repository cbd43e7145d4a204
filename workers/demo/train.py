"""Train the demo CNN on synthetic shapes and write the checkpoint shipped in ``workers/assets``.

Usage::

    python -m workers.demo.train --out workers/assets/demo_cnn.pt --seed 0

The model must train in under a minute on two CPU cores, which plain classification on a few
thousand images cannot do: the net memorises the backgrounds before it learns shapes. Three
choices make it fit:

* Backgrounds and objects are drawn once with ``workers.synth`` (in memory, never written) and
  re-paired at every step: each object is moved, flipped and turned onto another background
  with a fresh contrasting colour, so no two batches repeat and clutter cannot be memorised.
* The first 65% of the steps run at 96x96 input, about half the cost of 128x128; the rest
  adapt to the real input size.
* Besides the image-level loss, the class scores of feature-map cells that lie inside the
  object are trained to name the object's class. This dense signal shortens the slow start of
  training and keeps the class evidence on the object, so CAM peaks land inside object boxes.
  The demo model is therefore a fixture whose attention is known to be right: good for checking
  that a CAM pipeline (layers, weights, upsampling, box mapping) is correct, not evidence that a
  CAM method is faithful on models trained without such a signal.

At the end the model is scored on a fresh set rendered with another seed, through the same
path the workers use: source-size image, stretched to 128x128, normalised.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from workers.demo.net import DemoNet
from workers.synth import CLASS_NAMES, MIN_CONTRAST, Sample, render_parts, render_sample, sample_rng

INPUT_SIZE = (128, 128)
CHECKPOINT_VERSION = 1
# Evaluation images come from another seed, so they never coincide with training draws.
EVAL_SEED_OFFSET = 1_000_003
# Backgrounds are resized with a mix of filters, so the model does not lean on the exact
# resampling of the decoder (workers.images stretches with PIL's bilinear filter).
_TRAIN_FILTERS = (
    Image.Resampling.BILINEAR,
    Image.Resampling.BILINEAR,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    n_parts: int = 1200
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    dense_weight: float = 1.0
    low_res: int = 96
    low_res_fraction: float = 0.65
    threads: int = 2
    n_eval: int = 200
    device: str = "cpu"


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    pointing: float  # fraction of correctly classified images whose CAM peak lies in the box
    n: int


@dataclass(frozen=True)
class PartBank:
    """Backgrounds and object masks at model input size, ready to be re-paired."""

    backgrounds: torch.Tensor  # (N, 3, H, W) uint8
    alphas: torch.Tensor  # (N, 1, H, W) uint8, the object's coverage of each input pixel
    labels: torch.Tensor  # (N,) int64
    extents: torch.Tensor  # (N, 4) int64: top, bottom, left, right of each alpha (exclusive ends)

    @classmethod
    def of(cls, backgrounds: torch.Tensor, alphas: torch.Tensor, labels: torch.Tensor) -> PartBank:
        rows = alphas[:, 0].amax(dim=2) > 0
        cols = alphas[:, 0].amax(dim=1) > 0
        extents = torch.stack([_first(rows), _last(rows) + 1, _first(cols), _last(cols) + 1], dim=1)
        return cls(backgrounds, alphas, labels, extents)


def _first(present: torch.Tensor) -> torch.Tensor:
    return present.byte().argmax(1)


def _last(present: torch.Tensor) -> torch.Tensor:
    return present.shape[1] - 1 - present.flip(1).byte().argmax(1)


def resize_to_input(
    image: np.ndarray, size: tuple[int, int], resample: Image.Resampling = Image.Resampling.BILINEAR
) -> np.ndarray:
    """Stretch an (H, W, C) or (H, W) uint8 array to ``size`` = (H, W): no crop, as the model expects."""
    height, width = size
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def build_part_bank(seed: int, n: int, rng: np.random.Generator) -> PartBank:
    backgrounds, alphas, labels = [], [], []
    for index in range(n):
        parts = render_parts(sample_rng(seed, index))
        background = np.clip(np.rint(parts.background), 0, 255).astype(np.uint8)
        resample = _TRAIN_FILTERS[int(rng.integers(len(_TRAIN_FILTERS)))]
        backgrounds.append(resize_to_input(background, INPUT_SIZE, resample))
        alphas.append(resize_to_input(parts.mask.astype(np.uint8) * 255, INPUT_SIZE))
        labels.append(CLASS_NAMES.index(parts.label))
    return PartBank.of(
        backgrounds=torch.from_numpy(np.stack(backgrounds)).permute(0, 3, 1, 2).contiguous(),
        alphas=torch.from_numpy(np.stack(alphas))[:, None].contiguous(),
        labels=torch.tensor(labels, dtype=torch.int64),
    )


def shrink_bank(bank: PartBank, size: tuple[int, int], chunk: int = 256) -> PartBank:
    """The same parts at a smaller input size, resized once rather than at every step."""
    backgrounds, alphas = [], []
    for start in range(0, len(bank.labels), chunk):
        both = torch.cat([bank.backgrounds[start : start + chunk], bank.alphas[start : start + chunk]], 1)
        small = F.interpolate(both.float(), size=size, mode="bilinear", antialias=True)
        small = small.round_().clamp_(0, 255).to(torch.uint8)
        backgrounds.append(small[:, :3])
        alphas.append(small[:, 3:])
    return PartBank.of(torch.cat(backgrounds).contiguous(), torch.cat(alphas).contiguous(), bank.labels)


def _random_turn(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip and quarter-turn: every class keeps its identity under these."""
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(3)
    turns = int(torch.randint(0, 4, (), generator=generator))
    return torch.rot90(x, turns, dims=(2, 3)).contiguous() if turns else x


def _random_shift(alpha: torch.Tensor, extents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move each object to a random position where it still lies wholly inside the image."""
    _, _, height, width = alpha.shape
    top, bottom, left, right = extents.unbind(1)
    dy = (torch.rand(len(alpha), generator=generator) * (height - bottom + top + 1)).long() - top
    dx = (torch.rand(len(alpha), generator=generator) * (width - right + left + 1)).long() - left
    shifted = torch.zeros_like(alpha)
    columns = (v.tolist() for v in (top, bottom, left, right, dy, dx))
    for k, (y0, y1, x0, x1, sy, sx) in enumerate(zip(*columns, strict=True)):
        shifted[k, :, y0 + sy : y1 + sy, x0 + sx : x1 + sx] = alpha[k, :, y0:y1, x0:x1]
    return shifted


def _contrasting_colours(under: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random object colours, redrawn where too close to the background below the object."""
    colours = torch.rand(under.shape, generator=generator) * 255
    for _ in range(8):
        close = (colours - under).norm(dim=1) < MIN_CONTRAST
        if not bool(close.any()):
            break
        fresh = torch.rand(under.shape, generator=generator) * 255
        colours = torch.where(close[:, None], fresh, colours)
    return colours


def composite_batch(
    bank: PartBank, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fresh batch at the bank's size: (images float 0..255, labels, object coverage in 0..1)."""
    n = len(bank.labels)
    bg_index = torch.randint(0, n, (batch_size,), generator=generator)
    obj_index = torch.randint(0, n, (batch_size,), generator=generator)
    # Turns and shifts move uint8 data: four times less memory traffic than float.
    background = _random_turn(bank.backgrounds[bg_index], generator).float()
    alpha = _random_shift(bank.alphas[obj_index], bank.extents[obj_index], generator)
    alpha = _random_turn(alpha, generator).float().div_(255.0)
    under = (background * alpha).sum((2, 3)) / alpha.sum((2, 3)).clamp(min=1e-6)
    colours = _contrasting_colours(under, generator)
    images = torch.lerp(background, colours[:, :, None, None].expand_as(background), alpha)
    sigma = torch.rand(batch_size, 1, 1, 1, generator=generator) * 5 + 2.5
    images.add_(torch.randn(images.shape, generator=generator).mul_(sigma))
    return images.clamp_(0, 255), bank.labels[obj_index], alpha


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _loss(
    model: DemoNet, x: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor, dense_weight: float
) -> torch.Tensor:
    features = model.features(x)
    loss = F.cross_entropy(model.fc(torch.flatten(model.pool(features), 1)), labels)
    if dense_weight <= 0:
        return loss
    # Class scores per feature cell: the head applied at every position (the CAM plus bias).
    cell_logits = torch.einsum("bchw,kc->bhwk", features, model.fc.weight) + model.fc.bias
    inside = F.adaptive_avg_pool2d(alpha, features.shape[-2:])[:, 0] > 0.5
    if not bool(inside.any()):
        return loss
    cell_labels = labels.view(-1, 1, 1).expand_as(inside)
    return loss + dense_weight * F.cross_entropy(cell_logits[inside], cell_labels[inside])


def cam_peaks(model: DemoNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and (row, col) of each image's CAM maximum at input resolution."""
    features = model.features(x)
    logits = model.fc(torch.flatten(model.pool(features), 1))
    pred = logits.argmax(1)
    cams = F.relu(torch.einsum("bchw,bc->bhw", features, model.fc.weight[pred]))
    cams = F.interpolate(cams[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat = cams.flatten(1).argmax(1)
    width = x.shape[-1]
    return pred, torch.stack([flat // width, flat % width], dim=1)


def peak_in_box(
    peak: tuple[int, int], box: Sequence[int], source_size: tuple[int, int], input_size: tuple[int, int]
) -> bool:
    """Whether an input pixel's centre, mapped to source pixels, falls inside a source-pixel box."""
    row, col = peak
    src_h, src_w = source_size
    in_h, in_w = input_size
    x0, y0, x1, y1 = box
    cx, cy = (col + 0.5) * src_w / in_w, (row + 0.5) * src_h / in_h
    return x0 <= cx <= x1 and y0 <= cy <= y1


@torch.no_grad()
def evaluate(model: DemoNet, samples: Sequence[Sample], mean: torch.Tensor, std: torch.Tensor) -> EvalResult:
    model.eval()
    device = next(model.parameters()).device
    images = np.stack([resize_to_input(s.image, INPUT_SIZE) for s in samples])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    labels = torch.tensor([CLASS_NAMES.index(s.label) for s in samples], device=device)
    pred, peaks = cam_peaks(model, _normalise(x, mean, std))
    correct = (pred == labels).tolist()
    hits = sum(
        peak_in_box(tuple(peaks[i].tolist()), s.box, s.image.shape[:2], INPUT_SIZE)
        for i, s in enumerate(samples)
        if correct[i]
    )
    n_correct = sum(correct)
    return EvalResult(accuracy=n_correct / len(samples), pointing=hits / max(n_correct, 1), n=len(samples))


def train(config: TrainConfig) -> tuple[dict, EvalResult]:
    """Train from scratch; return the checkpoint dict and its score on a fresh evaluation set."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    bank = build_part_bank(config.seed, config.n_parts, np.random.default_rng([config.seed, 1]))
    pixels = bank.backgrounds.float().div_(255.0)
    mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
    del pixels

    model = DemoNet(len(CLASS_NAMES)).to(device, memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.steps, pct_start=0.2
    )
    generator = torch.Generator().manual_seed(config.seed)
    mean_d, std_d = mean.to(device), std.to(device)
    low_res_steps = int(config.low_res_fraction * config.steps)
    small_bank = shrink_bank(bank, (config.low_res, config.low_res))
    model.train()
    for step in range(config.steps):
        images, labels, alpha = composite_batch(
            small_bank if step < low_res_steps else bank, config.batch_size, generator
        )
        x = _normalise(images.to(device), mean_d, std_d).contiguous(memory_format=torch.channels_last)
        loss = _loss(model, x, labels.to(device), alpha.to(device), config.dense_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{config.steps}  loss {loss.item():.4f}", flush=True)

    model = model.to(memory_format=torch.contiguous_format)
    eval_set = [render_sample(sample_rng(config.seed + EVAL_SEED_OFFSET, i)) for i in range(config.n_eval)]
    result = evaluate(model, eval_set, mean_d, std_d)
    checkpoint = {
        "arch": "demo",
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "class_names": list(CLASS_NAMES),
        "input_size": list(INPUT_SIZE),
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "version": CHECKPOINT_VERSION,
    }
    return checkpoint, result


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description="Train the demo CNN on synthetic shapes.")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint path to write")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--n-parts", type=int, default=defaults.n_parts, help="backgrounds/objects drawn")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--low-res-fraction", type=float, default=defaults.low_res_fraction)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--n-eval", type=int, default=defaults.n_eval)
    parser.add_argument("--device", default=defaults.device)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    config = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        n_parts=args.n_parts,
        batch_size=args.batch_size,
        lr=args.lr,
        low_res_fraction=args.low_res_fraction,
        threads=args.threads,
        n_eval=args.n_eval,
        device=args.device,
    )
    started = time.perf_counter()
    checkpoint, result = train(config)
    elapsed = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out)
    size_kib = args.out.stat().st_size / 1024
    print(
        f"wrote {args.out} ({size_kib:.0f} KiB) after {elapsed:.1f}s: accuracy {result.accuracy:.3f}, "
        f"CAM pointing game {result.pointing:.3f} on {result.n} fresh images"
    )


if __name__ == "__main__":
    main()
