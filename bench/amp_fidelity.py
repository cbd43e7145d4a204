"""How close are mixed-precision maps to float32 maps? Prints per-method fidelity figures.

The float32 reference runs with TF32 off (on CUDA, cuDNN convolutions use TF32 by default,
which is itself a reduced precision). Per model, method and autocast dtype it prints the
per-map Pearson r of the maps, the largest absolute map difference, top-1 flips (images whose
predicted class changes), the largest relative error of the explained class's score, the
range of raw-map scale (max raw / reference max raw) and the share of the reference's top-k
raw-map cells that stay in the top k. Score-CAM and Ablation-CAM run on a smaller batch.

python bench/amp_fidelity.py --device cuda --models resnet18,resnet50 --batch 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torchvision

from bench.fidelity import pearson, raw_scale, target_score_error, tf32_off, top1_flips, top_cell_agreement
from workers.cam import METHODS, CamEngine

PERTURBATION = ("scorecam", "ablationcam")


def _row(name: str, method: str, amp: str, ref, out, images: int, top_k: int) -> str:
    a, b = ref.maps[method].flatten(0, 1), out.maps[method].flatten(0, 1)
    r = pearson(a, b)
    diff = (a - b).abs().max().item()
    ref_raw = ref.raw[method][ref.layers[0]].flatten(0, 1)
    raw = out.raw[method][out.layers[0]].flatten(0, 1)
    low, high = raw_scale(ref_raw, raw)
    flips = top1_flips(ref.logits, out.logits)
    return (
        f"{name:10} {method:20} {amp:5} {r.min().item():7.4f} {r.mean().item():7.4f} {diff:9.4f} "
        f"{flips:>3}/{images:<3} {target_score_error(ref.scores, out.scores):9.2e} "
        f"{low:6.3f}-{high:<6.3f} {top_cell_agreement(ref_raw, raw, top_k):8.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--perturb-batch", type=int, default=2, help="images for scorecam/ablationcam")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--amps", default="bf16,fp16")
    parser.add_argument("--top-k", type=int, default=5, help="raw-map cells compared for rank agreement")
    args = parser.parse_args()
    methods = args.methods.split(",")
    device = torch.device(args.device)
    print(f"device={args.device} batch={args.batch} (perturbation: {args.perturb_batch}) size={args.size}")
    print("reference: float32, TF32 off; scale = max raw / reference max raw (min-max over maps)")
    print(
        f"{'model':10} {'method':20} {'amp':5} {'min r':>7} {'mean r':>7} {'max|diff|':>9} "
        f"{'flips':>7} {'score err':>9} {'raw scale':>13} {f'top{args.top_k} agr':>8}"
    )
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval().to(device)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        groups = [
            ([m for m in methods if m not in PERTURBATION], x),
            ([m for m in methods if m in PERTURBATION], x[: args.perturb_batch]),
        ]
        for group, images in groups:
            if not group:
                continue
            with tf32_off():
                ref = CamEngine(model, layers=["layer4"], methods=group, amp=False)(images)
            for amp in args.amps.split(","):
                engine = CamEngine(model, layers=["layer4"], methods=group, amp=amp)
                out = engine(images, targets=ref.targets)
                for method in group:
                    print(_row(name, method, amp, ref, out, images.shape[0], args.top_k), flush=True)


if __name__ == "__main__":
    main()
