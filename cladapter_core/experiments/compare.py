"""Baselines against CLAdapter on one dataset and backbone, over several seeds, on equal terms.

Methods: `linear` (linear probe on the backbone's own pooling), `linear-mean` (linear probe
on the mean of the tokens, CLAdapter's pooling), `full` (full fine-tuning), `lp-ft`,
`cla-stage1` (CLAdapter, backbone frozen) and `cla-sft` (CLAdapter, Staged Fine-Tuning).

What makes the comparison fair (and is written into compare.json and the table's header):
- Same data, augmentation policy and seeds: every method trains on the same prepared
  split with the same `train.augment`, fresh draws each epoch (a stage-1 feature cache, if
  on, holds as many views as the budget has epochs, which gives the same images as no
  cache: epoch e reads view e, the image the uncached trainer would draw).
- Same budget: every method trains `stage1.epochs + stage2.epochs` epochs in all; one-stage
  frozen methods run all of them, staged methods split them as the params say.
- Learning rates per role, explicit: the head's (`compare.head_lr`, default `train.lr`) for
  every frozen-backbone stage and `full`'s head, the backbone's (`compare.backbone_lr`,
  default `train.lr * stage2.lr_factor`) for full fine-tuning and every stage 2.
- Equal tuning effort: with `compare.lr_grid` = n > 1 every method, every seed, trains at n
  learning-rate factors log-spaced over [1/lr_span, lr_span] (both role lrs scaled together)
  and the one best on validation is scored; the same n for every method, so no ranking rests
  on which method suits one fixed lr. n = 1 (the default): the role lrs alone, no choice.
- What does not depend on the lr is computed once per seed: the frozen backbone's features
  (one cache per stored output: the tokens for `cla-stage1` and `cla-sft`'s stage 1, the
  backbone's pooling for `linear` and `lp-ft`'s stage 1, the tokens' mean for
  `linear-mean`), read by every grid point of every method that needs them.
- Tuned values (best params of `cladapter tune`) apply to every method that has the
  parameter, and the epochs of every row come from them: all rows train the same epochs.
- Time is the wall clock of every stage of a method, and the cache it reads counted as if
  it had built it alone: whoever built a cache, each method's time carries its build time
  times the share of its views the method reads (one per frozen epoch), and a build it did
  for others is not counted twice. The order of the methods rotates with the seed, so no
  method always runs first (or last) on a busy machine.
- Staged selection (default on): a staged method (`lp-ft`, `cla-sft`) keeps its stage-1
  model when stage 1 scored better on validation than stage 2, and says which stage won.

What the numbers support (evaluation/statistics.py): mean ± std and a t-based confidence
interval over seeds per method; every method against the best baseline, paired on shared
seeds (paired t, Holm over the pairs), optionally with a bootstrap over the test images;
the table ends with one verdict line per pair that claims no more than its interval.
"""
from __future__ import annotations

import logging
import copy
import csv
import json
import shutil
import time
from pathlib import Path

from ..errors import ParamsError
from ..evaluation import statistics as st
from ..outputs import atomic_dir, write_json
from ..params import set_dotted

logger = logging.getLogger(__name__)

METHODS = ("linear", "linear-mean", "full", "lp-ft", "cla-stage1", "cla-sft")
# method -> list of (mode, stage); the last one is the model that is scored
PLANS = {"linear": [("linear", 1)], "linear-mean": [("linear-mean", 1)], "full": [("full", 1)],
         "lp-ft": [("lp-ft", 1), ("lp-ft", 2)], "cla-stage1": [("cla", 1)],
         "cla-sft": [("cla", 1), ("cla", 2)]}
SCORES = ("macro_f1", "f1_macro_pr", "accuracy", "roc_auc")
PRIMARY = "macro_f1"  # the score the paired comparisons and verdicts are about
BASELINES = ("linear", "linear-mean", "full", "lp-ft")


def budget(params: dict) -> dict:
    """The equal budget every method gets: epochs in all and the two learning rates."""
    c = params.get("compare") or {}
    lr = params["train"]["lr"]
    head = c.get("head_lr") or lr
    backbone = c.get("backbone_lr") or lr * params["stage2"]["lr_factor"]
    return {"epochs": params["stage1"]["epochs"] + params["stage2"]["epochs"],
            "head_lr": head, "backbone_lr": backbone, "lr_factors": lr_factors(params)}


