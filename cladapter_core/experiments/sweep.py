"""A sensitivity study: one parameter at several values, several seeds, everything else fixed.

`cladapter sweep model.num_centers=5,10,20,30,50 --seeds 0 1 2` answers "how sensitive is
CLAdapter to K" where the tune figure cannot (its trials vary lr and epochs at the same
time, from one seed). Each (value, seed) cell trains one method (`cla-sft` by default) with
only that parameter changed, and is scored on the validation split by default (a study
that picks K must not look at test; `--split test` for a final report).

Outputs in `out_dir`: `cells/` (one JSON per finished cell: the study resumes from them,
rerunning only what is missing or was run with other params), `sweep.csv` (every cell),
`summary.csv` / `summary.md` / `sweep.json` (mean ± std per value) and `sweep.png` (the
metric against the value, with error bars). MLflow: one parent run for the study and one
child run per cell, with the table and the plot on the parent.
"""
from __future__ import annotations

import logging
import copy
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .compare import PLANS, SCORES, mean_std, method_params, score, train_method, write_csv
from ..errors import ParamsError
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


_MISSING = object()


def cell_key(params: dict, name: str, value, seed: int, method: str, split: str, data_hash: str) -> str:
    """What a finished cell must match to be reused: every param, the value, seed, data."""
    blob = json.dumps({"params": flatten(params), "name": name, "value": value, "seed": seed,
                       "method": method, "split": split, "data": data_hash}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sweep(params: dict, prepared_dir, out_dir, name: str, values: list, seeds=(0, 1, 2),
          method: str = "cla-sft", split: str = "val", track: bool = True, progress: bool = False) -> list[dict]:
    """Run (or resume) the study; write its outputs; return the summary rows."""
    if method not in PLANS:
        raise ParamsError(f"sweep: unknown method {method!r}; choose from {', '.join(PLANS)}")
    if not seeds:
        raise ParamsError("sweep: give at least one seed")
    _check(params, name, values)
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    data_hash = hashlib.sha256((prepared_dir / "manifest.csv").read_bytes()).hexdigest()[:16]
    study = {"param": name, "values": values, "seeds": list(seeds), "method": method, "split": split,
             "data_hash": data_hash}
    log = StudyRuns(params, study, prepared_dir, kind="sweep", run_name=f"sweep-{name}-{method}",
                    splits=("train", split), resume=True) if track else None
    cells = []
    for value in values:
        for seed in seeds:
            cells.append(_cell(params, prepared_dir, out_dir, study, value, int(seed), log, progress))
    table = summarise(cells, values)
    _write_outputs(out_dir, cells, table, study)
    if log:
        log.finish([out_dir / f for f in ("summary.md", "summary.csv", "sweep.csv", "sweep.json", "sweep.png")])
    logger.info("%s", format_table(table, study))
    logger.info("written to %s/ (summary.md, summary.csv, sweep.csv, sweep.json, sweep.png)", out_dir)
    return table


def _cell(params, prepared_dir: Path, out_dir: Path, study: dict, value, seed: int, log, progress) -> dict:
    name, method, split = study["param"], study["method"], study["split"]
    p = copy.deepcopy(params)
    set_dotted(p, name, value)
    key = cell_key(p, name, value, seed, method, split, study["data_hash"])
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
        run = train_method(p, prepared_dir, work, method, progress)
        m = score(run["model_dir"], prepared_dir, p, split)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cell = {"key": key, "value": value, "seed": seed, **{k: m.get(k, float("nan")) for k in SCORES},
            "loss": m["loss"], "train_seconds": round(run["seconds"], 2)}
    if log:
        log.cell(key, f"{name}={value} seed {seed}", {name: value, "seed": seed}, cell_scores(cell, split))
    atomic_write(path, json.dumps(cell, indent=2, sort_keys=True, default=str) + "\n")
    return cell


def _slug(value) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in str(value))


def summarise(cells: list[dict], values: list) -> list[dict]:
    table = []
    for value in values:
        mine = [c for c in cells if str(c["value"]) == str(value)]
        row = {"value": value, "seeds": len(mine)}
        for k in SCORES:
            row[f"{k}_mean"], row[f"{k}_std"] = mean_std([c[k] for c in mine])
        row["train_seconds_mean"] = mean_std([c["train_seconds"] for c in mine])[0]
        table.append(row)
    return table


METRIC_NOTE = ("macro-F1: mean of per-class F1; paper F1: 2PR/(P+R) of macro precision P and "
               "macro recall R; mean ± sample std over seeds.")


def format_table(table: list[dict], study: dict) -> str:
    sp = study["split"]
    lines = [f"{study['method']}: {study['param']} swept, everything else fixed; {sp} split; {METRIC_NOTE}", "",
             f"| {study['param']} | seeds | {sp} macro-F1 | {sp} F1 of macro P,R (paper) | {sp} accuracy | "
             "time (s) |", "|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['value']} | {r['seeds']} | {r['macro_f1_mean']:.4f} ± {r['macro_f1_std']:.4f} | "
                     f"{r['f1_macro_pr_mean']:.4f} ± {r['f1_macro_pr_std']:.4f} | "
                     f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | {r['train_seconds_mean']:.1f} |")
    return "\n".join(lines)


def _write_outputs(out_dir: Path, cells, table, study: dict) -> None:
    """The study's files, built in a temp folder and each renamed into place (cells/ stays)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in c.items() if k != "key"} for c in cells]
    tmp = Path(tempfile.mkdtemp(prefix=".sweep-outputs-", dir=out_dir))
    try:
        write_csv(tmp / "sweep.csv", rows)
        write_csv(tmp / "summary.csv", table)
        (tmp / "summary.md").write_text(f"# Sensitivity to {study['param']}\n\n{format_table(table, study)}\n")
        write_json(tmp / "sweep.json", {**study, "metrics": METRIC_NOTE, "cells": rows, "summary": table})
        plot(tmp / "sweep.png", table, study)
        for f in tmp.iterdir():
            os.chmod(f, default_mode(directory=False))
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plot(path: Path, table: list[dict], study: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    numeric = all(isinstance(r["value"], (int, float)) and not isinstance(r["value"], bool) for r in table)
    xs = [r["value"] for r in table] if numeric else list(range(len(table)))
    for k, label, color in (("macro_f1", "macro-F1 (mean of per-class F1)", "#d9822b"),
                            ("f1_macro_pr", "F1 of macro P, R (paper)", "#5b7fa6")):
        ax.errorbar(xs, [r[f"{k}_mean"] for r in table], yerr=[r[f"{k}_std"] for r in table],
                    marker="o", capsize=4, label=label, color=color)
    if not numeric:
        ax.set_xticks(xs, [str(r["value"]) for r in table])
    ax.set_xlabel(study["param"])
    ax.set_ylabel(f"{study['split']} score, mean ± std over {len(study['seeds'])} seeds")
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
