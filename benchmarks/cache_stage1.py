"""Benchmark 2: stage-1 training with the feature cache against without, end to end.

`cladapter_core.training.train` (the real trainer: data loading, validation every epoch,
checkpoints, saving) runs stage 1 on 200 training images at 224 px with
`vit_small_patch16_224` (random weights), once uncached and once with
`train.cache.views=0` (each image through the backbone once). Both without
augmentation, so they train the same model (tests/test_cache.py shows the weights agree).

Every uncached epoch does the same work (a backbone pass over every image, then the
adapter), so by default the uncached run is measured for `--uncached-epochs` epochs and
its 20-epoch time is that run plus the remaining epochs at its mean epoch time; the
table says so. `--uncached-epochs 20` measures all of it (about 10x longer).

Also printed: what FLOP counts alone predict. With the backbone's forward FLOPs F_b and
the adapter + head's forward + backward FLOPs F_a per image, E epochs cost
E (F_b + F_a) uncached and F_b + E F_a cached.

    python benchmarks/cache_stage1.py [--images 200 --epochs 20 --uncached-epochs 3
                                       --modes cla linear --rank 256 --batch-size 32]
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import _common as C
import torch

from cladapter_core.training import feature_cache as cache
from cladapter_core.data import make_demo_data, prepare
from cladapter_core.model import build_model
from cladapter_core.params import load_params, model_kwargs
from cladapter_core.training import train

NO_AUG = "train.augment={hflip: false, vflip: false, brightness: 0, contrast: 0, shift: 0, scale: 0, rotate: 0}"


def flops_per_image(params: dict, mode: str, device) -> tuple[int, int]:
    """(backbone forward, adapter + head forward + backward) FLOPs of one image."""
    torch.manual_seed(0)
    model = build_model(num_classes=10, **{**model_kwargs(params), "mode": mode}).to(device).set_stage(1)
    size = model.config_dict()["input_size"]
    x = torch.randn(2, *size, device=device)
    with torch.no_grad():
        feats = model.backbone_output(x)
    bb = C.count_flops(lambda: model.backbone_output(x)) // 2
    head = C.count_flops(lambda: model.head_features(feats).sum().backward()) // 2
    return bb, head


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=200, help="training images (10 digit classes)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--uncached-epochs", type=int, default=3,
                   help="epochs the uncached run really trains (the rest is extrapolated)")
    p.add_argument("--modes", nargs="+", default=["cla", "linear"])
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--centers", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--storage", default="memory", choices=["memory", "disk"])
    p.add_argument("--workdir", default=None, help="keep data and models here (default: a temp dir)")
    args = p.parse_args()
    device = C.pick_device(args.device)
    info = C.banner(f"stage 1 cached vs uncached: {args.backbone}, {args.images} images at "
                    f"{args.img_size} px, {args.epochs} epochs", device)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cladapter-bench-cache-"))
    per_class = args.images // 10
    base = [f"model.backbone={args.backbone}", "model.backbone_kwargs={}", "model.pretrained=false",
            "train.lr=0.002", "train.grad_clip=1.0",  # random weights: the settings its figures were taken with
            f"model.rank={args.rank}", f"model.num_centers={args.centers}",
            f"train.batch_size={args.batch_size}", NO_AUG, "train.warmup_epochs=1",
            f"data.shots_per_class={per_class}", "data.val_fraction=0.02", "data.test_fraction=0.02",
            f"data.resize={args.img_size}", f"train.cache.storage={args.storage}",
            f"train.cache.dir={work / 'cache'}", "train.cache.dtype=float16", "train.cache.views=null"]
    if args.img_size != 224:
        base += [f"model.backbone_kwargs={{img_size: {args.img_size}}}"]
    params0 = load_params(None, base)
    make_demo_data(work / "digits")
    t0 = time.time()
    summary = prepare(work / "digits", work / "prepared", params0)
    totals = summary["totals"]
    print(f"# data: digits demo resized to {args.img_size} px at prepare ({time.time() - t0:.1f} s); "
          f"images per split {totals}")

    rows, results = [], []
    for mode in args.modes:
        bb, head = flops_per_image(params0, mode, device)
        bound = args.epochs * (bb + head) / (bb + args.epochs * head)
        cache.clear_memory()
        runs = {}
        for label, epochs, extra in (("uncached", args.uncached_epochs, []),
                                     ("cached", args.epochs, ["train.cache.views=0"])):
            params = load_params(None, base + extra + [f"stage1.epochs={epochs}", f"train.mode={mode}"])
            out = work / f"{mode}-{label}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            s = train(params, work / "prepared", out, stage=1, mode=mode, progress=False)
            wall = time.perf_counter() - t0
            if (s.get("cache") is None) != (label == "uncached"):
                raise SystemExit(f"the {label} run was not {label}: check train.cache in the params")
            hist = json.loads((out / "history.json").read_text())
            epoch_s = [r["seconds"] for r in hist]
            runs[label] = {"wall_s": wall, "epochs_run": len(hist), "epoch_seconds": epoch_s,
                           "cache": s.get("cache"), "best_value": s["best_value"]}
        un, ca = runs["uncached"], runs["cached"]
        mean_epoch = sum(un["epoch_seconds"]) / len(un["epoch_seconds"])
        un_total = un["wall_s"] + (args.epochs - un["epochs_run"]) * mean_epoch
        measured = un["epochs_run"] == args.epochs
        ratio = un_total / ca["wall_s"]
        build = (ca["cache"] or {}).get("seconds", 0.0)
        cached_epoch = sum(ca["epoch_seconds"]) / len(ca["epoch_seconds"])
        rows.append([mode, f"{un_total:.0f}" + ("" if measured else f" (ext. from {un['epochs_run']} ep.)"),
                     f"{ca['wall_s']:.0f}", f"{build:.0f}", f"{mean_epoch:.1f}", f"{cached_epoch:.2f}",
                     f"{ratio:.1f}x", f"{bound:.1f}x"])
        results.append({"mode": mode, "uncached_total_s": un_total, "uncached_measured_all_epochs": measured,
                        "cached_total_s": ca["wall_s"], "cache_build_s": build, "speedup": ratio,
                        "flop_estimate_speedup": bound, "backbone_gflop_per_image": bb / 1e9,
                        "adapter_head_fwd_bwd_gflop_per_image": head / 1e9, "runs": runs})
    print(f"# {args.backbone}, K={args.centers}, r={args.rank}, batch {args.batch_size}, "
          f"float16 {args.storage} cache, validation every epoch")
    print(C.fmt_table(["mode", f"uncached {args.epochs} ep. s", f"cached {args.epochs} ep. s", "cache build s",
                       "uncached s/epoch", "cached s/epoch", "speed-up", "FLOP-count estimate"], rows))
    print("# FLOP-count estimate = E (F_b + F_a) / (F_b + E F_a); F_b, F_a per image: " + ", ".join(
        f"{r['mode']}: F_b {r['backbone_gflop_per_image']:.2f} GFLOP, F_a {r['adapter_head_fwd_bwd_gflop_per_image']:.3f} GFLOP"
        for r in results))
    print("# target: >= 10x end to end")
    C.write_json("cache_stage1", {"command": C.command_line(), "device": info, "args": vars(args), "data": totals,
                                  "results": results}, args.json)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
