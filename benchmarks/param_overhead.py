"""Benchmark 4: CLAdapter's parameter overhead per backbone, beside the paper's 7 to 10.4 %.

Models are built on the `meta` device (shapes only, no memory, no weights), with the
paper's defaults K=20, r=256, one block, MLP ratio 4. Overhead = adapter parameters /
backbone parameters (the head is left out of both).

    python benchmarks/param_overhead.py [--centers 20 --rank 256 --backbones ...]
"""
from __future__ import annotations

import _common as C
import torch

from cladapter_core.model import build_model

BACKBONES = {
    "ViT-B/16": "vit_base_patch16_224",
    "ViT-L/16": "vit_large_patch16_224",
    "ConvNeXt-B": "convnext_base",
    "ResNet-50": "resnet50",
    "Swin-B": "swin_base_patch4_window7_224",
    "r3d_18": "r3d_18",
}
PAPER_RANGE = (7.0, 10.4)


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--centers", type=int, default=20)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES.values()),
                   help="timm or torchvision video model names")
    args = p.parse_args()
    info = C.banner(f"parameter overhead at K={args.centers}, r={args.rank}", torch.device("cpu"))
    label = {v: k for k, v in BACKBONES.items()}
    rows, results = [], []
    for name in args.backbones:
        with torch.device("meta"):
            model = build_model(name, num_classes=10, mode="cla", num_centers=args.centers, rank=args.rank, pretrained=False)
        rep = model.param_report()
        pct = rep["adapter_overhead_pct"]
        inside = PAPER_RANGE[0] <= pct <= PAPER_RANGE[1]
        rows.append([label.get(name, name), name, model.backbone.dim, f"{rep['backbone'] / 1e6:.1f}",
                     f"{rep['adapter'] / 1e6:.2f}", f"{pct:.1f}", "yes" if inside else
                     ("below" if pct < PAPER_RANGE[0] else "above")])
        results.append({"label": label.get(name, name), "backbone": name, "dim": model.backbone.dim,
                        "backbone_params": rep["backbone"], "adapter_params": rep["adapter"],
                        "overhead_pct": pct, "in_paper_range": inside})
    print(C.fmt_table(["backbone", "timm / torchvision name", "D", "backbone M", "adapter M", "overhead %",
                       f"in paper's {PAPER_RANGE[0]}-{PAPER_RANGE[1]} %"], rows))
    print("# adapter = LN_in + block (LN, K centers, K r x r transforms, Down D->r, Up r->D, LN, MLP D->4D->D) "
          "+ LN_out: about 8 D^2 + K r^2 + 2 D r, so it grows with D^2 while the backbone's size does not")
    C.write_json("param_overhead", {"command": C.command_line(), "device": info, "args": vars(args),
                                    "results": results}, args.json)


if __name__ == "__main__":
    main()
