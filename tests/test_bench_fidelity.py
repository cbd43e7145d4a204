"""The benchmarks' own correctness: what they time is only what they claim to time, and the
fidelity figures they print are right on inputs whose answer is known."""

from __future__ import annotations

import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from bench.engine import _forward, measure_interleaved, reference_turns
from bench.fidelity import pearson, raw_scale, target_score_error, tf32_off, top1_flips, top_cell_agreement
from workers.cam import CamEngine


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_reference_hooks_live_only_during_its_own_turns() -> None:
    model = _small_model()
    images = torch.randn(2, 3, 16, 16)
    targets = [ClassifierOutputTarget(1), ClassifierOutputTarget(3)]
    engine = CamEngine(model, layers=["2"], methods=["gradcam"], amp=False)
    seen: dict[str, list[int]] = {"ours": [], "reference": []}
    flags: list[tuple[bool, bool]] = []

    def ours() -> object:
        seen["ours"].append(_hooks(model))
        return engine(images, targets=torch.tensor([1, 3]))

    turn = reference_turns(GradCAM, model, model[2], images, targets)

    measured = measure_interleaved({"ours": ours, "reference": turn}, torch.device("cpu"), repeats=2)
    assert seen["ours"] == [0, 0, 0]  # one warm-up and two timed turns, never with a reference hook
    assert _hooks(model) == 0
    assert measured["reference"].output.shape == (2, 16, 16)

    with turn.open() as call:
        seen["reference"].append(_hooks(model))
        flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        call()
    assert seen["reference"][-1] > 0 and flags[-1] == (False, False)
    assert _hooks(model) == 0
    assert torch.backends.cudnn.allow_tf32  # restored to torch's default


def test_forward_baseline_runs_in_the_engines_precision() -> None:
    model = _small_model()
    images = torch.randn(2, 3, 16, 16)
    assert _forward(model, images, dtype=torch.bfloat16)().dtype == torch.bfloat16
    assert _forward(model, images)().dtype == torch.float32


def test_tf32_off_restores_the_previous_flags() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_off():
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_fidelity_figures_on_known_inputs() -> None:
    reference_logits = torch.tensor([[1.0, 2.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    logits = torch.tensor([[1.0, 2.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    assert top1_flips(reference_logits, logits) == 1

    error = target_score_error(torch.tensor([[2.0], [4.0]]), torch.tensor([[2.2], [4.0]]))
    assert abs(error - 0.1) < 1e-6

    ref_raw = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    low, high = raw_scale(ref_raw, torch.stack([ref_raw[0] * 0.5, ref_raw[1]]))
    assert (low, high) == (0.5, 1.0)

    ranked = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    assert top_cell_agreement(ranked, ranked, 2) == 1.0
    assert top_cell_agreement(ranked, torch.tensor([[[4.0, 1.0], [2.0, 3.0]]]), 2) == 0.5
    assert top_cell_agreement(ranked, -ranked, 2) == 0.0

    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    r = pearson(a, torch.tensor([[2.0, 4.0, 6.0], [5.0, 5.0, 5.0]]))
    assert torch.allclose(r, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert pearson(a[:1], -a[:1]).item() < -0.999


def test_the_null_engine_returns_what_the_real_engine_returns() -> None:
    """``bench/pipeline.py --engine null`` stands in for ``CamEngine``: its result must keep the
    real one's fields, key sets, shapes and dtypes, or the bench breaks (or times the wrong work)
    when the engine's result grows a field."""
    from dataclasses import fields

    from bench.null_pipeline import CLASSES, FEATURES, NullEngine

    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(FEATURES))
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES)).eval()
    images = torch.randn(2, 3, 32, 32)
    real = CamEngine(model, layers=["0"], methods=["gradcam", "cam"], amp=False)(images, targets="topk:2")
    null = NullEngine(["gradcam", "cam"], ["0"], (32, 32))(images, targets="topk:2")
    for field in fields(real):
        ours, theirs = getattr(null, field.name), getattr(real, field.name)
        assert type(ours) is type(theirs), field.name
        if isinstance(theirs, torch.Tensor):
            assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype), field.name
        elif isinstance(theirs, dict):
            assert ours.keys() == theirs.keys(), field.name
            for key, value in theirs.items():
                inner = ours[key]
                pairs = value.items() if isinstance(value, dict) else [(None, value)]
                for layer, tensor in pairs:
                    other = inner[layer] if layer is not None else inner
                    assert (other.shape, other.dtype) == (tensor.shape, tensor.dtype), (field.name, layer)
        else:
            assert ours == theirs, field.name


def test_every_stage_the_null_engine_bench_times_is_a_function_the_shard_calls() -> None:
    """A stage wrapping a name ``workers.shard`` no longer has would silently time nothing."""
    from bench.null_pipeline import STAGES
    from workers import shard

    missing = [
        name for names in STAGES.values() for name in names if not callable(getattr(shard, name, None))
    ]
    assert not missing, missing


def test_host_steps_bench_times_each_step_against_its_predecessor(capsys: pytest.CaptureFixture[str]) -> None:
    """The bench's own checks run (equal PNG bytes after inflating, equal normalised values)."""
    from bench import host_steps

    assert host_steps.main(["--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "step"
    steps = [line for line in lines[1:] if line.strip()]
    assert [line.split(",")[0].split(" (")[0] for line in steps] == [
        "PNG deflate",
        "normalise 64 x 3 x 224 x 224",
        "SQLite rows of a 512-image shard",
        "localisation of 128 maps with boxes",
        "reading 256 local JPEGs",
    ]
    assert all(float(line.split("x  ")[0].split()[-1]) > 0 for line in steps)


@pytest.mark.parametrize(
    "argv", [["--n", "0"], ["--engine", "null", "--batch", "0"], ["--engine", "null", "--shard-size", "-1"]]
)
def test_pipeline_bench_refuses_sizes_below_one(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A size of 0 is an error, not the default: the null engine's sizes default only when not given."""
    from bench.pipeline import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "must be at least 1" in capsys.readouterr().err


def test_worker_processes_bench_runs_each_count_to_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    """Every process explains the whole set (checked in the child); a row per process count."""
    from bench import gpu_workers

    argv = ["--processes", "1,2", "--n", "6", "--shard-size", "4", "--batch", "2", "--model", "demo"]
    assert gpu_workers.main([*argv, "--size", "32", "--device", "cpu", "--torch-threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(float(row[1]) > 0 and float(row[4]) > 0 for row in rows)
    assert "torch CPU threads per process: 1" in lines
    # a count whose run is over the time limit ends the sweep
    assert gpu_workers.main([*argv, "--size", "32", "--device", "cpu", "--max-seconds", "0.0001"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if line.strip()[:1].isdigit()] == ["1"]
    assert any(line.startswith("stopped after 1") for line in lines)


@pytest.mark.parametrize(
    "argv",
    [
        ["--processes", "0"],
        ["--processes", "a"],
        ["--n", "0"],
        ["--torch-threads", "0"],
        ["--max-seconds", "0"],
    ],
)
def test_worker_processes_bench_refuses_bad_counts(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.gpu_workers import parse_args

    with pytest.raises(SystemExit):
        parse_args([*argv, "--device", "cpu"])
    assert "--" in capsys.readouterr().err
