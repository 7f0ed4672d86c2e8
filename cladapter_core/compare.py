"""Baselines against CLAdapter on one dataset and backbone, over several seeds.

Every method goes through the same trainer, data and backbone, so the table compares
methods and nothing else: `linear` (linear probe), `full` (full fine-tuning), `lp-ft`,
`cla-stage1` (CLAdapter, backbone frozen) and `cla-sft` (CLAdapter, Staged Fine-Tuning,
continuing from `cla-stage1` of the same seed).
"""
from __future__ import annotations

import copy
import csv
import math
import shutil
from pathlib import Path

from .errors import ParamsError
from .outputs import atomic_dir, write_json

METHODS = ("linear", "full", "lp-ft", "cla-stage1", "cla-sft")
# method -> list of (mode, stage); the last one is the model that is scored
PLANS = {"linear": [("linear", 1)], "full": [("full", 1)], "lp-ft": [("lp-ft", 1), ("lp-ft", 2)],
         "cla-stage1": [("cla", 1)], "cla-sft": [("cla", 1), ("cla", 2)]}


def _test_metrics(model_dir: Path, prepared_dir: Path, params: dict, split: str) -> dict:
    from . import data
    from .metrics import classification_metrics
    from .model import load_model
    from .distributed import pick_device
    from .train import run_eval
    device = pick_device()
    model = load_model(model_dir).to(device)
    loader = data.make_loader(prepared_dir, split, model.config_dict(), False, params)
    loss, labels, probs = run_eval(model, loader, device)
    return {**classification_metrics(labels, probs, model.num_classes), "loss": loss}


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def compare(params: dict, prepared_dir, out_dir, seeds=(0, 1, 2), methods=None,
            split: str = "test", progress: bool = False) -> list[dict]:
    """Train every method for every seed; write compare.csv (one row per method and seed),
    summary.csv / summary.md / compare.json (mean and spread per method) and compare.png
    into out_dir atomically, print the table and return the summary rows."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in PLANS]
    if unknown:
        raise ParamsError(f"compare: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not seeds:
        raise ParamsError("compare: give at least one seed")
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    with atomic_dir(out_dir) as work:
        rows = [row for seed in seeds
                for row in _run_seed(params, prepared_dir, work, int(seed), methods, split, progress)]
        table = summarise(rows, methods)
        _write_outputs(work, rows, table, params, split)
        for seed in seeds:
            shutil.rmtree(work / f"seed{seed}", ignore_errors=True)
    print(format_table(table, split))
    print(f"written to {out_dir}/ (summary.md, summary.csv, compare.csv, compare.json, compare.png)")
    return table


def _run_seed(params: dict, prepared_dir: Path, work: Path, seed: int, methods: list[str],
              split: str, progress: bool) -> list[dict]:
    """Train and score every method for one seed; `cla-sft` reuses `cla-stage1`'s model."""
    from .train import train
    p = copy.deepcopy(params)
    p["seed"] = seed
    trained: dict[tuple[str, int], tuple[Path, dict]] = {}
    rows = []
    for method in methods:
        seconds, summary, model_dir = 0.0, None, None
        for mode, stage in PLANS[method]:
            key = (mode, stage)
            if key not in trained:
                model_dir = work / f"seed{seed}" / f"{mode}-stage{stage}"
                init = trained[(mode, 1)][0] if stage == 2 else None
                print(f"[compare] seed {seed}: {method} ({mode}, stage {stage})")
                s = train(p, prepared_dir, model_dir, stage=stage, mode=mode, init_from=init,
                          resume=False, progress=progress)
                trained[key] = (model_dir, s)
            model_dir, summary = trained[key]
            seconds += summary["seconds"]
        m = _test_metrics(model_dir, prepared_dir, p, split)
        rows.append({"method": method, "seed": seed, "macro_f1": m["macro_f1"],
                     "accuracy": m["accuracy"], "roc_auc": m["roc_auc"],
                     "trainable_params": summary["param_report"]["trainable"],
                     "total_params": summary["param_report"]["total"],
                     "train_seconds": round(seconds, 2)})
    return rows


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    table = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        f1, f1_sd = _mean_std([r["macro_f1"] for r in mine])
        acc, acc_sd = _mean_std([r["accuracy"] for r in mine])
        secs, _ = _mean_std([r["train_seconds"] for r in mine])
        table.append({"method": method, "seeds": len(mine), "macro_f1_mean": f1, "macro_f1_std": f1_sd,
                      "accuracy_mean": acc, "accuracy_std": acc_sd,
                      "trainable_params": mine[0]["trainable_params"],
                      "trainable_pct": 100.0 * mine[0]["trainable_params"] / mine[0]["total_params"],
                      "train_seconds_mean": secs})
    return table


def format_table(table: list[dict], split: str = "test") -> str:
    head = (f"| method | seeds | {split} macro-F1 | {split} accuracy | trainable params | "
            "train time (s) |\n|---|---|---|---|---|---|")
    lines = [head]
    for r in table:
        lines.append(f"| {r['method']} | {r['seeds']} | {r['macro_f1_mean']:.4f} ± {r['macro_f1_std']:.4f} | "
                     f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | "
                     f"{r['trainable_params']:,} ({r['trainable_pct']:.1f} %) | {r['train_seconds_mean']:.1f} |")
    return "\n".join(lines)


def _write_outputs(work: Path, rows: list[dict], table: list[dict], params: dict, split: str) -> None:
    with open(work / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(work / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    m = params["model"]
    title = f"{m['backbone']}, K={m['num_centers']}, {split} split, mean ± std over seeds"
    (work / "summary.md").write_text(f"# Method comparison\n\n{title}\n\n{format_table(table, split)}\n")
    write_json(work / "compare.json", {"backbone": m["backbone"], "split": split, "runs": rows,
                                       "summary": table})
    _plot(work / "compare.png", table, title)


def _plot(path: Path, table: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    names = [r["method"] for r in table]
    means = [r["macro_f1_mean"] for r in table]
    errs = [r["macro_f1_std"] for r in table]
    colors = ["#d9822b" if n.startswith("cla") else "#5b7fa6" for n in names]
    bars = ax.bar(names, means, yerr=errs, capsize=4, color=colors)
    for bar, r in zip(bars, table):
        ax.text(bar.get_x() + bar.get_width() / 2, 0.02, f"{r['trainable_pct']:.0f}%\ntrainable",
                ha="center", va="bottom", fontsize=7, color="white")
    ax.set_ylim(0, 1)
    ax.set_ylabel("macro-F1")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
