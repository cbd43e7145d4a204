"""One table of what the GPU path does: parity, mixed precision, speed, pipeline, decoding, memory.

Run on a machine with one GPU (``bash bench/device_check.sh``; under 10 minutes): resnet50 with
random weights (built from torchvision's config, nothing downloaded) at 224 px.

| section | what it measures |
| --- | --- |
| parity | every method on CUDA in float32 (TF32 off) against the CPU in float32, same images and targets |
| bf16 / fp16 | every method under autocast against float32 (TF32 off) on the device (bench/fidelity.py) |
| speed | each method's images/s at batch 64, against the forward alone (same autocast) and pytorch-grad-cam |
| pipeline | end-to-end images/s of plan + shards (bench/pipeline.py) against the engine alone |
| decode | JPEG decoding: batched on the device against every CPU core, and the pixels' agreement |
| host | the shard pipeline with a no-cost stand-in engine: images/s the host feeds, cores per 2,000 img/s |
| processes | 1, 2 and 4 worker processes sharing the device, end to end (bench/gpu_workers.py) |
| memory | peak device memory of each section (``torch.cuda.max_memory_allocated``) |

Each section has a time budget; one that fails or runs out leaves a row saying so and the
others still run. The table is printed as markdown and written to ``--out`` (default
``$OUT/device_check.md`` when ``OUT`` is set). Without CUDA (``--quick`` implied) it runs the
same sections small on the CPU, so the table keeps its shape, and says the GPU figures are
unmeasured: that is what the test suite runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torchvision

from bench.fidelity import pearson, raw_scale, target_score_error, tf32_off, top1_flips, top_cell_agreement
from workers.cam import METHODS, CamEngine

PERTURBATION = ("scorecam", "ablationcam")
GRADIENT = tuple(m for m in METHODS if m not in PERTURBATION)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
COLUMNS = ("section", "what", "value", "against", "ratio", "note")


@dataclass
class Row:
    section: str
    what: str
    value: str
    against: str = ""
    ratio: str = ""
    note: str = ""


@dataclass
class Check:
    args: argparse.Namespace
    device: torch.device
    rows: list[Row] = field(default_factory=list)

    def add(self, *cells: str, **named: str) -> None:
        row = Row(*cells, **named)
        self.rows.append(row)
        print("  " + " | ".join(str(v) for v in row.__dict__.values()), file=sys.stderr, flush=True)


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (between Python operations)."""

    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"over its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


# --------------------------------------------------------------------------- model and inputs


