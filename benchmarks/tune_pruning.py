"""The same Optuna search with and without pruning: epochs spent and best value.

    python benchmarks/tune_pruning.py [--trials 16] [--shots 20] [--pruner median] [--out DIR]

Both searches run the same space with the same TPE seed on the demo digits (a tiny ViT,
stage 1 on one cached un-augmented backbone pass), each in its own SQLite study, no
MLflow. Every setting is pinned here, so later changes of the defaults do not move the
figures. The space is wide on purpose (learning rates over two decades, 0-3
stage-2 epochs) so that some trials are hopeless, which is what pruning is for.
Prints one line per search and writes `results.json` in --out.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SETTINGS = [
    "model.backbone=vit_tiny_patch16_224",
    "model.backbone_kwargs={img_size: 16, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.rank=8", "train.batch_size=16", "train.warmup_epochs=0",
    "model.pretrained=false", "train.grad_clip=1.0",  # random weights, as before the paper's defaults
    # stage 2's augmentation: the demo's (a flipped or upturned digit is another digit)
    "train.augment={hflip: false, vflip: false, brightness: 0.1, contrast: 0.1, color_p: 1.0, "
    "shift: 0.0625, scale: 0.1, rotate: 15, affine_p: 1.0}",
    # stage 1 on one un-augmented cached backbone pass, for the final run and every trial alike;
    # no re-runs of the best trials (the same cost with and without the pruner)
    "train.cache.views=0", "tune.rerun_top=0",
    "tune.startup_trials=4", "tune.pruner_startup_trials=3", "tune.pruner_warmup_steps=1",
    "tune.space=[{param: model.num_centers, choices: [5, 10, 20, 30, 50]}, "
    "{param: stage1.epochs, low: 2, high: 6}, {param: stage2.epochs, low: 0, high: 3}, "
    "{param: train.lr, low: 1.0e-4, high: 3.0e-2, log: true}, "
    "{param: stage2.lr_factor, choices: [0.03, 0.1, 0.3]}]",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--shots", type=int, default=20, help="training images per class")
    ap.add_argument("--pruner", default="median", choices=("median", "percentile", "hyperband"))
    ap.add_argument("--out", default=None, help="folder for data, studies and results.json (default: temp)")
    args = ap.parse_args()

    import optuna

    from cladapter_core.data import make_demo_data, prepare
    from cladapter_core.params import load_params
    from cladapter_core.tune import tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    root = Path(args.out or tempfile.mkdtemp(prefix="tune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    base = SETTINGS + [f"data.shots_per_class={args.shots}", "data.val_fraction=0.1",
                       "data.test_fraction=0.05"]
    if not (root / "prepared" / "manifest.csv").is_file():
        make_demo_data(root / "digits")
        prepare(root / "digits", root / "prepared", load_params(None, base))

    rows = []
    for pruner in ("none", args.pruner):
        params = load_params(None, base + [f"tune.pruner={pruner}",
                                           f"tune.storage=sqlite:///{root / f'study-{pruner}.db'}"])
        t0 = time.time()
        s = tune(params, root / "prepared", root / f"results-{pruner}", n_trials=args.trials,
                 study_name=f"bench-{pruner}", track=False)
        rows.append({"pruner": pruner, "trials": s["n_trials"], "complete": s["complete"],
                     "pruned": s["pruned"], "epochs": s["epochs"], "best_value": s["best_value"],
                     "best_params": s["best_params"], "seconds": round(time.time() - t0, 1)})

    print(f"\n{'pruner':<10} {'trials':>6} {'pruned':>6} {'epochs':>7} {'best val macro-F1':>18} {'seconds':>8}")
    for r in rows:
        print(f"{r['pruner']:<10} {r['trials']:>6} {r['pruned']:>6} {r['epochs']:>7} "
              f"{r['best_value']:>18.4f} {r['seconds']:>8}")
    saved = 1 - rows[1]["epochs"] / max(rows[0]["epochs"], 1)
    print(f"pruning spent {saved:.0%} fewer epochs; best value {rows[1]['best_value'] - rows[0]['best_value']:+.4f}")
    (root / "results.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(f"results: {root / 'results.json'}")


if __name__ == "__main__":
    main()
