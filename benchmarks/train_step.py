"""Benchmark 3: training step time of CLAdapter against the baselines it replaces.

Per backbone, one model (random weights, K=20, r=256) and four steps on the same batch
(batch 8, 224 px), timed interleaved:

- full fine-tuning:  everything trainable, linear head on the backbone's pooled feature
- CLAdapter stage 2: everything trainable, backbone -> adapter -> mean -> head
- linear probe:      backbone frozen, linear head on the pooled feature
- CLAdapter stage 1: backbone frozen, adapter + head trained (uncached; see
                     cache_stage1.py for the cached path)

Each step is forward + backward (the figure compared), then an Adam step (reported
beside it). Ratios: CLAdapter stage 2 / full fine-tuning (target <= 1.15x) and CLAdapter
stage 1 / linear probe. On CUDA: bf16 autocast, images/s, peak memory and MFU.

    python benchmarks/train_step.py [--backbones vit_base_patch16_224 convnext_base
                                     --batch 8 --img-size 224 --steps 2 --warmup 1]
"""
from __future__ import annotations

import time

import _common as C
import torch
import torch.nn.functional as F

from cladapter_core.model import build_model

VARIANTS = ("full fine-tuning", "CLAdapter stage 2", "linear probe", "CLAdapter stage 1")


def make_steps(model, x, y, device):
    """name -> (forward + backward, optimizer step) callables; each sets up its own stage."""
    opt = torch.optim.Adam([p for p in model.parameters()], lr=1e-5)

    def pooled_head(inp):
        return model.head(model.backbone.forward_pooled(inp))

    plan = {"full fine-tuning": (2, pooled_head), "CLAdapter stage 2": (2, model),
            "linear probe": (1, pooled_head), "CLAdapter stage 1": (1, model)}

    def fwd_bwd(stage, fn):
        def run():
            model.set_stage(stage).train()
            opt.zero_grad(set_to_none=True)
            with C.autocast(device):
                loss = F.cross_entropy(fn(x).float(), y)
            loss.backward()
        return run

    def opt_step():
        opt.step()  # Adam skips parameters without a gradient (frozen or unused)
    return {name: (fwd_bwd(*plan[name]), opt_step) for name in VARIANTS}


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["vit_base_patch16_224", "convnext_base"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--centers", type=int, default=20)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--channels-last", action="store_true", help="CNNs in NHWC memory format")
    args = p.parse_args()
    device = C.pick_device(args.device)
    info = C.banner(f"training step, batch {args.batch} at {args.img_size} px: CLAdapter vs full fine-tuning "
                    "and linear probe", device)

    rows, results = [], []
    for name in args.backbones:
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, mode="cla", num_centers=args.centers, rank=args.rank, pretrained=False).to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        steps = make_steps(model, x, y, device)
        # Interleave: fwd+bwd and the optimizer step of each variant, round robin.
        fns = {}
        for v, (fb, st) in steps.items():
            fns[f"{v}|fb"] = fb
            fns[f"{v}|opt"] = st
        t0 = time.time()
        times = C.time_interleaved(fns, args.warmup, args.steps, device)
        elapsed = time.time() - t0
        res = {"backbone": name, "params": model.param_report(), "seconds_total": elapsed, "variants": {}}
        for v in VARIANTS:
            fb, opt = C.median(times[f"{v}|fb"]), C.median(times[f"{v}|opt"])
            entry = {"fwd_bwd_s": fb, "adam_s": opt, "fwd_bwd_times": times[f"{v}|fb"],
                     "images_per_s": args.batch / (fb + opt)}
            if device.type == "cuda":
                entry["peak_memory_bytes"] = C.peak_memory(steps[v][0], device)
                flops = C.count_flops(steps[v][0])
                entry["gflop_per_step"] = flops / 1e9
                entry["mfu"] = C.mfu(flops, fb, device)
            res["variants"][v] = entry
        full, cla2 = res["variants"]["full fine-tuning"], res["variants"]["CLAdapter stage 2"]
        lp, cla1 = res["variants"]["linear probe"], res["variants"]["CLAdapter stage 1"]
        res["stage2_over_full"] = cla2["fwd_bwd_s"] / full["fwd_bwd_s"]
        res["stage1_over_linear_probe"] = cla1["fwd_bwd_s"] / lp["fwd_bwd_s"]
        res["stage2_over_full_with_adam"] = (cla2["fwd_bwd_s"] + cla2["adam_s"]) / (full["fwd_bwd_s"] + full["adam_s"])
        for v in VARIANTS:
            e = res["variants"][v]
            ratio = {"CLAdapter stage 2": res["stage2_over_full"],
                     "CLAdapter stage 1": res["stage1_over_linear_probe"]}.get(v)
            row = [name, v, f"{e['fwd_bwd_s']:.2f}", f"{e['adam_s']:.2f}", f"{e['images_per_s']:.2f}",
                   f"{ratio:.2f}x" if ratio else "1 (base)" if v in ("full fine-tuning", "linear probe") else "-"]
            if device.type == "cuda":
                row += [f"{e['peak_memory_bytes'] / 2**30:.2f}", f"{(e['mfu'] or 0) * 100:.0f}%"]
            rows.append(row)
        results.append(res)
        del model, steps, fns
    cols = ["backbone", "variant", "fwd+bwd s", "Adam step s", "images/s", "fwd+bwd ratio"]
    if device.type == "cuda":
        cols += ["peak GiB", "MFU"]
    print(f"# median of {args.steps} interleaved steps after {args.warmup} warm-up; K={args.centers}, r={args.rank}"
          + (", channels_last" if args.channels_last else ""))
    print(C.fmt_table(cols, rows))
    print("# ratios: CLAdapter stage 2 / full fine-tuning (target <= 1.15x); CLAdapter stage 1 / linear probe")
    C.write_json("train_step", {"command": C.command_line(), "device": info, "args": vars(args),
                                "results": results}, args.json)


if __name__ == "__main__":
    main()