def model_on(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(CheckSizes.model, weights=None).eval().to(device)


def inputs(batch: int, size: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


class CheckSizes:
    """Full sizes for a GPU; ``shrink`` sets the quick ones (CPU fallback, tests)."""

    model = "resnet50"
    size = 224
    batch = 64
    parity_batch = 8
    perturb_images = 2
    perturb_size = 112
    repeats = 5
    pipeline_images = 2048
    pipeline_shard = 1024
    jpegs = 128
    jpeg_side = (500, 375)
    host_images = 2048  # a GPU worker's shard
    processes = (1, 2, 4)
    process_images = 1024
    process_seconds = 30

    reference_perturbation = True  # pytorch-grad-cam's Score-CAM / Ablation-CAM timed too

    @classmethod
    def shrink(cls, tiny: bool = False) -> None:
        cls.model, cls.size, cls.batch, cls.parity_batch = "resnet18", 64, 4, 2
        cls.perturb_images, cls.perturb_size, cls.repeats = 1, 32, 2
        cls.pipeline_images, cls.pipeline_shard, cls.jpegs, cls.jpeg_side = 8, 8, 8, (160, 120)
        cls.host_images = 16
        cls.processes, cls.process_images = (1, 2), 8
        if tiny:
            cls.size, cls.batch, cls.repeats, cls.reference_perturbation = 32, 2, 1, False
            cls.pipeline_images, cls.pipeline_shard, cls.jpegs = 4, 4, 4
            cls.process_images = 4


# --------------------------------------------------------------------------- sections


def section_environment(check: Check) -> None:
    device = check.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
        cudnn = torch.backends.cudnn.version()
    else:
        name, cudnn = "no CUDA device: GPU figures unmeasured; CPU fallback, quick sizes", None
    check.add(
        "environment",
        "device",
        name,
        note=f"torch {torch.__version__}, torchvision {torchvision.__version__}",
    )
    check.add(
        "environment",
        "host",
        f"{os.cpu_count()} CPU cores",
        note=f"python {platform.python_version()}, cuDNN {cudnn}, {load()}",
    )
    check.add(
        "environment",
        "sizes",
        f"{CheckSizes.model} {CheckSizes.size}px batch {CheckSizes.batch}",
        note=f"random weights; perturbation methods on {CheckSizes.perturb_images} image(s)",
    )


def _groups(batch: torch.Tensor) -> list[tuple[list[str], torch.Tensor]]:
    return [(list(GRADIENT), batch), (list(PERTURBATION), batch[: CheckSizes.perturb_images])]


def section_parity(check: Check) -> None:
    """CUDA float32 (TF32 off) against the CPU in float32: the device itself changes nothing."""
    if check.device.type != "cuda":
        for method in METHODS:
            check.add("parity", method, "unmeasured", "cpu float32", note="no CUDA device")
        return
    cpu_model, gpu_model = model_on(torch.device("cpu")), model_on(check.device)
    for methods, size in ((list(GRADIENT), CheckSizes.size), (list(PERTURBATION), CheckSizes.perturb_size)):
        count = CheckSizes.parity_batch if methods[0] not in PERTURBATION else CheckSizes.perturb_images
        x = inputs(count, size, torch.device("cpu"))
        ref = CamEngine(cpu_model, layers=["layer4"], methods=methods, amp=False)(x)
        with tf32_off():
            out = CamEngine(gpu_model, layers=["layer4"], methods=methods, amp=False)(
                x.to(check.device), targets=ref.targets
            )
        for method in methods:
            a, b = ref.maps[method].flatten(0, 1), out.maps[method].cpu().flatten(0, 1)
            diff = (a - b).abs().max().item()
            check.add(
                "parity",
                method,
                f"min r {pearson(a, b).min().item():.5f}",
                "cpu float32",
                f"max abs {diff:.1e}",
                note=f"{count} img @ {size}px, TF32 off",
            )


def section_precision(check: Check) -> None:
    """bf16 and fp16 autocast against float32 on the check's device (the audit-relevant figures)."""
    model = model_on(check.device)
    x = inputs(min(16, CheckSizes.batch), CheckSizes.size, check.device)
    amps = ("bf16", "fp16")
    for methods, images in _groups(x):
        with tf32_off():
            ref = CamEngine(model, layers=["layer4"], methods=methods, amp=False)(images)
        for amp in amps:
            try:
                if amp == "fp16" and check.device.type == "cpu" and methods[0] in PERTURBATION:
                    for method in methods:
                        check.add(amp, method, "unmeasured", "float32", note="fp16 on a CPU is emulated")
                    continue
                engine = CamEngine(model, layers=["layer4"], methods=methods, amp=amp)
                out = engine(images, targets=ref.targets)
            except Exception as exc:  # fp16 autocast on some CPUs
                for method in methods:
                    check.add(amp, method, "failed", "float32", note=f"{type(exc).__name__}: {exc}"[:120])
                continue
            for method in methods:
                a, b = ref.maps[method].flatten(0, 1), out.maps[method].flatten(0, 1)
                ref_raw = ref.raw[method][ref.layers[0]].flatten(0, 1)
                raw = out.raw[method][out.layers[0]].flatten(0, 1)
                low, high = raw_scale(ref_raw, raw)
                check.add(
                    amp,
                    method,
                    f"min r {pearson(a, b).min().item():.4f}",
                    "float32, TF32 off",
                    f"max abs {(a - b).abs().max().item():.3f}",
                    note=(
                        f"flips {top1_flips(ref.logits, out.logits)}/{images.shape[0]}, "
                        f"score err {target_score_error(ref.scores, out.scores):.1e}, "
                        f"raw scale {low:.3f}-{high:.3f}, top5 agr {top_cell_agreement(ref_raw, raw, 5):.2f}"
                    ),
                )


def section_speed(check: Check) -> None:
    """images/s per method: ours, the forward alone and pytorch-grad-cam (bench/engine.py's timing)."""
    from bench import engine as bench_engine

    device = check.device
    model = model_on(device)
    layer = model.get_submodule("layer4")
    amp = None  # the worker's default: bf16 on CUDA, float32 on the CPU
    from workers.cam.precision import resolve_amp

    dtype = resolve_amp(amp, device)
    batch = inputs(CheckSizes.batch, CheckSizes.size, device)
    with torch.inference_mode():
        classes = model(batch).argmax(dim=1)
    reference = bench_engine.REFERENCE_MISSING is None
    if not reference:
        check.add("speed", "pytorch-grad-cam", "unmeasured", note=str(bench_engine.REFERENCE_MISSING))
    precision = str(dtype).removeprefix("torch.") if dtype else "float32"
    forward = bench_engine.measure(
        bench_engine._forward(model, batch, True, dtype), device, CheckSizes.repeats
    )
    forward_rate = CheckSizes.batch / forward.seconds
    check.add(
        "speed",
        "forward (channels-last)",
        f"{fmt(forward_rate)} img/s",
        note=f"{precision}, batch {CheckSizes.batch}, median of {CheckSizes.repeats}, {load()}",
    )
    for method in METHODS:
        perturb = method in PERTURBATION
        images = batch[: CheckSizes.perturb_images] if perturb else batch
        targets = classes[: images.shape[0]]
        engine = CamEngine(model, layers=["layer4"], methods=[method], amp=amp)
        contenders: dict[str, Any] = {"ours": lambda e=engine, i=images, t=targets: e(i, targets=t)}
        timed_reference = reference and (CheckSizes.reference_perturbation or not perturb)
        if timed_reference:
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            ref_targets = [ClassifierOutputTarget(int(c)) for c in targets]
            contenders["reference"] = bench_engine.reference_turns(
                bench_engine.REFERENCE[method], model, layer, images, ref_targets, 64 if perturb else None
            )
        measured = bench_engine.measure_interleaved(contenders, device, 1 if perturb else CheckSizes.repeats)
        ours = images.shape[0] / measured["ours"].seconds
        against, ratio = f"forward {fmt(forward_rate)}", f"{ours / forward_rate:.2f}x fwd"
        if timed_reference:
            theirs = images.shape[0] / measured["reference"].seconds
            against += f", grad-cam {theirs:.2f}"
            ratio += f", {ours / theirs:.2f}x grad-cam"
        note = f"{images.shape[0]} img; peak {measured['ours'].peak / 2**20:.0f} MB" + (
            "; grad-cam float32 TF32 off, batch_size 64" if timed_reference and perturb else ""
        )
        check.add("speed", method, f"{ours:.2f} img/s", against, ratio, note=note)


def section_pipeline(check: Check) -> None:
    """bench/pipeline.py's end to end (plan + every shard, local folder, SQLite) against its engine alone."""
    from bench import null_pipeline, pipeline
    from scheduler.plan import resolve_layers
    from schema.payloads import RunSpec
    from schema.settings import Settings

    model = f"torchvision:{CheckSizes.model}"
    args = argparse.Namespace(
        model=model,
        size=CheckSizes.size,
        methods=["gradcam", "cam"],
        batch=CheckSizes.batch,
        shard_size=CheckSizes.pipeline_shard,
        device=check.device.type,
        s3=False,
        database_url=None,
        rtt_ms=20.0,
        n=CheckSizes.pipeline_images,
        seed=0,
    )
    loaded = pipeline.prepare_model(args)
    layers, _ = resolve_layers(loaded, RunSpec(source="-", model=model, methods=args.methods))
    spec_args = {"model": model, "methods": args.methods, "batch_size": args.batch}
    with (
        tempfile.TemporaryDirectory(prefix="camaudit-device-") as name,
        pipeline.output_target(args, Path(name)) as target,
    ):
        manifest, rows = pipeline.load_data(Path(name) / "data", args.n, args.seed)
        paths = [manifest.parent / row["uri"] for row in rows]
        settings = target.settings
        run_ids: list[str] = []
        warm = pipeline.sub_manifest(manifest, rows[: args.batch], "warmup.jsonl")
        pipeline.pipeline_run(
            RunSpec(source=str(warm), shard_size=args.shard_size, **spec_args), settings, run_ids
        )
        images = pipeline.decode_all(loaded, paths)
        engine = pipeline.engine_only(loaded, args, layers, settings, images)
        spec = RunSpec(source=str(manifest), shard_size=args.shard_size, **spec_args)
        n_maps = args.n * len(args.methods) * len(layers)

        def timed_run(run_settings: Settings) -> tuple[float, float, float]:
            """(seconds, process CPU seconds, planning seconds) of one checked run."""
            start, cpu = time.perf_counter(), time.process_time()
            _, plan_s, _ = pipeline.pipeline_run(spec, run_settings, run_ids)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            pipeline.check_run(settings, run_ids[-1], args.n, n_maps)
            return seconds, cpu, plan_s

        cores = os.cpu_count() or 1
        wide_s, wide_cpu, _ = timed_run(settings.model_copy(update={"torch_threads": cores}))
        clock = null_pipeline.StageClock()
        with null_pipeline.instrumented(clock, (CheckSizes.size,) * 2, stand_in=False):
            seconds, cpu, plan_s = timed_run(settings)
        threads = torch.get_num_threads()  # what the worker set for this device
    end_to_end = args.n / seconds
    data = f"{args.n} PNGs 160-256px, shards of {args.shard_size}, local folder + SQLite"
    check.add(
        "pipeline",
        f"end to end (gradcam,cam), torch on {cores} CPU threads",
        f"{fmt(args.n / wide_s)} img/s",
        f"engine alone {fmt(engine.rate)}",
        f"{args.n / wide_s / engine.rate:.2f}",
        note=f"{data}, {wide_cpu / wide_s:.1f} cores busy, {load()}",
    )
    check.add(
        "pipeline",
        "end to end (gradcam,cam)",
        f"{fmt(end_to_end)} img/s",
        f"engine alone {fmt(engine.rate)}",
        f"{end_to_end / engine.rate:.2f}",
        note=f"{data}, torch on {threads} CPU thread(s), {cpu / seconds:.1f} cores busy, "
        f"plan {plan_s:.2f} s, {load()}",
    )
    stages = null_pipeline.stage_summary(clock.cpu, args.n, clock.wall)
    check.add("pipeline", "host ms/img by stage", "CPU/wall, summed over threads", note=stages)


def section_host(check: Check) -> None:
    """The host pipeline alone (bench/null_pipeline.py): how fast this machine's cores can feed the device."""
    from bench import null_pipeline

    n = CheckSizes.host_images
    args = argparse.Namespace(
        size=CheckSizes.size,
        device=check.device.type,
        s3=False,
        formats=["jpeg"],
        n=n,
        seed=0,
        rounds=2,
        methods=["gradcam", "cam"],
        batch=CheckSizes.batch,
        shard_size=n,
        rtt_ms=20.0,
    )
    np.seterr(all="ignore")
    (row,) = null_pipeline.measure(args)
    host = null_pipeline.host_seconds_per_image(row, n)
    cores = os.cpu_count() or 1
    stages = null_pipeline.stage_summary(row["cpu"], n)
    check.add(
        "host",
        f"null engine, JPEG 375-500px -> {CheckSizes.size}, folder -> folder",
        f"{fmt(row['rate'])} img/s",
        f"1 thread decodes {fmt(row['decode_rate'])}",
        f"{row['rate'] / row['decode_rate']:.1f}x 1-thread decode",
        note=f"{n} images, one shard, batch {CheckSizes.batch}, {cores} cores, {load()}",
    )
    check.add(
        "host",
        "host CPU per image (device-side stages left out)",
        f"{1000 * host:.2f} ms",
        "2,000 img/s",
        f"{2000 * host:.1f} cores",
        note=f"ms/img by stage: {stages}"[:400],
    )


def section_processes(check: Check) -> None:
    """Worker processes sharing the device (bench/gpu_workers.py): images/s of all of them together."""
    from bench import gpu_workers
    from bench.null_pipeline import make_sources

    args = gpu_workers.parse_args(
        [
            "--model",
            f"torchvision:{CheckSizes.model}",
            "--size",
            str(CheckSizes.size),
            "--n",
            str(CheckSizes.process_images),
            "--shard-size",
            str(CheckSizes.process_images),
            "--batch",
            str(CheckSizes.batch),
            "--device",
            check.device.type,
            "--max-seconds",
            str(CheckSizes.process_seconds),
            "--processes",
            ",".join(map(str, CheckSizes.processes)),
        ]
    )
    with tempfile.TemporaryDirectory(prefix="camaudit-processes-") as name:
        sources = Path(name) / "jpeg"
        make_sources(sources, args.n, "jpeg", 0)
        one = None
        for row in gpu_workers.sweep(args, sources, Path(name)):
            what = f"{row.processes} worker process{'es' if row.processes > 1 else ''}, JPEG 375-500px"
            if row.rate is None:
                check.add("processes", what, "stopped", note=str(row.stopped))
                continue
            one = one or row.rate
            check.add(
                "processes",
                what,
                f"{fmt(row.rate)} img/s",
                f"one process {fmt(one)}",
                f"{row.rate / one:.2f}",
                note=f"{args.n} images each, one shard, {row.busy:.1f} cores busy, "
                f"slowest {row.slowest:.1f} s, {load()}",
            )


def _jpegs(count: int, side: tuple[int, int]) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for n in range(count):
        small = (rng.random((side[1] // 16, side[0] // 16, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(small).resize(side, Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 12, (side[1], side[0], 3))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90, progressive=n % 8 == 7)
        files.append(buf.getvalue())
    return files


def _best(fn: Callable[[], object], rounds: int = 3) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def section_decode(check: Check) -> None:
    """Batched JPEG decoding on the device (workers/device_decode.py) against every CPU core."""
    from workers.device_decode import decode_on_device, prepare_jpeg
    from workers.images import decode_pixels
    from workers.preprocess import Preprocess

    device = check.device
    pre = Preprocess(
        size=(CheckSizes.size, CheckSizes.size),
        mean=IMAGENET[0],
        std=IMAGENET[1],
        resize="center-crop",
        resize_to=(round(CheckSizes.size / 0.875),) * 2,  # type: ignore[arg-type]
    )
    files = _jpegs(CheckSizes.jpegs, CheckSizes.jpeg_side)
    cores = os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=cores) as pool:
        cpu_s = _best(lambda: list(pool.map(lambda d: decode_pixels(d, pre), files)))
        headers_s = _best(lambda: list(pool.map(lambda d: prepare_jpeg(d, pre, max_pixels=10**9), files)))
    some = files[:16]
    one_s = _best(lambda: [decode_pixels(d, pre) for d in some], rounds=2) * len(files) / len(some)
    pending = [prepare_jpeg(d, pre, max_pixels=10**9) for d in files]
    usable = [p for p in pending if p is not None]

    def on_device() -> list[Any]:
        out = decode_on_device(usable, pre, device)
        sync(device)
        return out

    device_s = _best(on_device)
    decoded = on_device()
    cpu_pixels = [decode_pixels(p.data, pre).pixels for p in usable]
    refused = sum(d is None for d in decoded)
    diffs = [
        (d.pixels.cpu().int() - c.int()).abs()
        for d, c in zip(decoded, cpu_pixels, strict=True)
        if d is not None
    ]
    stacked = torch.stack(diffs) if diffs else torch.zeros(1)
    n = len(files)
    where = "device (nvJPEG)" if device.type == "cuda" else "torchvision on the CPU (no GPU)"
    check.add(
        "decode",
        f"JPEG {CheckSizes.jpeg_side[0]}x{CheckSizes.jpeg_side[1]} -> {CheckSizes.size}",
        f"{fmt(len(usable) / device_s)} img/s on {where}",
        f"CPU {cores} threads {fmt(n / cpu_s)}, 1 thread {fmt(n / one_s)}",
        f"{(n / cpu_s) and (len(usable) / device_s) / (n / cpu_s):.2f}",
        note=(
            f"headers on {cores} threads {fmt(n / headers_s)} img/s; {len(usable)}/{n} device-decodable, "
            f"{refused} refused; {load()}"
        ),
    )
    check.add(
        "decode",
        "pixels: device path vs CPU path",
        f"max abs {int(stacked.max())} levels",
        "decode_pixels (libjpeg-turbo + Pillow)",
        f"{float((stacked > 0).float().mean()):.4f} differ",
        note=f"mean abs {float(stacked.float().mean()):.3f}",
    )


SECTIONS: list[tuple[str, Callable[[Check], None], float]] = [
    ("environment", section_environment, 20),
    ("parity", section_parity, 70),
    ("precision", section_precision, 60),
    ("speed", section_speed, 150),
    ("pipeline", section_pipeline, 120),
    ("decode", section_decode, 40),
    ("host", section_host, 60),
    ("processes", section_processes, 150),
]


def run_sections(
    check: Check, only: list[str] | None = None, after: Callable[[], None] = lambda: None
) -> None:
    """Each section in its time box; ``after`` runs after each (the partial table is written)."""
    for name, fn, budget in SECTIONS:
        if only and name not in only:
            continue
        started = time.perf_counter()
        if check.device.type == "cuda":
            sync(check.device)
            torch.cuda.reset_peak_memory_stats(check.device)
        try:
            with time_box(budget * check.args.budget_scale):
                fn(check)
        except ModuleNotFoundError as exc:  # a package this machine lacks: carry its wheel in ./.whl
            check.add(
                name, "section", "unmeasured", note=f"needs the package of module {exc.name!r} (./.whl)"
            )
        except Exception as exc:
            check.add(name, "section", "failed", note=f"{type(exc).__name__}: {exc}"[:200])
            traceback.print_exc(file=sys.stderr)
        if check.device.type == "cuda":
            peak = f"{torch.cuda.max_memory_allocated(check.device) / 2**30:.2f} GiB"
        else:
            peak = "unmeasured (CPU)"
        check.add(
            "memory", f"peak device memory: {name}", peak, note=f"{time.perf_counter() - started:.0f} s"
        )
        after()


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [str(v).replace("|", "/") for v in row.__dict__.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")
    parser.add_argument("--quick", action="store_true", help="small sizes (implied without CUDA)")
    parser.add_argument("--tiny", action="store_true", help="the smallest sizes: the test suite's run")
    parser.add_argument(
        "--out", default=None, help="markdown file (default: $OUT/device_check.md when OUT is set)"
    )
    parser.add_argument(
        "--sections", default=None, help=f"comma-separated subset of {[s[0] for s in SECTIONS]}"
    )
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every section's time budget"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available here")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick or args.tiny or device.type != "cuda":
        CheckSizes.shrink(tiny=args.tiny)
    check = Check(args, device)
    started = time.perf_counter()
    out = args.out or (str(Path(os.environ["OUT"]) / "device_check.md") if os.environ.get("OUT") else None)
    command = " ".join(["bash bench/device_check.sh", *(sys.argv[1:] if argv is None else argv)])

    def table(final: bool) -> str:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        state = "" if final else " (partial: stopped before the end)"
        title = f"device check {date}, {time.perf_counter() - started:.0f} s{state}: `{command}`"
        return f"{title}\n\n{markdown(check.rows)}"

    def write(final: bool = False) -> None:
        if out:
            Path(out).write_text(table(final))

    def stopped(signum: int, frame: Any) -> None:  # the shell's backstop timeout
        print(table(False))
        write()
        raise SystemExit(124)

    signal.signal(signal.SIGTERM, stopped)
    only = [s.strip() for s in args.sections.split(",")] if args.sections else None
    run_sections(check, only, after=write)
    print(table(True))
    write(final=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
