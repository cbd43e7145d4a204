"""The device check's CPU fallback: the script a GPU machine runs, run here small and without CUDA.

It must find an interpreter, run every section, keep the table's shape (a row per method in
parity, precision and speed, the pipeline, decoding and memory rows) and say that the GPU
figures are unmeasured, so the one run on a GPU machine is not the first run of the script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers.cam import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _rows(table: str) -> list[list[str]]:
    lines = [
        line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| section")
    ]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.slow
def test_cpu_fallback_prints_the_whole_table(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["bash", "bench/device_check.sh", "--tiny", "--budget-scale", "20"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = (tmp_path / "device_check.md").read_text()
    assert written.strip() in done.stdout
    assert "(partial" not in written.splitlines()[0]
    rows = _rows(written)
    by_section: dict[str, dict[str, list[str]]] = {}
    for section, what, *rest in rows:
        by_section.setdefault(section, {})[what] = rest
    assert "GPU figures unmeasured" in by_section["environment"]["device"][0]
    assert not [row for row in rows if row[1] == "section"], "a section failed: " + str(rows)
    for method in METHODS:
        assert by_section["parity"][method][0] == "unmeasured"
        assert by_section["bf16"][method][0].startswith("min r ")
        assert method in by_section["fp16"]
        assert by_section["speed"][method][0].endswith("img/s")
    assert float(by_section["bf16"]["gradcam"][0].split()[-1]) > 0.99
    assert "grad-cam" in by_section["speed"]["gradcam"][1]
    assert by_section["pipeline"]["end to end (gradcam,cam)"][0].endswith("img/s")
    assert "cores busy" in by_section["pipeline"]["end to end (gradcam,cam)"][-1]
    host = by_section["host"]
    assert host["host CPU per image (device-side stages left out)"][0].endswith(" ms")
    assert host["host CPU per image (device-side stages left out)"][2].endswith(" cores")
    processes = by_section["processes"]
    assert list(processes) == ["1 worker process, JPEG 375-500px", "2 worker processes, JPEG 375-500px"]
    assert all(row[0].endswith("img/s") for row in processes.values())
    decode = by_section["decode"]
    # on the CPU the device path uses torchvision's libjpeg-turbo: Pillow's pixels exactly
    assert decode["pixels: device path vs CPU path"][0] == "max abs 0 levels"
    memory = [what for what in by_section["memory"]]
    assert memory == [
        f"peak device memory: {name}"
        for name in ("environment", "parity", "precision", "speed", "pipeline", "decode", "host", "processes")
    ]
