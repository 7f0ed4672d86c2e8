"""Benchmark 5: inference throughput of a saved CLAdapter model against the plain backbone.

A CLAdapter model (K=20, r=256, random weights) is written with `save_model` and read
back with `load_model`, as `predict` and the served model do; the baseline is
`timm.create_model(name, num_classes=10)`: the plain backbone with its linear head.
Both run in eval mode under torch.inference_mode, timed interleaved; images/s and the
ratio are printed. On CUDA: bf16 autocast and peak memory.

    python benchmarks/inference.py [--backbones vit_base_patch16_224 convnext_base --batch 8 --iters 3]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import _common as C
import timm
import torch

from cladapter_core.model import build_model, load_model, save_model


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["vit_base_patch16_224", "convnext_base"])
    p.add_argument("--batch", type=int, default=None, help="default 8 on the CPU, 64 on CUDA")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    device = C.pick_device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    info = C.banner(f"inference, batch {batch} at {args.img_size} px: saved CLAdapter model vs plain timm "
                    "backbone + linear head", device)
    rows, results = [], []
    for name in args.backbones:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            save_model(build_model(name, num_classes=10, mode="cla", num_centers=20, rank=256, pretrained=False), Path(d) / "m")
            cla = load_model(Path(d) / "m").to(device).eval()
        plain = timm.create_model(name, num_classes=10).to(device).eval()
        x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)

        def run(model):
            def f():
                with torch.inference_mode(), C.autocast(device):
                    model(x)
            return f
        fns = {"plain": run(plain), "cla": run(cla)}
        times = C.time_interleaved(fns, args.warmup, args.iters, device)
        ips = {k: batch / C.median(v) for k, v in times.items()}
        one = x[:1]
        with torch.inference_mode():
            flops = {k: C.count_flops(lambda m=m: m(one)) for k, m in (("plain", plain), ("cla", cla))}
        res = {"backbone": name, "batch": batch, "images_per_s": ips, "times_s": times,
               "cla_over_plain_throughput": ips["cla"] / ips["plain"], "gflop_per_image": {
                   k: v / 1e9 for k, v in flops.items()}, "flop_ratio_plain_over_cla": flops["plain"] / flops["cla"]}
        row = [name, f"{ips['plain']:.2f}", f"{ips['cla']:.2f}", f"{ips['cla'] / ips['plain']:.2f}",
               f"{flops['plain'] / flops['cla']:.2f}"]
        if device.type == "cuda":
            mem = {k: C.peak_memory(f, device) for k, f in fns.items()}
            res["peak_memory_bytes"] = mem
            row += [f"{mem['plain'] / 2**30:.2f}", f"{mem['cla'] / 2**30:.2f}"]
        rows.append(row)
        results.append(res)
        del cla, plain
    cols = ["backbone", "plain + linear head img/s", "saved CLAdapter img/s", "CLAdapter / plain",
            "FLOPs plain / CLAdapter"]
    if device.type == "cuda":
        cols += ["plain peak GiB", "CLAdapter peak GiB"]
    print(f"# median of {args.iters} interleaved batches after {args.warmup} warm-up")
    print(C.fmt_table(cols, rows))
    C.write_json("inference", {"command": C.command_line(), "device": info, "args": vars(args),
                               "results": results}, args.json)


if __name__ == "__main__":
    main()
