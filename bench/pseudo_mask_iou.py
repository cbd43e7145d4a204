"""Mean IoU of ``camaudit export masks`` pseudo-masks with the synthetic objects' true masks.

The synthetic set (``workers.synth``) knows every object's pixels, so pseudo-labels can be
scored instead of eyeballed: one embedded run of the demo model with every method asked for,
one mask export per method, and per image the IoU of the union of its pseudo-mask instances
with the object. Only maps of the predicted class count; images the model got wrong are
included (a wrong class's map is a pseudo-label too). A full-image mask is printed as the floor.

    python bench/pseudo_mask_iou.py --n 200 --seed 7 --threshold 0.3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from scheduler.cli import app
from workers.synth import make_dataset, render_sample, sample_rng

DEFAULT_METHODS = "cam,gradcam,gradcam++,xgradcam,hirescam,layercam,eigencam,scorecam,ablationcam"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--min-area", type=int, default=16)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    args = parser.parse_args()
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_dataset(root / "data", args.n, args.seed)
        db = f"sqlite:///{root / 'runs.db'}"
        common = ["--database-url", db]
        run = runner.invoke(
            app,
            ["run", "--source", str(manifest), "--methods", args.methods, "--storage-url", str(root / "maps"),
             "--json", *common],
        )  # fmt: skip
        if run.exit_code != 0:
            raise SystemExit(run.output)
        run_id = json.loads(run.stdout)["run_id"]
        truths = [render_sample(sample_rng(args.seed, i)).mask for i in range(args.n)]
        full = float(np.mean([t.sum() / t.size for t in truths]))
        print(f"{args.n} images, seed {args.seed}, threshold {args.threshold}, min area {args.min_area}")
        print(f"{'method':<14} mean IoU")
        for method in args.methods.split(","):
            out = root / f"masks-{method}"
            result = runner.invoke(
                app,
                ["export", "masks", run_id, "--method", method, "--out", str(out), "--threshold",
                 str(args.threshold), "--min-area", str(args.min_area), *common],
            )  # fmt: skip
            if result.exit_code != 0:
                raise SystemExit(result.output)
            ious = []
            for line in (out / "masks.jsonl").read_text().splitlines():
                row = json.loads(line)
                ordinal = int(Path(row["uri"]).stem)
                with Image.open(out / row["mask"]) as png:
                    mask = np.asarray(png, dtype=bool)
                target = truths[ordinal]
                ious.append((mask & target).sum() / max((mask | target).sum(), 1))
            print(f"{method:<14} {np.mean(ious):.3f}")
        print(f"{'full image':<14} {full:.3f}")


if __name__ == "__main__":
    main()
