"""Optuna search over K, the stage lengths and the learning rates (`cladapter tune`).

A trial is one Staged Fine-Tuning run with the values the sampler suggests for the
parameters of ``tune.space``; its objective is the validation macro-F1 of the model
stage 2 keeps, reported every epoch so the pruner (median by default) stops trials that
cannot win. Only the best trial's values are kept, in ``best_params.yaml``.

Studies live in an Optuna storage: SQLite by default (``tune.storage``), or a
PostgreSQL URL that workers on many machines share. A study is resumed by its name:
the same name on the same storage adds trials to it. ``--workers N`` starts N
processes on one study; `tune_worker` is the same loop for one process, called by
pipeline components (one per parallel worker), and `finish_study` writes the results.

Tracking: each tuning session has one MLflow "study run" (a child of the pipeline's
parent run) and every trial is a run nested under it, with its parameters, per-epoch
metrics and outcome; the study run gets the optimisation history, the parameter
importances and K against macro-F1 as pictures.

Tuned values reach training through ``tune.use_best``: when true, `params.load_params`
applies the best-params file between params.yaml and the ``-S`` flags
(defaults < params.yaml < best params < flags). Reading that file, and checking the
``tune:`` section, is parameter loading (`params`, `param_models`); this package only
writes it.

Modules, each importing only those above it:

- `errors`: `TuneError`.
- `storage`: the Optuna storage and the study in it (`open_storage`, `open_study`, the pruner).
- `space`: the search space checked for a search, and each trial's values (`check_space`).
- `runs`: MLflow: the study run, one run per trial, the results logged.
- `trial`: the objective and one trial (`run_trial`, `PruningCallback`).
- `results`: best_params.yaml, summary.json, trials.csv, the pictures (`finish_study`).
- `workers`: `tune_worker` (one process) and `tune` (the session, N processes).
"""
from ..param_models import NOT_SEARCHABLE, PRUNERS
from ..params import apply_best, best_params_layer, nest, read_best_params, set_dotted
from ..errors import TuneError
from .results import BEST_FILE, finish_study, plot_k_vs_f1, study_table, write_best_params, write_figures
from .runs import STUDY_CLOSED_TAG, STUDY_TAG, study_key, study_run
from .space import check_space, suggest, trial_params
from .storage import (DEFAULT_STORAGE, PG_CONNECT_TIMEOUT_S, SQLITE_TIMEOUT_S, make_pruner,
                      normalize_storage, open_storage, open_study, redact, tune_seed)
from .trial import OBJECTIVE, PruningCallback, run_trial
from .workers import tune, tune_worker

__all__ = [
    "BEST_FILE", "DEFAULT_STORAGE", "NOT_SEARCHABLE", "OBJECTIVE", "PG_CONNECT_TIMEOUT_S", "PRUNERS",
    "SQLITE_TIMEOUT_S", "STUDY_CLOSED_TAG", "STUDY_TAG", "PruningCallback", "TuneError", "apply_best",
    "best_params_layer", "check_space", "finish_study", "make_pruner", "nest", "normalize_storage",
    "open_storage", "open_study", "plot_k_vs_f1", "read_best_params", "redact", "run_trial",
    "set_dotted", "study_key", "study_run", "study_table", "suggest", "trial_params", "tune",
    "tune_seed", "tune_worker", "write_best_params", "write_figures",
]