def lr_factors(params: dict) -> list[float]:
    """The learning-rate factors every method tries: `compare.lr_grid` of them, log-spaced
    over [1/lr_span, lr_span] ([1.0] for a grid of one)."""
    c = params.get("compare") or {}
    n, span = int(c.get("lr_grid") or 1), float(c.get("lr_span") or 10)
    if n == 1:
        return [1.0]
    return [float(f"{span ** (2 * i / (n - 1) - 1):.6g}") for i in range(n)]


def method_params(params: dict, method: str, seed: int, tuned: dict | None = None,
                  lr_factor: float = 1.0) -> dict:
    """The params one method trains with: the tuned values (for every method: each uses
    those of its parameters it has), the shared budget computed after them, its seed, and
    both role lrs times `lr_factor` (a point of the lr grid)."""
    if method not in PLANS:
        raise ParamsError(f"compare: unknown method {method!r}; choose from {', '.join(METHODS)}")
    p = copy.deepcopy(params)
    for name, value in (tuned or {}).items():
        set_dotted(p, name, value)
    b = budget(p)
    mode = PLANS[method][0][0]
    p["seed"] = int(seed)
    p["train"]["mode"] = mode
    p["train"]["lr"] = b["head_lr"] * lr_factor
    p["stage2"]["lr_factor"] = b["backbone_lr"] / b["head_lr"]
    if len(PLANS[method]) == 1 and mode != "full":  # one frozen stage: all the epochs
        p["stage1"]["epochs"], p["stage2"]["epochs"] = b["epochs"], 0
    cache = p["train"]["cache"]
    if cache.get("views"):  # a view per epoch of the budget: one cache serves every frozen stage
        cache["views"] = max(int(b["epochs"]), 1)
        cache["storage"] = "memory"
    elif cache.get("views") is not None:  # 0: no augmentation, one plain view
        cache["storage"] = "memory"
    return p


def train_method(p: dict, prepared_dir: Path, work: Path, method: str, progress: bool = False,
                 staged_selection: bool = False, fresh_cache: bool = True) -> dict:
    """Every stage of `method` from scratch; returns the scored model dir, summary, time,
    the stage whose model is scored (`staged_selection`: the better stage on validation)
    and its validation key (`val_key`, as `best_stage` ranks). `fresh_cache`: drop the
    in-process feature cache first. Time (`seconds`): the wall clock less the cache builds
    done here, plus the build cost of the views its stages read (`merge_reads`): what
    the method costs alone, whichever method or grid point built the cache it reads."""
    from ..training import feature_cache as cache
    from ..training import train
    if fresh_cache:
        cache.clear_memory()
    t0, init, runs = time.perf_counter(), None, []
    for mode, stage in PLANS[method]:
        model_dir = work / f"{method}-stage{stage}"
        summary = train(p, prepared_dir, model_dir, stage=stage, mode=mode, init_from=init,
                        resume=False, progress=progress)
        runs.append((stage, model_dir, summary))
        init = model_dir
    won = best_stage(runs) if staged_selection and len(runs) > 1 else runs[-1]
    infos = [summary.get("cache") or {} for _, _, summary in runs]
    reads = merge_reads(info.get("reads") or {} for info in infos)
    built = sum(float(info.get("built_seconds", 0.0)) for info in infos)
    return {"model_dir": won[1], "summary": runs[-1][2], "stage": won[0], "val_key": val_key(*won),
            "seconds": time.perf_counter() - t0 - built + sum(reads.values()), "reads": reads}


def merge_reads(reads) -> dict[str, float]:
    """Cache -> the build cost of the views read from it (the most any of `reads`, dicts of
    the same, read): each cache counted once, however many stages or grid points read it."""
    merged: dict[str, float] = {}
    for one in reads:
        for key, cost in one.items():
            merged[key] = max(merged.get(key, 0.0), float(cost))
    return merged


def best_stage(runs: list[tuple]) -> tuple:
    """The (stage, model_dir, summary) whose selected epoch ranks best on validation, by the
    trainer's own key (a defined select metric first, else -val_loss); a tie keeps the last
    stage. Without validation records there is no evidence: the last stage."""
    keys = [val_key(*run) for run in runs]
    if any(k is None for k in keys):
        return runs[-1]
    best = max(range(len(runs)), key=lambda i: (keys[i], i))
    return runs[best]


