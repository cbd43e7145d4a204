"""Benchmark the CAM engine against the model's forward alone and against pytorch-grad-cam.

Prints, per model and method: images/s of ours and of the reference on the same batch and
targets, ours/forward and ours/reference ratios, peak memory of each, and how closely the maps
agree (minimum per-image Pearson r). Score-CAM and Ablation-CAM are compared on a few images
against the reference at its best batch size.

On CPU, glibc malloc's defaults return large buffers to the kernel after every use, so each
forward pays page faults again; that moves CPU figures a lot. The benchmark therefore runs in
a child process with the allocator setting made explicit (``--malloc``) and, unless
``--no-alloc-compare``, ends with a forward / Grad-CAM comparison under both settings.

    python bench/engine.py                   # full CPU run (~10 minutes on 2 cores)
    python bench/engine.py --quick           # a smoke-sized run
    python bench/engine.py --device cuda     # GPU: bf16 autocast for ours, fp32 reference

The reference is created before and released after each of its turns, so its hooks (which
copy the layer's output on every forward) never run while ours or the forward baseline is
timed; it runs with TF32 off, as true float32. The forward baseline runs under the same
autocast as ours.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torchvision

from bench.fidelity import tf32_off
from workers.cam import METHODS, CamEngine
from workers.cam.memory_format import ChannelsLast
from workers.cam.precision import autocast, resolve_amp
from workers.libc import libc_function

# pytorch-grad-cam is the reference, optional: without it (a GPU machine with torch alone) the
# engine's own figures still run (bench/device_check.py), and this script says what is missing.
try:
    from pytorch_grad_cam import (
        AblationCAM,
        EigenCAM,
        EigenGradCAM,
        GradCAM,
        GradCAMElementWise,
        GradCAMPlusPlus,
        HiResCAM,
        LayerCAM,
        ScoreCAM,
        XGradCAM,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # "cam" has no counterpart in the reference; on a GAP + linear head Grad-CAM gives the same map.
    REFERENCE = {
        "cam": GradCAM,
        "gradcam": GradCAM,
        "gradcam++": GradCAMPlusPlus,
        "xgradcam": XGradCAM,
        "hirescam": HiResCAM,
        "gradcam-elementwise": GradCAMElementWise,
        "layercam": LayerCAM,
        "eigencam": EigenCAM,
        "eigengradcam": EigenGradCAM,
        "scorecam": ScoreCAM,
        "ablationcam": AblationCAM,
    }
    REFERENCE_MISSING: str | None = None
except ImportError as _missing:
    REFERENCE = dict.fromkeys(METHODS)  # type: ignore[arg-type]
    REFERENCE_MISSING = f"pytorch-grad-cam is not installed ({_missing})"
PERTURBATION = ("scorecam", "ablationcam")
ALLOCATORS = {
    "default": {},
    "tuned": {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"},
}
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="resnet18,resnet50", help="torchvision model names, comma-separated"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"], help="ours only")
    parser.add_argument("--layer", default="layer4", help="target layer (dotted name)")
    parser.add_argument(
        "--contiguous",
        action="store_true",
        help="ours without channels-last (CamEngine(channels_last=False))",
    )
    parser.add_argument("--perturb-models", default="resnet18", help="models for scorecam/ablationcam")
    parser.add_argument("--perturb-batch", type=int, default=None, help="images for scorecam/ablationcam")
    parser.add_argument("--perturb-size", type=int, default=None, help="input size for scorecam/ablationcam")
    parser.add_argument("--ref-batch-sizes", default="16,32,64", help="reference batch sizes to try")
    parser.add_argument("--perturb-repeats", type=int, default=2, help="turns of ours vs the best reference")
    parser.add_argument("--malloc", default="tuned", choices=["tuned", "default", "both", "inherit"])
    parser.add_argument("--no-alloc-compare", action="store_true", help="skip the allocator comparison")
    parser.add_argument("--quick", action="store_true", help="small sizes: resnet18, 112 px, batch 8")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "process"],
        help="process = CPU seconds of this process (CPU only): steadier on a shared, busy machine",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--alloc-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.size, args.batch, args.repeats = "resnet18", 112, 8, 3
    args.perturb_batch = args.perturb_batch or (2 if args.device == "cuda" else 1)
    args.perturb_size = args.perturb_size or args.size
    return args


# --- measurement ----------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use() -> Callable[[], int] | None:
    """Bytes malloc has handed out and not got back (glibc), independent of what it retains."""
    mallinfo2 = libc_function("mallinfo2", restype=_MallInfo2)
    if mallinfo2 is None:
        return None

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


_IN_USE = _heap_in_use()


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator peak, or sampled malloc in-use on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._read = _IN_USE or _rss
        self._base = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read() - self._base)
            self._stop.wait(0.0005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read() - self._base)


CLOCK: list[Callable[[], float]] = [time.perf_counter]


@dataclass
class Measured:
    seconds: float
    peak: int
    output: Any


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Scoped:
    """A contender that exists only during its own turns: ``open()`` sets it up (untimed) and
    yields the call to time; leaving the context tears it down before the next contender runs."""

    open: Callable[[], contextlib.AbstractContextManager[Callable[[], Any]]]


Contender = Callable[[], Any] | Scoped


def _turn(contender: Contender) -> contextlib.AbstractContextManager[Callable[[], Any]]:
    return contender.open() if isinstance(contender, Scoped) else contextlib.nullcontext(contender)


def measure(fn: Contender, device: torch.device, repeats: int, warmup: int = 1) -> Measured:
    """Median wall time of ``repeats`` calls after ``warmup`` calls, and the peak memory."""
    return measure_interleaved({"only": fn}, device, repeats, warmup)["only"]


def measure_interleaved(
    fns: dict[str, Contender], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, Measured]:
    """Time several callables in turns (A, B, C, A, B, C, ...): median time and peak memory each.

    Taking turns exposes every contender to the same background load, so the ratios stay
    meaningful on a shared machine even when absolute figures drift.
    """
    for contender in fns.values():
        for _ in range(warmup):
            with _turn(contender) as fn:
                fn()
    times: dict[str, list[float]] = {key: [] for key in fns}
    peaks = dict.fromkeys(fns, 0)
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for key, contender in fns.items():
            with _turn(contender) as fn, PeakMemory(device) as peak:
                _sync(device)
                start = CLOCK[0]()
                outputs[key] = fn()
                _sync(device)
                times[key].append(CLOCK[0]() - start)
            peaks[key] = max(peaks[key], peak.peak)
    return {key: Measured(statistics.median(times[key]), peaks[key], outputs.get(key)) for key in fns}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The reference prints tqdm progress bars to stderr for every image."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


# --- comparisons ----------------------------------------------------------------------------------


def _agreement(ours: torch.Tensor, reference: np.ndarray) -> float:
    """Minimum per-image Pearson r of two map batches (1.0 for a pair of constant maps)."""
    values = []
    for a, b in zip(ours.float().cpu().numpy(), reference, strict=True):
        if a.std() < 1e-6 and b.std() < 1e-6:
            values.append(1.0)
        else:
            values.append(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
    return min(values)


def _reference_call(cls: type, model: torch.nn.Module, layer: torch.nn.Module, batch_size: int | None = None):
    if cls is AblationCAM:
        cam = cls(model, [layer], batch_size=batch_size or 32)
    else:
        cam = cls(model, [layer])
        if batch_size is not None:
            cam.batch_size = batch_size
    return cam


def reference_turns(
    cls: type,
    model: torch.nn.Module,
    layer: torch.nn.Module,
    images: torch.Tensor,
    targets: list[Any],
    batch_size: int | None = None,
) -> Scoped:
    """The reference on ``images``, hooked to ``layer`` only during its turn, in true float32."""

    @contextlib.contextmanager
    def turn() -> Iterator[Callable[[], Any]]:
        cam = _reference_call(cls, model, layer, batch_size)
        try:
            with tf32_off(), _quiet():
                yield lambda: cam(images, targets=targets)
        finally:
            cam.activations_and_grads.release()

    return Scoped(turn)


def _amp(args: argparse.Namespace) -> str | bool | None:
    return {"auto": None, "off": False}.get(args.amp, args.amp)


def _engine(model: torch.nn.Module, method: str, args: argparse.Namespace) -> CamEngine:
    return CamEngine(
        model, layers=[args.layer], methods=[method], amp=_amp(args), channels_last=not args.contiguous
    )


@dataclass
class Row:
    model: str
    method: str
    ours: float  # images/s
    reference: float | None
    forward: float
    ours_peak: int
    reference_peak: int | None
    agreement: float | None
    note: str = ""


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:8.1f}"


def print_rows(rows: list[Row]) -> None:
    header = (
        f"{'model':<10} {'method':<20} {'ours img/s':>10} {'ref img/s':>10} {'ours/fwd':>8} {'ours/ref':>8} "
        f"{'ours MB':>8} {'ref MB':>8} {'min r':>7}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        reference = f"{row.reference:10.2f}" if row.reference else f"{'-':>10}"
        ratio = f"{row.ours / row.reference:8.2f}" if row.reference else f"{'-':>8}"
        agreement = f"{row.agreement:7.4f}" if row.agreement is not None else f"{'-':>7}"
        print(
            f"{row.model:<10} {row.method:<20} {row.ours:10.2f} {reference} {row.ours / row.forward:8.2f} "
            f"{ratio} {_mb(row.ours_peak)} {_mb(row.reference_peak)} {agreement}  {row.note}"
        )


def _build(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval().to(device)


def _inputs(batch: int, size: int, device: torch.device) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size, device=device)


def _forward(
    model: torch.nn.Module,
    images: torch.Tensor,
    channels_last: bool = False,
    dtype: torch.dtype | None = None,
) -> Callable[[], Any]:
    """The model's inference forward, under ``dtype`` autocast (ours' precision) when given."""

    def forward() -> Any:
        with torch.inference_mode(), autocast(images.device, dtype):
            return model(ChannelsLast(channels_last).input(images))

    return forward


def bench_gradient_methods(name: str, args: argparse.Namespace, methods: list[str]) -> list[Row]:
    """Forward alone, ours and the reference, taking turns, for each single-pass method."""
    device = torch.device(args.device)
    model = _build(name, device)
    images = _inputs(args.batch, args.size, device)
    layer = model.get_submodule(args.layer)
    with torch.inference_mode():
        classes = model(images).argmax(dim=1)
    reference_targets = [ClassifierOutputTarget(int(c)) for c in classes]
    dtype = resolve_amp(_amp(args), device)
    forward_times: list[float] = []
    forward_peak = 0
    rows = []
    for method in methods:
        engine = _engine(model, method, args)
        measured = measure_interleaved(
            {
                "forward": _forward(model, images, dtype=dtype),
                "ours": lambda engine=engine: engine(images, targets=classes),
                "reference": reference_turns(REFERENCE[method], model, layer, images, reference_targets),
            },
            device,
            args.repeats,
        )
        forward_times.append(measured["forward"].seconds)
        forward_peak = max(forward_peak, measured["forward"].peak)
        ours, reference = measured["ours"], measured["reference"]
        note = (
            "ref: GradCAM" if method == "cam" else ("r up to PC sign" if method.startswith("eigen") else "")
        )
        rows.append(
            Row(
                name,
                method,
                args.batch / ours.seconds,
                args.batch / reference.seconds,
                args.batch / measured["forward"].seconds,
                ours.peak,
                reference.peak,
                _agreement(ours.output.maps[method][:, 0], reference.output),
                note,
            )
        )
        print(f"  measured {name} {method}", file=sys.stderr, flush=True)
    forward_rate = args.batch / statistics.median(forward_times)
    formats = measure_interleaved(
        {
            "forward": _forward(model, images, dtype=dtype),
            "channels_last": _forward(model, images, channels_last=True, dtype=dtype),
        },
        device,
        args.repeats,
    )
    ratio = formats["forward"].seconds / formats["channels_last"].seconds
    return [
        Row(name, "forward (inference)", forward_rate, None, forward_rate, forward_peak, None, None),
        Row(
            name,
            "forward (channels-last)",
            forward_rate * ratio,
            None,
            forward_rate,
            formats["channels_last"].peak,
            None,
            None,
            "NHWC input, as ours runs",
        ),
        *rows,
    ]


def bench_perturbation_methods(name: str, args: argparse.Namespace, methods: list[str]) -> list[Row]:
    device = torch.device(args.device)
    model = _build(name, device)
    count = args.perturb_batch
    images = _inputs(count, args.perturb_size, device)
    layer = model.get_submodule(args.layer)
    dtype = resolve_amp(_amp(args), device)
    forward = measure(
        _forward(model, _inputs(args.batch, args.perturb_size, device), dtype=dtype), device, args.repeats
    )
    forward_rate = args.batch / forward.seconds
    with torch.inference_mode():
        classes = model(images).argmax(dim=1)
    reference_targets = [ClassifierOutputTarget(int(c)) for c in classes]
    rows = []
    for method in methods:
        engine = _engine(model, method, args)
        engine(images, targets=classes)  # warm-up: the same forward shapes as the timed call
        best: tuple[float, int] | None = None  # (seconds, batch_size)
        for batch_size in (int(b) for b in args.ref_batch_sizes.split(",")):
            with torch.inference_mode():  # the reference's forward shapes, warmed up like ours
                model(_inputs(batch_size, args.perturb_size, device))
            trial = measure(
                reference_turns(REFERENCE[method], model, layer, images, reference_targets, batch_size),
                device,
                1,
                warmup=0,
            )
            if best is None or trial.seconds < best[0]:
                best = (trial.seconds, batch_size)
            print(f"  measured {name} {method} ref batch_size={batch_size}", file=sys.stderr, flush=True)
        assert best is not None
        # The winner and ours then take turns, so both see the same background load.
        measured = measure_interleaved(
            {
                "ours": lambda engine=engine: engine(images, targets=classes),
                "reference": reference_turns(
                    REFERENCE[method], model, layer, images, reference_targets, best[1]
                ),
            },
            device,
            args.perturb_repeats,
            warmup=0,
        )
        ours, reference = measured["ours"], measured["reference"]
        rows.append(
            Row(
                name,
                method,
                count / ours.seconds,
                count / reference.seconds,
                forward_rate,
                ours.peak,
                reference.peak,
                _agreement(ours.output.maps[method][:, 0], reference.output),
                f"{count} img @ {args.perturb_size}px; ref best batch_size={best[1]}",
            )
        )
    return rows


def _header(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    malloc = {k: os.environ[k] for k in MALLOC_VARS if k in os.environ} or "glibc defaults"
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__} | {name} | batch {args.batch} @ {args.size}px | layer {args.layer}")
    layout = "contiguous" if args.contiguous else "channels-last"
    print(
        f"ours and forward: amp={args.amp}, {layout} | reference: pytorch-grad-cam, float32, TF32 off, "
        f"hooked only during its turns | malloc: {malloc}"
    )
    clock = "CPU seconds of the process" if CLOCK[0] is time.process_time else "wall clock"
    print(f"timing: median of {args.repeats} turns, {clock}")
    memory = "CUDA max_memory_allocated" if device.type == "cuda" else "sampled malloc in-use bytes"
    print(f"peak memory: {memory} above the level before the timed calls")


def _configure(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process" and args.device == "cpu":
        CLOCK[0] = time.process_time


def run(args: argparse.Namespace) -> None:
    if REFERENCE_MISSING:
        raise SystemExit(f"{REFERENCE_MISSING}: pip install grad-cam")
    _configure(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REFERENCE]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    _header(args)
    rows: list[Row] = []
    gradient_like = [m for m in methods if m not in PERTURBATION]
    if gradient_like:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows += bench_gradient_methods(name, args, gradient_like)
    perturbation = [m for m in methods if m in PERTURBATION]
    if perturbation:
        for name in [m.strip() for m in args.perturb_models.split(",") if m.strip()]:
            rows += bench_perturbation_methods(name, args, perturbation)
    print_rows(rows)


def run_allocator_rows(args: argparse.Namespace) -> None:
    """Forward and Grad-CAM (ours, reference) only: the rows that show the allocator's effect."""
    _configure(args)
    methods = [m for m in ("gradcam",) if m in REFERENCE]
    rows: list[Row] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += bench_gradient_methods(name, args, methods)
    print_rows(rows)


# --- process orchestration --------------------------------------------------------------------------


def _child(argv: list[str], setting: str, extra: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARS}
    env.update(ALLOCATORS[setting])
    print(f"\n=== malloc: {setting} {ALLOCATORS[setting] or '(glibc defaults)'} ===", flush=True)
    subprocess.run([sys.executable, __file__, *argv, "--child", *extra], env=env, check=True)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.child or args.device == "cuda" or args.malloc == "inherit":
        if args.alloc_only:
            run_allocator_rows(args)
        else:
            run(args)
        return
    settings = ["tuned", "default"] if args.malloc == "both" else [args.malloc]
    for setting in settings:
        _child(argv, setting, [])
    if not args.no_alloc_compare and args.malloc != "both":
        print("\n### allocator comparison: forward and gradcam under both settings")
        for setting in ("default", "tuned"):
            _child(argv, setting, ["--alloc-only"])


if __name__ == "__main__":
    main(sys.argv[1:])
