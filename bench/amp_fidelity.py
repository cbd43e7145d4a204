"""How close are mixed-precision maps to float32 maps? Prints per-method correlation figures.

python bench/amp_fidelity.py --device cuda --models resnet18,resnet50 --batch 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torchvision

from workers.cam import METHODS, CamEngine


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--methods", default=",".join(m for m in METHODS if m not in ("scorecam", "ablationcam"))
    )
    parser.add_argument("--amps", default="bf16,fp16")
    args = parser.parse_args()
    torch.manual_seed(0)
    methods = args.methods.split(",")
    print(f"device={args.device} batch={args.batch} size={args.size}")
    print(f"{'model':10} {'method':20} {'amp':5} {'min r':>8} {'mean r':>8} {'max |diff|':>10}")
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None).eval().to(args.device)
        x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
        ref = CamEngine(model, layers=["layer4"], methods=methods, amp=False)(x)
        for amp in args.amps.split(","):
            out = CamEngine(model, layers=["layer4"], methods=methods, amp=amp)(x, targets=ref.targets)
            for method in methods:
                a, b = ref.maps[method].flatten(0, 1), out.maps[method].flatten(0, 1)
                r = pearson(a, b)
                diff = (a - b).abs().max().item()
                print(
                    f"{name:10} {method:20} {amp:5} {r.min().item():8.4f} {r.mean().item():8.4f} {diff:10.4f}"
                )


if __name__ == "__main__":
    main()
