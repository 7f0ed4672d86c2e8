"""A sensitivity study: one parameter at several values, several seeds, everything else fixed.

`cladapter sweep model.num_centers=5,10,20,30,50 --seeds 0 1 2` answers "how sensitive is
CLAdapter to K" where the tune figure cannot (its trials vary lr and epochs at the same
time, from one seed). Each (value, seed) cell trains one method (`cla-sft` by default) with
only that parameter changed, and is scored on the validation split by default (a study
that picks K must not look at test; `--split test` for a final report).

Outputs in `out_dir`: `cells/` (one JSON per finished cell: the study resumes from them,
rerunning only what is missing or was run with other params), `sweep.csv` (every cell),
`summary.csv` / `summary.md` / `sweep.json` (mean ± std and a confidence interval per value,
every value against the best one paired on shared seeds with Holm's correction, and the
verdict lines the table ends with) and `sweep.png` (the metric against the value, with
confidence intervals). MLflow: one parent run for the study and one child run per cell,
with the table and the plot on the parent.

A parameter that the method's equal budget sets (`train.lr` while `compare.head_lr` is set,
`stage2.lr_factor` while `compare.backbone_lr` is, a one-stage method's epochs, the mode,
the seed, the cache's views) is refused: every value would train the same thing. Staged
methods keep the better stage on validation (`staged_selection`), as `compare` does.
"""
from __future__ import annotations

import logging
import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .compare import PLANS, PRIMARY, SCORES, ci_errors, method_params, rotated, score, train_method, write_csv
from ..errors import ParamsError
from ..evaluation import statistics as st
from ..outputs import atomic_write, default_mode, write_json
from ..params import flatten, get_dotted, set_dotted
from .study_runs import StudyRuns

logger = logging.getLogger(__name__)


def parse_grid(spec: str) -> tuple[str, list]:
    """'model.num_centers=5,10,20' -> ('model.num_centers', [5, 10, 20]) (values read as YAML)."""
    if "=" not in spec:
        raise ParamsError(f"sweep: expected section.key=v1,v2,..., got {spec!r}")
    name, raw = spec.split("=", 1)
    values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
    if len(values) < 2:
        raise ParamsError(f"sweep {name}: give at least two values, got {raw!r}")
    if len(set(map(str, values))) != len(values):
        raise ParamsError(f"sweep {name}: values repeat in {raw!r}")
    return name.strip(), values


def _check(params: dict, name: str, values: list) -> None:
    from ..params import validate_params
    if get_dotted(params, name, _MISSING) is _MISSING:
        raise ParamsError(f"sweep: {name} is not a parameter")
    for v in values:
        p = copy.deepcopy(params)
        set_dotted(p, name, v)
        problems = validate_params(p)
        if problems:
            raise ParamsError(f"sweep {name}={v!r}: " + "; ".join(problems))


# what to sweep instead when the equal budget of `compare` sets a parameter
_INSTEAD = {"train.lr": "compare.head_lr (or unset it: the head's lr then follows train.lr)",
            "stage2.lr_factor": "compare.backbone_lr (or unset it)", "seed": "--seeds",
            "train.mode": "--method", "stage1.epochs": "the total (a one-stage method trains stage1 + "
            "stage2 epochs)", "stage2.epochs": "the total (a one-stage method trains stage1 + stage2 epochs)"}


def check_not_overridden(params: dict, name: str, values: list, method: str) -> None:
    """Refuse a parameter the method's budget (compare.head_lr, compare.backbone_lr, the
    method's plan) overrides: the cells would not train with the values swept."""
    for v in values:
        p = copy.deepcopy(params)
        set_dotted(p, name, v)
        got = get_dotted(method_params(p, method, 0), name)
        same = got == v or (isinstance(v, (int, float)) and isinstance(got, (int, float))
                            and not isinstance(v, bool) and math.isclose(got, v, rel_tol=1e-9))
        if not same:
            raise ParamsError(f"sweep {name}={v!r}: {method} would train with {name}={got!r}, because "
                              f"the equal budget of `compare` sets it; sweep "
                              f"{_INSTEAD.get(name, 'another parameter')} instead")


_MISSING = object()