def val_key(stage: int, model_dir, summary: dict) -> tuple | None:
    """How the selected epoch of a stage ranks on validation (the trainer's own key: a
    defined select metric first, else -val_loss); None without validation records."""
    history = json.loads((Path(model_dir) / "history.json").read_text())
    rec = next((r for r in history if r.get("stage") == stage and r.get("epoch") == summary["best_epoch"]), None)
    if rec is None or "val_loss" not in rec:
        return None
    value = summary["best_value"] if summary["selected_by"] == summary["select_metric"] else None
    return (value is not None, value if value is not None else -rec["val_loss"])


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
    return {**classification_metrics(labels, probs, model.num_classes), "loss": loss,
            "_labels": [int(v) for v in labels], "_preds": [int(v) for v in probs.argmax(axis=1)],
            "_classes": int(model.num_classes)}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation of the defined values (NaN if none; std None for
    one value: one seed has no spread to show)."""
    d = st.describe(values)
    return d["mean"], d["std"]


def compare(params: dict, prepared_dir, out_dir, seeds=(0, 1, 2), methods=None,
            split: str = "test", progress: bool = False, tuned: dict | None = None,
            track: bool = False, staged_selection: bool = True,
            bootstrap: int = 0, confidence: float = st.CONFIDENCE) -> list[dict]:
    """Train every method for every seed on equal terms; write compare.csv (one row per
    method and seed), summary.csv / summary.md / compare.json (mean, std and confidence
    interval per method, the paired comparisons, the verdict) and compare.png into out_dir
    atomically, print the table and return the summary rows.
    `track`: one MLflow parent run with the table and plot, a child run per method and seed.
    `bootstrap`: resamples of the test images for each comparison (0: seeds only)."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in PLANS]
    if unknown:
        raise ParamsError(f"compare: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not seeds:
        raise ParamsError("compare: give at least one seed")
    if not 0 < confidence < 1:
        raise ParamsError(f"compare: confidence must be between 0 and 1, got {confidence!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ParamsError(f"compare: bootstrap must be a number of resamples >= 0, got {bootstrap!r}")
    from ..training import feature_cache
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    log = _tracker(params, prepared_dir, methods, seeds, split, sorted(tuned or {})) if track else None
    opts = {"split": split, "progress": progress, "tuned": tuned, "staged_selection": staged_selection}
    try:
        with atomic_dir(out_dir) as work:
            rows = []
            for i, seed in enumerate(seeds):
                feature_cache.clear_memory()  # a seed's caches serve its methods, not the next seed's
                for method in rotated(methods, i):
                    logger.info("[compare] seed %s: %s", seed, method)
                    rows.append(_run_one(params, prepared_dir, work / f"seed{seed}", method, int(seed), opts))
                    if log:
                        _log_row(log, rows[-1], split)
                shutil.rmtree(work / f"seed{seed}", ignore_errors=True)
            table = summarise(rows, methods, confidence)
            stats = comparisons(rows, table, confidence, bootstrap)
            _write_outputs(work, rows, table, stats, params, split, sorted(tuned or {}))
    except BaseException:
        if log:
            log.fail()
        raise
    if log:
        log.finish([out_dir / f for f in ("summary.md", "summary.csv", "compare.csv", "compare.json", "compare.png")])
    logger.info("%s", format_table(table, split, budget(params), stats))
    logger.info("written to %s/ (summary.md, summary.csv, compare.csv, compare.json, compare.png)", out_dir)
    return table


def rotated(items: list, i: int) -> list:
    """`items` started at position i (mod len): the run order of the i-th seed."""
    k = i % len(items)
    return list(items[k:]) + list(items[:k])


def _tracker(params: dict, prepared_dir: Path, methods, seeds, split: str, tuned: list[str]):
    from .study_runs import StudyRuns
    study = {"methods": methods, "seeds": [int(s) for s in seeds], "split": split, "tuned": tuned,
             **{f"budget.{k}": v for k, v in budget(params).items()}}
    # scored on `split` (test for the final report); trained on train with val for selection
    return StudyRuns(params, study, prepared_dir, kind="compare", run_name=f"compare-{split}",
                     splits=tuple(dict.fromkeys(("train", "val", split))), resume=False)


def _log_row(log, row: dict, split: str) -> None:
    name = f"{row['method']} seed {row['seed']}"
    log.cell(name, name, {k: row[k] for k in ("method", "seed", "head_lr", "backbone_lr", "lr_factor", "epochs",
                                              "tuned", "scored_stage")},
             {**{f"{split}_{k}": row[k] for k in SCORES}, "train_seconds": row["train_seconds"],
              "trainable_params": row["trainable_params"]})


def _run_one(params, prepared_dir: Path, work: Path, method: str, seed: int, opts: dict) -> dict:
    """One method, one seed: every point of the lr grid trained (the seed's feature caches
    shared by them), the one best on validation scored on the split. Its time counts them all."""
    from ..training import stage_plan
    factors, best, seconds, vals, reads = lr_factors(params), None, 0.0, [], []
    for i, factor in enumerate(factors):
        p = method_params(params, method, seed, opts["tuned"], factor)
        run = train_method(p, prepared_dir, work / f"lr{i}", method, opts["progress"], opts["staged_selection"],
                           fresh_cache=False)
        seconds += run["seconds"] - sum(run["reads"].values())  # each cache counted once, below
        reads.append(run["reads"])
        key = run["val_key"] or (False, float("-inf"))
        vals.append(key[1] if key[0] else None)  # the validation select metric of this point
        if best is None or key > best[0]:
            if best is not None:
                shutil.rmtree(best[2], ignore_errors=True)
            best = (key, factor, work / f"lr{i}", p, run)
        else:
            shutil.rmtree(work / f"lr{i}", ignore_errors=True)
    seconds += sum(merge_reads(reads).values())
    _, factor, _, p, run = best
    m = score(run["model_dir"], prepared_dir, p, opts["split"])
    rep = run["summary"]["param_report"]
    return {"method": method, "seed": seed, **{k: m.get(k, float("nan")) for k in SCORES},
            "trainable_params": rep["trainable"], "total_params": rep["total"],
            "epochs": sum(stage_plan(p, stage, mode)["epochs"] for mode, stage in PLANS[method]),
            "head_lr": p["train"]["lr"], "backbone_lr": p["train"]["lr"] * p["stage2"]["lr_factor"],
            "lr_factor": factor, "lr_grid": factors, "lr_grid_val": vals, "tuned": bool(opts["tuned"]),
            "scored_stage": run["stage"], "train_seconds": round(seconds, 2),
            "_labels": m["_labels"], "_preds": m["_preds"], "_classes": m["_classes"]}


def summarise(rows: list[dict], methods: list[str], confidence: float = st.CONFIDENCE) -> list[dict]:
    table = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry = {"method": method, "seeds": len(mine)}
        for k in SCORES:
            d = st.describe([r[k] for r in mine], confidence)
            entry.update({f"{k}_mean": d["mean"], f"{k}_std": d["std"], f"{k}_ci_low": d["ci_low"],
                          f"{k}_ci_high": d["ci_high"]})
        stages = [r["scored_stage"] for r in mine]
        picks = [f"{r.get('lr_factor', 1.0):g}" for r in mine]
        entry.update({"trainable_params": mine[0]["trainable_params"],
                      "trainable_pct": 100.0 * mine[0]["trainable_params"] / mine[0]["total_params"],
                      "epochs": mine[0]["epochs"], "tuned": mine[0]["tuned"],
                      "stage_won": {str(s): stages.count(s) for s in sorted(set(stages))},
                      "lr_picks": {f: picks.count(f) for f in sorted(set(picks), key=float)},
                      "train_seconds_mean": st.describe([r["train_seconds"] for r in mine])["mean"]})
        table.append(entry)
    return table


def comparisons(rows: list[dict], table: list[dict], confidence: float = st.CONFIDENCE,
                bootstrap: int = 0) -> dict:
    """Every method against the reference (the best baseline by mean macro-F1, or the best
    method when no baseline ran), paired on shared seeds, Holm-adjusted; with `bootstrap`
    resamples, also the interval a different test set would give."""
    ranked = sorted(table, key=lambda r: r[f"{PRIMARY}_mean"], reverse=True)
    base = [r for r in ranked if r["method"] in BASELINES]
    ref = (base or ranked)[0]["method"]
    per = {r["method"]: {} for r in table}
    for r in rows:
        per[r["method"]][r["seed"]] = r[PRIMARY]
    pairs = st.compare_to_reference(per, ref, confidence)
    if bootstrap:
        preds = {r["method"]: {} for r in table}
        for r in rows:
            preds[r["method"]][r["seed"]] = r["_preds"]
        for c in pairs:
            c["bootstrap"] = st.bootstrap_over_images(rows[0]["_labels"], preds[c["name"]], preds[ref],
                                                      rows[0]["_classes"], PRIMARY, confidence, bootstrap)
            b = c["bootstrap"]
            c["verdict"] += (f"; over {b['images']} test images (bootstrap): {100 * confidence:g} % CI "
                             f"[{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]")
    if len(table) == 1:
        lines = [f"{ref}: one method, nothing to compare"]
    else:
        lines = [f"Paired on seeds, {PRIMARY}, each against {ref} ("
                 + ("the best baseline" if base else "the best method") + "):"] + [c["verdict"] for c in pairs]
    return {"metric": PRIMARY, "reference": ref, "confidence": confidence, "pairs": pairs,
            "verdict": "\n".join(lines)}


def budget_line(b: dict) -> str:
    factors = b.get("lr_factors") or [1.0]
    grid = ("each method's lrs chosen on validation, per seed, from these times "
            f"{', '.join(f'{f:g}' for f in factors)} (the same {len(factors)} points for every method)"
            if len(factors) > 1 else "one lr per role for every method (compare.lr_grid: 1, no choice)")
    return (f"Equal budget: {b['epochs']} epochs per method, same data, augmentation and seeds; "
            f"head lr {b['head_lr']:g} (frozen backbone, full's head), backbone lr {b['backbone_lr']:g} "
            f"(full fine-tuning and every stage 2); {grid}; time counts every stage, every grid point "
            "and the cache views a method reads, as if it had built them alone.")


def format_table(table: list[dict], split: str = "test", b: dict | None = None, stats: dict | None = None) -> str:
    pct = f"{100 * stats['confidence']:g} %" if stats else "95 %"
    head = (f"| method | seeds | {split} macro-F1 | {split} F1 of macro P,R (paper) | {split} accuracy | "
            "scored stage | lr x (picked) | trainable params | train time (s) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = ([budget_line(b), ""] if b else []) + [f"Cells: mean ± std [{pct} CI] over seeds; one seed: the value alone.",
                                                    "", head]
    for r in table:
        won = ", ".join(f"{s}: {n}" for s, n in r["stage_won"].items())
        picks = ", ".join(f"{f}: {n}" for f, n in (r.get("lr_picks") or {"1": r["seeds"]}).items())
        lines.append(f"| {r['method']}{' (tuned)' if r['tuned'] else ''} | {r['seeds']} | "
                     f"{_cell(r, 'macro_f1')} | {_cell(r, 'f1_macro_pr')} | {_cell(r, 'accuracy')} | {won} | {picks} | "
                     f"{r['trainable_params']:,} ({r['trainable_pct']:.1f} %) | {r['train_seconds_mean']:.1f} |")
    if stats:
        lines += ["", *stats["verdict"].splitlines()]
    return "\n".join(lines)


def _cell(r: dict, k: str) -> str:
    return st.format_mean({"n": r.get("seeds", 1), "mean": r[f"{k}_mean"], "std": r[f"{k}_std"],
                           "ci_low": r[f"{k}_ci_low"], "ci_high": r[f"{k}_ci_high"]})


def write_csv(path: Path, rows: list[dict]) -> None:
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _write_outputs(work: Path, rows, table, stats: dict, params: dict, split: str, tuned: list[str]) -> None:
    write_csv(work / "compare.csv", rows)
    write_csv(work / "summary.csv", table)
    m, b = params["model"], budget(params)
    title = f"{m['backbone']}, K={m['num_centers']}, {split} split, over {table[0]['seeds']} seed(s)"
    metric_note = ("macro-F1: mean of per-class F1; paper F1: 2PR/(P+R) of macro precision P "
                   "and macro recall R.")
    (work / "summary.md").write_text(f"# Method comparison\n\n{title}\n\n{format_table(table, split, b, stats)}"
                                     f"\n\n{metric_note}\n")
    write_json(work / "compare.json", {"backbone": m["backbone"], "split": split, "budget": b,
                                       "augment": params["train"]["augment"], "tuned": tuned,
                                       "metrics": metric_note,
                                       "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                                       "summary": table, "comparisons": stats, "verdict": stats["verdict"]})
    _plot(work / "compare.png", table, title, stats["confidence"])


def ci_errors(table: list[dict], k: str) -> list[list[float]]:
    """Asymmetric error bars from each row's confidence interval (0 where there is none)."""
    lo = [r[f"{k}_mean"] - r[f"{k}_ci_low"] if r[f"{k}_ci_low"] is not None else 0.0 for r in table]
    hi = [r[f"{k}_ci_high"] - r[f"{k}_mean"] if r[f"{k}_ci_high"] is not None else 0.0 for r in table]
    return [lo, hi]


def _plot(path: Path, table: list[dict], title: str, confidence: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=110)
    names = [r["method"] for r in table]
    means = [r["macro_f1_mean"] for r in table]
    colors = ["#d9822b" if n.startswith("cla") else "#5b7fa6" for n in names]
    bars = ax.bar(names, means, yerr=ci_errors(table, "macro_f1"), capsize=4, color=colors)
    for bar, r in zip(bars, table):
        ax.text(bar.get_x() + bar.get_width() / 2, 0.02, f"{r['trainable_pct']:.0f}%\ntrainable",
                ha="center", va="bottom", fontsize=7, color="white")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"macro-F1, mean and {100 * confidence:g} % CI")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
