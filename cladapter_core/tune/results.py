"""A study's results, written once its workers are done: the best-params file (the best
trial's values, which training applies with ``tune.use_best``: reading it is
`params.load_params`' business), ``summary.json``, ``trials.csv`` and the pictures
(optimisation history, intermediate values, parameter importances, K against
macro-F1), each written atomically and logged on the session's study run."""
from __future__ import annotations

import logging
import csv
import io
import json
import warnings
from pathlib import Path

import yaml

from ..outputs import atomic_write, csv_cell
from ..params import nest
from ..errors import TuneError
from .runs import end_study_run, log_results, study_run
from ..settings import tracking_on
from .space import format_value
from .storage import load_study, normalize_storage, redact
from .trial import OBJECTIVE, outcome, rerun

log = logging.getLogger(__name__)

BEST_FILE = "best_params.yaml"
TABLE_FIELDS = ("number", "state", "value", "last_reported", "epochs", "worker", "seconds")


def write_best_params(path, values: dict, header: str = "") -> Path:
    """Write the nested overrides of `values` ({dotted: value}) as YAML, atomically."""
    path = Path(path)
    text = "".join(f"# {line}\n" for line in header.splitlines())
    body = yaml.safe_dump(nest(values), sort_keys=True, default_flow_style=False) if values else "{}\n"
    atomic_write(path, text + body)
    return path


