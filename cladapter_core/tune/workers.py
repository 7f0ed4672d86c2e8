"""Workers and the tuning session.

`tune_worker` runs trials of one study in this process; many may run at once on one
study (other processes, other machines with a PostgreSQL storage), and pipeline
components call it once per parallel worker. `tune` is the session of `cladapter tune`:
``--workers N`` spawned processes on one study, then `results.finish_study`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import TuneError
from .results import finish_study
from .runs import TrialRun, end_study_run, pipeline_of, study_run
from .. import identity
from ..console import LOGGER, configure
from ..settings import tracking_on
from .space import check_space
from .storage import open_study, redact
from .trial import outcome, run_trial, trial_line

log = logging.getLogger(__name__)


def _check_prepared(prepared_dir) -> Path:
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "manifest.csv").is_file():
        raise TuneError(f"{prepared_dir}: not a prepared dataset (no manifest.csv); run `cladapter prepare`")
    return prepared_dir


def _trial_logging(params: dict, prepared_dir: Path, name: str, storage: str, worker_index: int,
                   track: bool, study_run_id: str | None) -> tuple[str | None, dict]:
    """(the study run trials nest under, the tags of every trial run); (None, {}) untracked."""
    from .. import tracking
    if not tracking_on(track):
        return None, {}
    data_hash = identity.data_hash(prepared_dir)
    parent = study_run_id or study_run(params, name, storage, data_hash, prepared_dir)
    tags = tracking.run_tags(params, "tune-trial", data_hash)
    tags.update({tracking.PIPELINE_TAG: pipeline_of(parent), "optuna.study_name": name,
                 "cladapter.tune_worker": str(worker_index)})
    return parent, tags


def tune_worker(params: dict, prepared_dir, study_name: str | None = None, storage: str | None = None,
                n_trials: int | None = None, *, timeout: float | None = None, worker_index: int = 0,
                track: bool = True, study_run_id: str | None = None, threads: int | None = None) -> dict:
    """Run `n_trials` trials (default ``tune.n_trials``) of the study `study_name` on
    `storage` (defaults: ``tune.study_name``, ``tune.storage``) in this process.

    Many workers may run at once on one study (other processes, other machines with a
    PostgreSQL storage); give each a distinct `worker_index` (it offsets the sampler's
    seed). With tracking on, each trial is an MLflow run nested under the session's study
    run (`study_run_id`, else found or created by study name + storage). Call
    `finish_study` once all workers are done. Returns what this worker did:
    ``{"worker", "trials", "complete", "pruned", "failed", "epochs"}``.
    """
    from ..training import TrainingError
    if threads:
        import torch
        torch.set_num_threads(threads)
    prepared_dir = _check_prepared(prepared_dir)
    space = check_space(params)
    name = study_name or params["tune"]["study_name"]
    storage = storage or params["tune"]["storage"]
    study = open_study(params, name, storage, worker_index)
    run_parent, logger_tags = _trial_logging(params, prepared_dir, name, storage, worker_index,
                                             track, study_run_id)
    mine: list[int] = []

    def objective(trial):
        mine.append(trial.number)
        trial.set_user_attr("worker", worker_index)
        return run_trial(trial, params, prepared_dir, space, TrialRun(run_parent, logger_tags))

    def report(study, frozen):
        log.info("%s", trial_line(study, frozen))

    study.optimize(objective, n_trials=n_trials or params["tune"]["n_trials"], timeout=timeout,
                   catch=(TrainingError,), callbacks=[report])
    done = [t for t in study.get_trials(deepcopy=False) if t.number in set(mine)]
    count = {s: sum(outcome(t) == s for t in done) for s in ("COMPLETE", "PRUNED", "FAIL")}
    return {"worker": worker_index, "trials": sorted(mine), "complete": count["COMPLETE"],
            "pruned": count["PRUNED"], "failed": count["FAIL"],
            "epochs": sum(int(t.user_attrs.get("epochs", 0)) for t in done)}


def _spawned_worker(kwargs: dict) -> dict:
    """Entry point of a `--workers` process (spawned: a fresh interpreter)."""
    import optuna
    optuna.logging.set_verbosity(kwargs.pop("optuna_verbosity"))  # as in the parent
    level = kwargs.pop("log_level")
    if level is not None:
        configure(level)  # the parent's logging, in this fresh interpreter
    return tune_worker(**kwargs)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _run_workers(common: dict, n_trials: int, workers: int) -> list[dict]:
    """`n_trials` split over `workers`: in this process for one, else spawned processes."""
    if workers == 1:
        return [tune_worker(n_trials=n_trials, worker_index=0, **common)]
    import concurrent.futures as cf
    import multiprocessing

    import optuna
    threads = max(1, (os.cpu_count() or 1) // workers)
    ours = logging.getLogger(LOGGER)
    jobs = [dict(common, n_trials=n, worker_index=i, threads=threads,
                 optuna_verbosity=optuna.logging.get_verbosity(),
                 log_level=ours.level if ours.handlers else None)
            for i, n in enumerate(_split(n_trials, workers)) if n > 0]
    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
    with cf.ProcessPoolExecutor(max_workers=len(jobs), mp_context=ctx) as pool:
        futures = [pool.submit(_spawned_worker, job) for job in jobs]
        return [f.result() for f in futures]


def tune(params: dict, prepared_dir, out_dir, *, n_trials: int | None = None, timeout: float | None = None,
         workers: int | None = None, study_name: str | None = None, storage: str | None = None,
         track: bool = True) -> dict:
    """Search: `n_trials` trials in all (split over `workers` processes sharing the
    study), then `finish_study` writes `<out_dir>/best_params.yaml` and the pictures.
    Arguments left None come from the `tune:` params. Returns finish_study's summary
    plus ``workers``: what each worker did."""
    t = params["tune"]
    n_trials = n_trials or t["n_trials"]
    workers = workers or t["workers"]
    timeout = timeout if timeout is not None else t["timeout"]
    name = study_name or t["study_name"]
    storage = storage or t["storage"]
    _check_prepared(prepared_dir)
    check_space(params)
    if workers > 1 and ":memory:" in storage:
        raise TuneError(f"tune.storage {redact(storage)}: an in-memory database cannot be shared by "
                        f"{workers} worker processes; use a file or a PostgreSQL URL")
    open_study(params, name, storage)  # fails fast on a bad storage, creates the study once
    run_id = None
    if tracking_on(track):
        run_id = study_run(params, name, storage, identity.data_hash(prepared_dir), prepared_dir)
    log.info("tuning study %r on %s: %d trials, %d worker(s), pruner %s", name, redact(storage), n_trials,
             workers, t["pruner"])
    common = dict(params=params, prepared_dir=str(prepared_dir), study_name=name, storage=storage,
                  timeout=timeout, track=track, study_run_id=run_id)
    try:
        results = _run_workers(common, n_trials, workers)
    except BaseException:
        if run_id is not None:
            end_study_run(run_id, "FAILED", close=False)
        raise
    summary = finish_study(params, out_dir, name, storage, track=track, study_run_id=run_id,
                           prepared_dir=prepared_dir)
    summary["workers"] = results
    return summary