def cell_key(params: dict, name: str, value, seed: int, method: str, split: str, data_hash: str,
             staged_selection: bool = True) -> str:
    """What a finished cell must match to be reused: every param, the value, seed, data."""
    blob = json.dumps({"params": flatten(params), "name": name, "value": value, "seed": seed,
                       "method": method, "split": split, "data": data_hash,
                       "staged_selection": staged_selection}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sweep(params: dict, prepared_dir, out_dir, name: str, values: list, seeds=(0, 1, 2),
          method: str = "cla-sft", split: str = "val", track: bool = True, progress: bool = False,
          staged_selection: bool = True, confidence: float = st.CONFIDENCE) -> list[dict]:
    """Run (or resume) the study; write its outputs; return the summary rows."""
    if method not in PLANS:
        raise ParamsError(f"sweep: unknown method {method!r}; choose from {', '.join(PLANS)}")
    if not seeds:
        raise ParamsError("sweep: give at least one seed")
    if not 0 < confidence < 1:
        raise ParamsError(f"sweep: confidence must be between 0 and 1, got {confidence!r}")
    _check(params, name, values)
    check_not_overridden(params, name, values, method)
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    data_hash = hashlib.sha256((prepared_dir / "manifest.csv").read_bytes()).hexdigest()[:16]
    study = {"param": name, "values": values, "seeds": list(seeds), "method": method, "split": split,
             "data_hash": data_hash, "staged_selection": staged_selection}
    log = StudyRuns(params, study, prepared_dir, kind="sweep", run_name=f"sweep-{name}-{method}",
                    splits=("train", split), resume=True) if track else None
    cells = []
    for i, seed in enumerate(seeds):  # the values' order rotates with the seed
        for value in rotated(values, i):
            cells.append(_cell(params, prepared_dir, out_dir, study, value, int(seed), log, progress))
    table = summarise(cells, values, confidence)
    stats = comparisons(cells, table, confidence, name)
    _write_outputs(out_dir, cells, table, study, stats)
    if log:
        log.finish([out_dir / f for f in ("summary.md", "summary.csv", "sweep.csv", "sweep.json", "sweep.png")])
    logger.info("%s", format_table(table, study, stats))
    logger.info("written to %s/ (summary.md, summary.csv, sweep.csv, sweep.json, sweep.png)", out_dir)
    return table


def _cell(params, prepared_dir: Path, out_dir: Path, study: dict, value, seed: int, log, progress) -> dict:
    name, method, split = study["param"], study["method"], study["split"]
    p = copy.deepcopy(params)
    set_dotted(p, name, value)
    key = cell_key(p, name, value, seed, method, split, study["data_hash"], study["staged_selection"])
    path = out_dir / "cells" / f"{_slug(value)}-seed{seed}.json"
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("key") == key:
            logger.info("[sweep] %s=%s seed %s: done before, reused", name, value, seed)
            return done
    logger.info("[sweep] %s=%s seed %s: %s", name, value, seed, method)
    p = method_params(p, method, seed)
    work = Path(tempfile.mkdtemp(prefix=".sweep-cell-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        run = train_method(p, prepared_dir, work, method, progress, study["staged_selection"])
        m = score(run["model_dir"], prepared_dir, p, split)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cell = {"key": key, "value": value, "seed": seed, **{k: m.get(k, float("nan")) for k in SCORES},
            "loss": m["loss"], "scored_stage": run["stage"], "train_seconds": round(run["seconds"], 2)}
    if log:
        log.cell(key, f"{name}={value} seed {seed}", {name: value, "seed": seed}, cell_scores(cell, split))
    atomic_write(path, json.dumps(cell, indent=2, sort_keys=True, default=str) + "\n")
    return cell


def _slug(value) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in str(value))


def summarise(cells: list[dict], values: list, confidence: float = st.CONFIDENCE) -> list[dict]:
    table = []
    for value in values:
        mine = [c for c in cells if str(c["value"]) == str(value)]
        row = {"value": value, "seeds": len(mine)}
        for k in SCORES:
            d = st.describe([c[k] for c in mine], confidence)
            row.update({f"{k}_mean": d["mean"], f"{k}_std": d["std"], f"{k}_ci_low": d["ci_low"],
                        f"{k}_ci_high": d["ci_high"]})
        row["train_seconds_mean"] = st.describe([c["train_seconds"] for c in mine])["mean"]
        table.append(row)
    return table


def comparisons(cells: list[dict], table: list[dict], confidence: float, name: str) -> dict:
    """Every value against the best one (highest mean macro-F1), paired on shared seeds,
    Holm-adjusted, each with its verdict line."""
    best = max(table, key=lambda r: r[f"{PRIMARY}_mean"] if r[f"{PRIMARY}_mean"] == r[f"{PRIMARY}_mean"] else -1)
    label = {str(r["value"]): f"{name}={r['value']}" for r in table}
    per = {label[str(r["value"])]: {} for r in table}
    for c in cells:
        per[label[str(c["value"])]][int(c["seed"])] = c[PRIMARY]
    ref = label[str(best["value"])]
    pairs = st.compare_to_reference(per, ref, confidence)
    lines = [f"Paired on seeds, {PRIMARY}, each value against the best, {ref}:"] + [c["verdict"] for c in pairs]
    return {"metric": PRIMARY, "reference": best["value"], "confidence": confidence, "pairs": pairs,
            "verdict": "\n".join(lines)}


METRIC_NOTE = ("macro-F1: mean of per-class F1; paper F1: 2PR/(P+R) of macro precision P and "
               "macro recall R; cells: mean ± sample std [t-based confidence interval] over seeds, "
               "one seed: the value alone.")


def format_table(table: list[dict], study: dict, stats: dict | None = None) -> str:
    from .compare import _cell
    sp = study["split"]
    lines = [f"{study['method']}: {study['param']} swept, everything else fixed; {sp} split; {METRIC_NOTE}", "",
             f"| {study['param']} | seeds | {sp} macro-F1 | {sp} F1 of macro P,R (paper) | {sp} accuracy | "
             "time (s) |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['value']} | {r['seeds']} | {_cell(r, 'macro_f1')} | {_cell(r, 'f1_macro_pr')} | "
                     f"{_cell(r, 'accuracy')} | {r['train_seconds_mean']:.1f} |")
    if stats:
        lines += ["", *stats["verdict"].splitlines()]
    return "\n".join(lines)


def _write_outputs(out_dir: Path, cells, table, study: dict, stats: dict) -> None:
    """The study's files, built in a temp folder and each renamed into place (cells/ stays)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in c.items() if k != "key"} for c in cells]
    tmp = Path(tempfile.mkdtemp(prefix=".sweep-outputs-", dir=out_dir))
    try:
        write_csv(tmp / "sweep.csv", rows)
        write_csv(tmp / "summary.csv", table)
        (tmp / "summary.md").write_text(f"# Sensitivity to {study['param']}\n\n{format_table(table, study, stats)}\n")
        write_json(tmp / "sweep.json", {**study, "metrics": METRIC_NOTE, "cells": rows, "summary": table,
                                        "comparisons": stats, "verdict": stats["verdict"]})
        plot(tmp / "sweep.png", table, study, stats["confidence"])
        for f in tmp.iterdir():
            os.chmod(f, default_mode(directory=False))
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plot(path: Path, table: list[dict], study: dict, confidence: float = st.CONFIDENCE) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    numeric = all(isinstance(r["value"], (int, float)) and not isinstance(r["value"], bool) for r in table)
    xs = [r["value"] for r in table] if numeric else list(range(len(table)))
    for k, label, color in (("macro_f1", "macro-F1 (mean of per-class F1)", "#d9822b"),
                            ("f1_macro_pr", "F1 of macro P, R (paper)", "#5b7fa6")):
        ax.errorbar(xs, [r[f"{k}_mean"] for r in table], yerr=ci_errors(table, k),
                    marker="o", capsize=4, label=label, color=color)
    if not numeric:
        ax.set_xticks(xs, [str(r["value"]) for r in table])
    ax.set_xlabel(study["param"])
    ax.set_ylabel(f"{study['split']} score, mean and {100 * confidence:g} % CI over {len(study['seeds'])} seeds")
    ax.set_title(f"{study['method']}: sensitivity to {study['param']} (everything else fixed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cell_scores(cell: dict, split: str) -> dict:
    """A cell's scores as its MLflow run's metrics (`val_macro_f1`, ..., `loss`, `train_seconds`)."""
    return {**{f"{split}_{k}": cell.get(k) for k in SCORES}, "loss": cell.get("loss"),
            "train_seconds": cell.get("train_seconds")}
