"""Parallel tuning in a pipeline run: `tune_plan` (one step), `tune_worker_task` (one step
per worker, fanned out with dsl.ParallelFor), `tune_finish_task` (one step after them all).

The workers are pods that share one Optuna study, so the study's storage must be reachable
from all of them: a PostgreSQL URL, from the Secret `cladapter-tune` (`$CLADAPTER_TUNE_STORAGE`,
so its password is never a run parameter) or `tune.storage` without a password. An absolute SQLite path is accepted too,
for `kfp.local`, where every step runs on one machine. The study is named after the KFP
run (`<tune.study_name>-<run id>`), so a run never adds trials to another run's study.

A worker is safe to run again (a retry, a run retried from the KFP UI, which keeps its run
id): its trials carry its index, so a rerun counts the trials of its share that already
finished, runs only the rest, and marks FAIL the trials a killed attempt left RUNNING
(`redo_share`). Nothing here imports kfp.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from cladapter_core.settings import settings, var
from cladapter_core.errors import ParamsError

STORAGE_ENV = var("tune_storage")  # from the Secret cladapter-tune on the tuning steps


def study_name(params: dict, pipeline_id: str) -> str:
    run = re.sub(r"[^A-Za-z0-9._-]", "-", pipeline_id or "local")[:80]
    return f"{params['tune']['study_name']}-{run}"


def shared_storage(params: dict) -> str:
    """The study storage: `$CLADAPTER_TUNE_STORAGE` (the Secret `cladapter-tune`, which
    keeps the database password out of the run's parameters), else `tune.storage`; it
    must be one every worker pod reaches. ParamsError otherwise."""
    storage = settings().tune_storage.strip() or params["tune"]["storage"]
    if storage.startswith(("postgresql", "mysql")) or storage.startswith("sqlite:////"):
        return storage
    raise ParamsError(
        f"tune.storage {storage!r}: the pipeline's tuning workers are separate pods and need "
        "one study storage they all reach - put a PostgreSQL URL "
        "(postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB) in the Secret cladapter-tune, key "
        f"{STORAGE_ENV} (infra/k8s/README.md); an absolute sqlite:////path works only with run-local")


def check_no_password(params: dict) -> None:
    """A database password never travels as a run parameter (the KFP UI and MLflow show
    them): `tune.storage` with one is refused, pointing at the Secret."""
    from cladapter_core.tune import redact
    storage = str(params["tune"]["storage"])
    if "://" in storage and urlsplit(storage).password:
        raise ParamsError(f"tune.storage {redact(storage)}: holds a password, which every run's "
                          "parameters would show; put the URL in the Secret cladapter-tune, key "
                          f"{STORAGE_ENV}, and leave tune.storage alone")


def shares(n_trials: int, n_workers: int) -> list[int]:
    """Trials per worker: `n_trials` split over at most `n_trials` workers."""
    n_workers = max(1, min(int(n_workers), int(n_trials)))
    return [n_trials // n_workers + (1 if i < n_trials % n_workers else 0) for i in range(n_workers)]


def tune_plan(params: dict, n_trials: int, n_workers: int, pipeline_id: str, track: bool) -> list[int]:
    """Check the space and the storage, create the study (and its MLflow run, so the
    workers nest under one); returns the workers' indices."""
    from cladapter_core import tune
    if n_trials < 1 or n_workers < 1:
        raise ParamsError(f"tune_trials and tune_workers must be >= 1, got {n_trials} and {n_workers}")
    check_no_password(params)
    tune.check_space(params)
    storage, name = shared_storage(params), study_name(params, pipeline_id)
    tune.open_study(params, name, storage)
    if track:
        from cladapter_core import tracking
        tracking.check_tracking()
        tune.study_run(params, name, storage)
    plan = shares(n_trials, n_workers)
    print(f"study {name!r} on {tune.redact(storage)}: {n_trials} trials over {len(plan)} worker(s) {plan}")
    return list(range(len(plan)))


def redo_share(study, worker_index: int, share: int) -> tuple[int, dict]:
    """(trials of `share` still to run, what earlier attempts of this worker finished). An
    earlier attempt's trial still RUNNING died with its pod: it is marked FAIL and run again."""
    from optuna.trial import TrialState
    finished = {"complete": 0, "pruned": 0, "failed": 0, "epochs": 0, "trials": []}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("worker") != worker_index:
            continue
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            continue
        key = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(t.state)
        if key:
            finished[key] += 1
            finished["epochs"] += int(t.user_attrs.get("epochs", 0))
            finished["trials"].append(t.number)
    return max(0, share - len(finished["trials"])), finished


def tune_worker(params: dict, prepared: Path, worker_index: int, n_trials: int, n_workers: int,
                pipeline_id: str, track: bool) -> dict:
    """This worker's share of the trials on the run's study, less what an earlier attempt
    of it finished (`redo_share`)."""
    from cladapter_core import tune
    plan = shares(n_trials, n_workers)
    mine = plan[worker_index] if 0 <= worker_index < len(plan) else 0
    name, storage = study_name(params, pipeline_id), shared_storage(params)
    todo, before = (redo_share(tune.open_study(params, name, storage, worker_index), worker_index, mine)
                    if mine else (0, {"complete": 0, "pruned": 0, "failed": 0, "epochs": 0, "trials": []}))
    if before["trials"]:
        print(f"worker {worker_index}: {len(before['trials'])} of its {mine} trials finished in an "
              f"earlier attempt; running {todo}")
    done = (tune.tune_worker(params, prepared, name, storage, n_trials=todo, worker_index=worker_index,
                             track=track) if todo else {"trials": [], "complete": 0, "pruned": 0,
                                                        "failed": 0, "epochs": 0})
    return {"worker": worker_index, "trials": sorted(before["trials"] + done["trials"]),
            **{k: before[k] + done[k] for k in ("complete", "pruned", "failed", "epochs")}}


def tune_finish(params: dict, out_dir, pipeline_id: str, track: bool, prepared=None) -> tuple[dict, dict]:
    """best_params.yaml, summary.json, trials.csv and the figures into `out_dir` (the best
    ``tune.rerun_top`` trials re-run on other seeds first, on `prepared`); returns the params
    with the chosen trial's values applied, and the summary."""
    from cladapter_core import tune
    out = Path(out_dir)
    summary = tune.finish_study(params, out, study_name(params, pipeline_id), shared_storage(params),
                                track=track, prepared_dir=prepared)
    return tune.apply_best(params, out / tune.BEST_FILE), summary
