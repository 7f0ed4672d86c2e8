"""Baselines against CLAdapter on one dataset and backbone, over several seeds, on equal terms.

Methods: `linear` (linear probe on the backbone's own pooling), `linear-mean` (linear probe
on the mean of the tokens, CLAdapter's pooling), `full` (full fine-tuning), `lp-ft`,
`cla-stage1` (CLAdapter, backbone frozen) and `cla-sft` (CLAdapter, Staged Fine-Tuning).

What makes the comparison fair (and is written into compare.json and the table's header):
- Same data, augmentation policy and seeds: every method trains on the same prepared
  split with the same `train.augment`, fresh draws each epoch (a stage-1 feature cache, if
  on, gets views >= epochs, which gives the same images as no cache).
- Same budget: every method trains `stage1.epochs + stage2.epochs` epochs in all; one-stage
  frozen methods run all of them, staged methods split them as the params say.
- Learning rates per role, explicit: the head's (`compare.head_lr`, default `train.lr`) for
  every frozen-backbone stage, the backbone's (`compare.backbone_lr`, default
  `train.lr * stage2.lr_factor`) for full fine-tuning and every stage 2.
- Tuned values (best params of `cladapter tune`) reach only the methods of the mode they
  were tuned for (`tuned_for`), never the baselines.
- Time is the wall clock of every stage of a method, the stage-1 cache build included: the
  in-process cache is dropped before each method, so none rides on another's cache.
"""
from __future__ import annotations

import logging
import copy
import csv
import math
import shutil
import time
from pathlib import Path

from ..errors import ParamsError
from ..outputs import atomic_dir, write_json
from ..params import set_dotted

logger = logging.getLogger(__name__)

METHODS = ("linear", "linear-mean", "full", "lp-ft", "cla-stage1", "cla-sft")
# method -> list of (mode, stage); the last one is the model that is scored
PLANS = {"linear": [("linear", 1)], "linear-mean": [("linear-mean", 1)], "full": [("full", 1)],
         "lp-ft": [("lp-ft", 1), ("lp-ft", 2)], "cla-stage1": [("cla", 1)],
         "cla-sft": [("cla", 1), ("cla", 2)]}
SCORES = ("macro_f1", "f1_macro_pr", "accuracy", "roc_auc")


def budget(params: dict) -> dict:
    """The equal budget every method gets: epochs in all and the two learning rates."""
    c = params.get("compare") or {}
    lr = params["train"]["lr"]
    head = c.get("head_lr") or lr
    backbone = c.get("backbone_lr") or lr * params["stage2"]["lr_factor"]
    return {"epochs": params["stage1"]["epochs"] + params["stage2"]["epochs"],
            "head_lr": head, "backbone_lr": backbone}


def method_params(params: dict, method: str, seed: int, tuned: dict | None = None,
                  tuned_for: str | None = None) -> dict:
    """The params one method trains with: the shared budget, its seed, and tuned values
    only when they were tuned for this method's mode."""
    if method not in PLANS:
        raise ParamsError(f"compare: unknown method {method!r}; choose from {', '.join(METHODS)}")
    b = budget(params)
    p = copy.deepcopy(params)
    mode = PLANS[method][0][0]
    if tuned and tuned_for == mode:
        for name, value in tuned.items():
            set_dotted(p, name, value)
        b = {**budget(p), "epochs": p["stage1"]["epochs"] + p["stage2"]["epochs"]}
    p["seed"] = int(seed)
    p["train"]["mode"] = mode
    p["train"]["lr"] = b["head_lr"]
    p["stage2"]["lr_factor"] = b["backbone_lr"] / b["head_lr"]
    if len(PLANS[method]) == 1 and mode != "full":  # one frozen stage: all the epochs
        p["stage1"]["epochs"], p["stage2"]["epochs"] = b["epochs"], 0
    cache = p["train"]["cache"]
    if cache.get("views") is not None:  # views >= the frozen stage's epochs: same images as fresh draws
        cache["views"] = max(int(cache["views"]), p["stage1"]["epochs"]) if cache["views"] else 0
        cache["storage"] = "memory"
    return p