def study_table(study) -> list[dict]:
    """One row per trial: number, state, value, last reported value, epochs, worker,
    seconds and ``param:<name>`` for each searched value."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"number": t.number, "state": outcome(t), "value": t.value,
                     "last_reported": t.intermediate_values.get(last) if last is not None else None,
                     "epochs": int(t.user_attrs.get("epochs", 0)), "worker": t.user_attrs.get("worker"),
                     "seconds": round(t.duration.total_seconds(), 3) if t.duration else None,
                     **{f"param:{k}": v for k, v in t.params.items()}})
    return rows


def _table_csv(rows: list[dict]) -> str:
    present = {k for r in rows for k in r}
    fields = [f for f in TABLE_FIELDS if f in present] + sorted(f for f in present if f.startswith("param:"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)  # no cell runs as a formula
    return buf.getvalue()


# -- pictures ----------------------------------------------------------------------------------
def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def _k_points(study, state: str, base_k) -> tuple[list, list]:
    """K and value of the trials in `state`: a pruned trial at the last value it reported."""
    xs, ys = [], []
    for t in study.get_trials(deepcopy=False):
        if t.state.name != state:
            continue
        y = t.value if state == "COMPLETE" else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        if y is not None:
            xs.append(t.params.get("model.num_centers", base_k))
            ys.append(y)
    return xs, ys


def plot_k_vs_f1(study, params: dict, path: Path) -> Path:
    """Validation macro-F1 against K: completed trials filled, pruned ones hollow at the
    last value they reported."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    base_k = params["model"]["num_centers"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for state, face, label in (("COMPLETE", "tab:blue", "completed"), ("PRUNED", "none", "pruned")):
        xs, ys = _k_points(study, state, base_k)
        if xs:
            ax.scatter(xs, ys, marker="o", facecolors=face, edgecolors="tab:blue", label=label)
    try:
        best = study.best_trial
        ax.scatter([best.params.get("model.num_centers", base_k)], [best.value], marker="*", s=220,
                   color="tab:red", label=f"best (trial {best.number})", zorder=3)
    except ValueError:
        pass
    ax.set_xlabel("K (model.num_centers)")
    ax.set_ylabel("validation macro-F1")
    # Trials vary lr and stage lengths with K, from one seed: this is where the search went,
    # not how sensitive the method is to K (that is `cladapter sweep model.num_centers=...`).
    ax.set_title(f"study {study.study_name}: K of each trial (other parameters vary too;\n"
                 "for sensitivity to K run `cladapter sweep`)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def write_figures(study, params: dict, out_dir: Path) -> dict:
    """optimization_history.png, intermediate_values.png, param_importances.png and
    k_vs_f1.png in out_dir; returns {name: path or "skipped: reason"}."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    made: dict[str, str] = {}
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    varied = {k for t in complete for k in t.params
              if len({repr(u.params.get(k)) for u in complete}) > 1}
    plots = {"optimization_history": lambda: ovm.plot_optimization_history(study),
             "intermediate_values": lambda: ovm.plot_intermediate_values(study),
             "param_importances": lambda: ovm.plot_param_importances(study)}
    for name, fn in plots.items():
        if name == "param_importances" and (len(complete) < 2 or not varied):
            made[name] = (f"skipped: needs at least 2 completed trials with a varied parameter "
                          f"({len(complete)} completed, varied: {sorted(varied) or 'none'})")
            continue
        try:
            # Optuna's plots switch matplotlib to its own style: keep that to this block.
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore")
                ax = fn()
                fig = (ax if hasattr(ax, "savefig") else (ax.flat[0] if hasattr(ax, "flat") else ax).figure)
                _save_figure(fig, out_dir / f"{name}.png")
            plt.close(fig)
            made[name] = str(out_dir / f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError) as e:
            made[name] = f"skipped: {type(e).__name__}: {str(e)[:200]}"
            plt.close("all")
    made["k_vs_f1"] = str(plot_k_vs_f1(study, params, out_dir / "k_vs_f1.png"))
    return made


# -- the study's results -------------------------------------------------------------------------
def ranked(study) -> list:
    """The completed trials, failed ones left out, best first."""
    done = [t for t in study.get_trials(deepcopy=False) if outcome(t) == "COMPLETE" and t.value is not None]
    return sorted(done, key=lambda t: (-t.value, t.number))


def rerun_top(study, params: dict, prepared_dir) -> list[dict]:
    """The best ``tune.rerun_top`` trials trained again on ``tune.rerun_seeds`` other
    seeds: one search run per configuration partly picks noise (the winner's value is
    biased upward), the mean of fresh seeds does not. Best mean first."""
    import numpy as np
    t = params["tune"]
    seeds = [params["seed"] + i for i in range(1, t["rerun_seeds"] + 1)]
    out = []
    for trial in ranked(study)[:t["rerun_top"]]:
        log.info("re-running trial %d on seeds %s", trial.number, seeds)
        values = rerun(params, prepared_dir, dict(trial.params), seeds)
        out.append({"trial": trial.number, "search_value": trial.value, "seeds": seeds, "values": values,
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else None})
    return sorted(out, key=lambda r: (-r["mean"], -r["search_value"]))


def _rerun_lines(reruns: list[dict]) -> str:
    return "".join(f"\n  trial {r['trial']}: search {r['search_value']:.4f}; seeds {r['seeds']}: mean "
                   f"{r['mean']:.4f}" + (f" +- {r['std']:.4f} (std)" if r["std"] is not None else "")
                   for r in reruns)


def _write_results(study, params: dict, out_dir: Path, rows: list[dict], count: dict, storage: str,
                   reruns) -> dict:
    """best_params.yaml, the pictures, summary.json and trials.csv; returns the summary.
    `reruns`: what `rerun_top` found (the best mean wins), or why there are none."""
    t = params["tune"]
    top = ranked(study)
    rerun_ok = isinstance(reruns, list) and bool(reruns)
    chosen = next(tr for tr in top if tr.number == reruns[0]["trial"]) if rerun_ok else top[0]
    how = ("the best mean of the re-runs:" + _rerun_lines(reruns)) if rerun_ok else \
        "the best search value (no re-runs)"
    header = (f"Best values of Optuna study '{study.study_name}' (trial {chosen.number} of {len(rows)}, "
              f"validation macro-F1 {chosen.value:.4f} in the search), written by `cladapter tune`, "
              f"chosen by {how}\nTraining uses them when tune.use_best is true: "
              f"defaults < params.yaml < this file < -S flags.")
    best_path = write_best_params(out_dir / BEST_FILE, dict(chosen.params), header)
    figures = write_figures(study, params, out_dir)
    summary = {"study_name": study.study_name, "storage": redact(normalize_storage(storage)),
               "best_value": chosen.value, "best_trial": chosen.number, "best_params": dict(chosen.params),
               "reruns": reruns,
               "best_params_file": str(best_path), "objective": OBJECTIVE,
               "n_trials": len(rows), "complete": count["COMPLETE"], "pruned": count["PRUNED"],
               "failed": count["FAIL"], "running": count["RUNNING"],
               "epochs": sum(r["epochs"] for r in rows), "pruner": t["pruner"],
               "space": t["space"], "figures": figures}
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write(out_dir / "trials.csv", _table_csv(rows))
    return summary


def finish_study(params: dict, out_dir, study_name: str | None = None, storage: str | None = None, *,
                 track: bool = True, study_run_id: str | None = None, prepared_dir=None) -> dict:
    """Write the study's results into `out_dir` (each file atomically):
    ``best_params.yaml`` (the best trial's values, the file training reads with
    ``tune.use_best``), ``summary.json``, ``trials.csv`` and the pictures; log them on the
    session's study run and close it. With `prepared_dir`, the best ``tune.rerun_top``
    trials are first trained again on ``tune.rerun_seeds`` seeds and the best mean wins.
    Returns the summary. TuneError when no trial completed."""
    name = study_name or params["tune"]["study_name"]
    storage = storage or params["tune"]["storage"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = load_study(name, storage)
    rows = study_table(study)
    count = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    run_id = study_run_id
    if run_id is None and tracking_on(track):
        run_id = study_run(params, name, storage)
    if not count["COMPLETE"]:
        if run_id is not None:
            end_study_run(run_id, "FAILED", close=True)
        raise TuneError(f"study {name!r} on {redact(storage)}: no trial completed "
                        f"({count['PRUNED']} pruned, {count['FAIL']} failed, of {len(rows)}); "
                        "widen tune.space, lower tune.pruner_startup_trials' strictness or run more trials")
    if not params["tune"]["rerun_top"]:
        reruns = "off (tune.rerun_top: 0)"
    elif prepared_dir is None:
        reruns = "skipped: this step has no prepared data to train on"
        log.warning("best trial chosen by its single search run: %s", reruns)
    else:
        reruns = rerun_top(study, params, prepared_dir)
    summary = _write_results(study, params, out_dir, rows, count, storage, reruns)
    if run_id is not None:
        log_results(run_id, out_dir, summary)
        end_study_run(run_id, "FINISHED", close=True)
        summary["mlflow_run_id"] = run_id
    log.info("best: trial %d, val macro-F1 %.4f in the search: %s", summary["best_trial"],
             summary["best_value"], ", ".join(f"{k}={format_value(v)}" for k, v in summary["best_params"].items()))
    log.info("%d trials (%d completed, %d pruned, %d failed), %s epochs; best params -> %s", len(rows),
             count["COMPLETE"], count["PRUNED"], count["FAIL"], summary["epochs"], summary["best_params_file"])
    return summary