def train_method(p: dict, prepared_dir: Path, work: Path, method: str, progress: bool = False) -> dict:
    """Every stage of `method` from scratch; returns the scored model dir, summary and time."""
    from ..training import feature_cache as cache
    from ..training import train
    cache.clear_memory()  # each method pays for its own cache build
    t0, init, summary, model_dir = time.perf_counter(), None, None, None
    for mode, stage in PLANS[method]:
        model_dir = work / f"{method}-stage{stage}"
        summary = train(p, prepared_dir, model_dir, stage=stage, mode=mode, init_from=init,
                        resume=False, progress=progress)
        init = model_dir
    return {"model_dir": model_dir, "summary": summary, "seconds": time.perf_counter() - t0}


def score(model_dir: Path, prepared_dir: Path, params: dict, split: str) -> dict:
    from .. import data
    from ..distributed import pick_device
    from ..evaluation.metrics import classification_metrics
    from ..model import load_model
    from ..training import run_eval
    device = pick_device()
    model = load_model(model_dir).to(device)
    loader = data.make_loader(prepared_dir, split, model.config_dict(), False, params)
    loss, labels, probs = run_eval(model, loader, device)
    return {**classification_metrics(labels, probs, model.num_classes), "loss": loss}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the defined values (NaN if none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def compare(params: dict, prepared_dir, out_dir, seeds=(0, 1, 2), methods=None,
            split: str = "test", progress: bool = False, tuned: dict | None = None,
            tuned_for: str | None = None, track: bool = False) -> list[dict]:
    """Train every method for every seed on equal terms; write compare.csv (one row per
    method and seed), summary.csv / summary.md / compare.json (mean and spread per method)
    and compare.png into out_dir atomically, print the table and return the summary rows.
    `track`: one MLflow parent run with the table and plot, a child run per method and seed."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in PLANS]
    if unknown:
        raise ParamsError(f"compare: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not seeds:
        raise ParamsError("compare: give at least one seed")
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    log = _tracker(params, prepared_dir, methods, seeds, split, tuned_for if tuned else None) if track else None
    try:
        with atomic_dir(out_dir) as work:
            rows = []
            for seed in seeds:
                for method in methods:
                    logger.info("[compare] seed %s: %s", seed, method)
                    rows.append(_run_one(params, prepared_dir, work / f"seed{seed}", method, int(seed),
                                         split, progress, tuned, tuned_for))
                    if log:
                        _log_row(log, rows[-1], split)
                shutil.rmtree(work / f"seed{seed}", ignore_errors=True)
            table = summarise(rows, methods)
            _write_outputs(work, rows, table, params, split, tuned_for if tuned else None)
    except BaseException:
        if log:
            log.fail()
        raise
    if log:
        log.finish([out_dir / f for f in ("summary.md", "summary.csv", "compare.csv", "compare.json", "compare.png")])
    logger.info("%s", format_table(table, split, budget(params)))
    logger.info("written to %s/ (summary.md, summary.csv, compare.csv, compare.json, compare.png)", out_dir)
    return table


def _tracker(params: dict, prepared_dir: Path, methods, seeds, split: str, tuned_for):
    from .study_runs import StudyRuns
    study = {"methods": methods, "seeds": [int(s) for s in seeds], "split": split, "tuned_for": tuned_for,
             **{f"budget.{k}": v for k, v in budget(params).items()}}
    # scored on `split` (test for the final report); trained on train with val for selection
    return StudyRuns(params, study, prepared_dir, kind="compare", run_name=f"compare-{split}",
                     splits=tuple(dict.fromkeys(("train", "val", split))), resume=False)


def _log_row(log, row: dict, split: str) -> None:
    name = f"{row['method']} seed {row['seed']}"
    log.cell(name, name, {k: row[k] for k in ("method", "seed", "head_lr", "backbone_lr", "epochs", "tuned")},
             {**{f"{split}_{k}": row[k] for k in SCORES}, "train_seconds": row["train_seconds"],
              "trainable_params": row["trainable_params"]})


def _run_one(params, prepared_dir: Path, work: Path, method: str, seed: int, split: str,
             progress: bool, tuned, tuned_for) -> dict:
    from ..training import stage_plan
    p = method_params(params, method, seed, tuned, tuned_for)
    run = train_method(p, prepared_dir, work, method, progress)
    m = score(run["model_dir"], prepared_dir, p, split)
    rep = run["summary"]["param_report"]
    return {"method": method, "seed": seed, **{k: m.get(k, float("nan")) for k in SCORES},
            "trainable_params": rep["trainable"], "total_params": rep["total"],
            "epochs": sum(stage_plan(p, stage, mode)["epochs"] for mode, stage in PLANS[method]),
            "head_lr": p["train"]["lr"], "backbone_lr": p["train"]["lr"] * p["stage2"]["lr_factor"],
            "tuned": bool(tuned) and tuned_for == PLANS[method][0][0],
            "train_seconds": round(run["seconds"], 2)}


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    table = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry = {"method": method, "seeds": len(mine)}
        for k in SCORES:
            entry[f"{k}_mean"], entry[f"{k}_std"] = mean_std([r[k] for r in mine])
        entry.update({"trainable_params": mine[0]["trainable_params"],
                      "trainable_pct": 100.0 * mine[0]["trainable_params"] / mine[0]["total_params"],
                      "epochs": mine[0]["epochs"], "tuned": mine[0]["tuned"],
                      "train_seconds_mean": mean_std([r["train_seconds"] for r in mine])[0]})
        table.append(entry)
    return table


def budget_line(b: dict) -> str:
    return (f"Equal budget: {b['epochs']} epochs per method, same data, augmentation and seeds; "
            f"head lr {b['head_lr']:g} (frozen backbone), backbone lr {b['backbone_lr']:g} "
            "(full fine-tuning and every stage 2); time includes cache builds and every stage.")


def format_table(table: list[dict], split: str = "test", b: dict | None = None) -> str:
    head = (f"| method | seeds | {split} macro-F1 | {split} F1 of macro P,R (paper) | {split} accuracy | "
            "trainable params | train time (s) |\n|---|---|---|---|---|---|---|")
    lines = ([budget_line(b), ""] if b else []) + [head]
    for r in table:
        lines.append(f"| {r['method']}{' (tuned)' if r['tuned'] else ''} | {r['seeds']} | "
                     f"{r['macro_f1_mean']:.4f} ± {r['macro_f1_std']:.4f} | "
                     f"{r['f1_macro_pr_mean']:.4f} ± {r['f1_macro_pr_std']:.4f} | "
                     f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | "
                     f"{r['trainable_params']:,} ({r['trainable_pct']:.1f} %) | {r['train_seconds_mean']:.1f} |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _write_outputs(work: Path, rows, table, params: dict, split: str, tuned_for) -> None:
    write_csv(work / "compare.csv", rows)
    write_csv(work / "summary.csv", table)
    m, b = params["model"], budget(params)
    title = f"{m['backbone']}, K={m['num_centers']}, {split} split, mean ± std over seeds"
    metric_note = ("macro-F1: mean of per-class F1; paper F1: 2PR/(P+R) of macro precision P "
                   "and macro recall R.")
    (work / "summary.md").write_text(f"# Method comparison\n\n{title}\n\n{format_table(table, split, b)}"
                                     f"\n\n{metric_note}\n")
    write_json(work / "compare.json", {"backbone": m["backbone"], "split": split, "budget": b,
                                       "augment": params["train"]["augment"], "tuned_for": tuned_for,
                                       "metrics": metric_note, "runs": rows, "summary": table})
    _plot(work / "compare.png", table, title)


def _plot(path: Path, table: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=110)
    names = [r["method"] for r in table]
    means = [r["macro_f1_mean"] for r in table]
    errs = [r["macro_f1_std"] for r in table]
    colors = ["#d9822b" if n.startswith("cla") else "#5b7fa6" for n in names]
    bars = ax.bar(names, means, yerr=errs, capsize=4, color=colors)
    for bar, r in zip(bars, table):
        ax.text(bar.get_x() + bar.get_width() / 2, 0.02, f"{r['trainable_pct']:.0f}%\ntrainable",
                ha="center", va="bottom", fontsize=7, color="white")
    ax.set_ylim(0, 1)
    ax.set_ylabel("macro-F1 (mean of per-class F1)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
