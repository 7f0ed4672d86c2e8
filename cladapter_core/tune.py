"""Optuna search over K, the stage lengths and the learning rates (`cladapter tune`).

A trial is one Staged Fine-Tuning run: stage 1 then stage 2 (`train.train`) in a
temporary folder with the values the sampler suggests for the parameters of
``tune.space``. Its objective is the validation macro-F1 of the model stage 2 keeps
(the best epoch by ``train.select_metric``). Every epoch reports its validation
macro-F1 at a global step (stage-1 epochs, then stage-2 epochs continuing the count,
0-based), so the pruner (median by default) stops trials that cannot win. Trial
outputs are deleted; only the best trial's values are kept, in ``best_params.yaml``.

Studies live in an Optuna storage: SQLite by default (``tune.storage``), or a
PostgreSQL URL that workers on many machines share. A study is resumed by its name:
the same name on the same storage adds trials to it. ``--workers N`` starts N
processes on one study; `tune_worker` is the same loop for one process, called by
pipeline components (one per parallel worker), and `finish_study` writes the results.

Tracking: each tuning session has one MLflow "study run" (a child of the pipeline's
parent run) and every trial is a run nested under it, with its parameters, per-epoch
metrics and outcome; the study run gets the optimisation history, the parameter
importances and K against macro-F1 as pictures. Workers in other processes or on other
machines find the session's study run by a tag (study name + storage).

Tuned values reach training through ``tune.use_best``: when true, `params.load_params`
applies the best-params file between params.yaml and the ``-S`` flags
(defaults < params.yaml < best params < flags).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from .errors import CLAdapterError, ParamsError
from .params import flatten

DEFAULT_STORAGE = "sqlite:///outputs/tune/optuna.db"
BEST_FILE = "best_params.yaml"
PRUNERS = ("median", "percentile", "hyperband", "none")
OBJECTIVE = "val_macro_f1"
STUDY_TAG = "cladapter.optuna_study"          # on the open study run of a session
STUDY_CLOSED_TAG = "cladapter.optuna_study_closed"
# Searching these would need another prepared dataset or would change the search itself.
NOT_SEARCHABLE = ("data.", "tune.", "evaluate.", "register.")
SQLITE_TIMEOUT_S = 60      # workers on one SQLite file wait for each other's writes
PG_CONNECT_TIMEOUT_S = 10


class TuneError(CLAdapterError):
    """The search cannot run as asked (empty space, bad storage, no completed trial)."""


# -- params --------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_tune_params(p: dict, out: list[str]) -> None:
    """Append a 'tune.<field>: what is wrong' line to `out` for every problem of the
    `tune:` section (called by `params.validate_params`). An empty space is allowed here
    (training does not need one); `tune` itself refuses it."""
    t = p.get("tune")
    if t is None:
        return
    if not isinstance(t, dict):
        out.append(f"tune: must be a mapping, got {t!r}")
        return

    def need(cond, field, what, value):
        if not cond:
            out.append(f"tune.{field}: {what}, got {value!r}")

    need(isinstance(t.get("study_name"), str) and t["study_name"].strip() != "", "study_name",
         "must be a non-empty name", t.get("study_name"))
    need(isinstance(t.get("storage"), str) and "://" in t["storage"], "storage",
         "must be a database URL such as sqlite:///outputs/tune/optuna.db or "
         "postgresql://user@host:5432/db", t.get("storage"))
    need(_is_int(t.get("n_trials")) and t["n_trials"] >= 1, "n_trials", "must be an integer >= 1",
         t.get("n_trials"))
    need(t.get("timeout") is None or (_is_num(t["timeout"]) and t["timeout"] > 0), "timeout",
         "must be null or a number of seconds > 0", t.get("timeout"))
    need(_is_int(t.get("workers")) and t["workers"] >= 1, "workers", "must be an integer >= 1",
         t.get("workers"))
    need(t.get("seed") is None or (_is_int(t["seed"]) and t["seed"] >= 0), "seed",
         "must be null (the top-level seed) or an integer >= 0", t.get("seed"))
    need(_is_int(t.get("startup_trials")) and t["startup_trials"] >= 0, "startup_trials",
         "must be an integer >= 0", t.get("startup_trials"))
    need(t.get("pruner") in PRUNERS, "pruner", f"must be one of {', '.join(PRUNERS)}", t.get("pruner"))
    need(_is_int(t.get("pruner_startup_trials")) and t["pruner_startup_trials"] >= 0,
         "pruner_startup_trials", "must be an integer >= 0", t.get("pruner_startup_trials"))
    need(_is_int(t.get("pruner_warmup_steps")) and t["pruner_warmup_steps"] >= 0,
         "pruner_warmup_steps", "must be an integer >= 0", t.get("pruner_warmup_steps"))
    need(_is_num(t.get("pruner_percentile")) and 0 < t["pruner_percentile"] < 100,
         "pruner_percentile", "must be a number > 0 and < 100", t.get("pruner_percentile"))
    need(t.get("cache_views") is None or (_is_int(t["cache_views"]) and t["cache_views"] >= 0),
         "cache_views", "must be null (cache off) or an integer >= 0", t.get("cache_views"))
    need(isinstance(t.get("best_params"), str) and t["best_params"] != "", "best_params",
         "must be a file path", t.get("best_params"))
    need(isinstance(t.get("use_best"), bool), "use_best", "must be true or false", t.get("use_best"))
    space = t.get("space")
    if not isinstance(space, list):
        out.append(f"tune.space: must be a list of entries such as "
                   f"{{param: model.num_centers, choices: [5, 10, 20]}}, got {space!r}")
        return
    known = flatten({k: v for k, v in p.items() if k != "tune"})
    seen = set()
    for i, entry in enumerate(space):
        out.extend(_space_entry_problems(i, entry, known, seen))


def _space_entry_problems(i: int, e, known: dict, seen: set) -> list[str]:
    where = f"tune.space[{i}]"
    if not isinstance(e, dict):
        return [f"{where}: must be a mapping such as {{param: model.num_centers, "
                f"choices: [5, 10, 20]}} or {{param: train.lr, low: 1.0e-4, high: 1.0e-2, log: true}}, got {e!r}"]
    probs = []
    name = e.get("param")
    if not isinstance(name, str) or not name:
        return [f"{where}.param: must be a parameter's dotted name (e.g. model.num_centers), got {name!r}"]
    where = f"tune.space[{i}] ({name})"
    extra = set(e) - {"param", "choices", "low", "high", "log", "step"}
    if extra:
        probs.append(f"{where}: unknown field(s) {', '.join(sorted(extra))} "
                     "(allowed: param, choices, low, high, log, step)")
    if name.startswith(NOT_SEARCHABLE) or name == "seed":
        probs.append(f"{where}: {name} cannot be searched (only model, train, stage1 and stage2 values)")
    elif name not in known:
        probs.append(f"{where}: {name} is not a parameter")
    if name in seen:
        probs.append(f"{where}: {name} appears twice")
    seen.add(name)
    if "choices" in e:
        if any(k in e for k in ("low", "high", "log", "step")):
            probs.append(f"{where}: give either choices or low/high, not both")
        c = e["choices"]
        if not isinstance(c, list) or not c:
            probs.append(f"{where}.choices: must be a non-empty list, got {c!r}")
        elif not all(v is None or isinstance(v, (bool, int, float, str)) for v in c):
            probs.append(f"{where}.choices: each choice must be a number, string, true/false or null, got {c!r}")
        elif len(set(map(repr, c))) != len(c):
            probs.append(f"{where}.choices: has duplicates: {c!r}")
        return probs
    low, high = e.get("low"), e.get("high")
    if not (_is_num(low) and _is_num(high)):
        probs.append(f"{where}: needs choices: [...] or numbers low and high, got low={low!r} high={high!r}")
        return probs
    if low > high:
        probs.append(f"{where}: low ({low}) must be <= high ({high})")
    log, step = e.get("log", False), e.get("step")
    if not isinstance(log, bool):
        probs.append(f"{where}.log: must be true or false, got {log!r}")
    elif log and low <= 0:
        probs.append(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None and not (_is_num(step) and step > 0):
        probs.append(f"{where}.step: must be a number > 0, got {step!r}")
    if log and step is not None:
        probs.append(f"{where}: step and log cannot be combined")
    return probs


def _is_int_dim(entry: dict, current) -> bool:
    ints = _is_int(entry["low"]) and _is_int(entry["high"]) and (entry.get("step") is None or _is_int(entry["step"]))
    return ints and not isinstance(current, float)


def set_dotted(params: dict, name: str, value) -> None:
    """params['a']['b'] = value for name 'a.b' (in place)."""
    node = params
    parts = name.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def nest(values: dict) -> dict:
    """{'model.num_centers': 20} -> {'model': {'num_centers': 20}}."""
    out: dict = {}
    for k, v in values.items():
        set_dotted(out, k, v)
    return out


def trial_params(params: dict, values: dict) -> dict:
    """The params of one trial: a copy of `params` with the dotted `values` set and the
    stage-1 feature cache on when ``tune.cache_views`` asks for it."""
    p = copy.deepcopy(params)
    for k, v in values.items():
        set_dotted(p, k, v)
    views = (p.get("tune") or {}).get("cache_views")
    cache = p["train"].setdefault("cache", {})
    if views is not None and cache.get("views") is None:
        cache["views"] = views
    return p


def check_space(params: dict) -> list[dict]:
    """The search space, checked: every choice and both ends of every range must give
    valid params. Raises TuneError listing every problem."""
    from .params import validate_params
    space = params["tune"]["space"]
    if not space:
        raise TuneError("tune.space is empty: nothing to search. List at least one parameter, "
                        "e.g. `- {param: model.num_centers, choices: [5, 10, 20, 30, 50]}`")
    problems = []
    for entry in space:
        name = entry["param"]
        values = entry["choices"] if "choices" in entry else [entry["low"], entry["high"]]
        for v in values:
            for line in validate_params(trial_params(params, {name: v})):
                if line.startswith(name + ":"):
                    problems.append(f"tune.space ({name}): the value {v!r} is invalid: {line}")
    if problems:
        raise TuneError("the search space gives invalid params:\n  " + "\n  ".join(problems))
    return space


# -- best parameters -------------------------------------------------------------------------
def read_best_params(path) -> dict:
    """The overrides in a best-params file (nested mapping); TuneError/ParamsError when unreadable."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ParamsError(f"tune.best_params {path}: cannot read it ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ParamsError(f"tune.best_params {path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ParamsError(f"tune.best_params {path}: expected a mapping of parameters, got {type(data).__name__}")
    return data


def best_params_layer(params_so_far: dict, flags: dict, use_best: bool | None) -> tuple[dict, str | None]:
    """(overrides, file) for `params.load_params`: the best-params file's contents when
    tuning results are to be used (`use_best` True, or None and ``tune.use_best`` true
    after the flags), else ({}, None). A missing file is a warning, not an error: `prepare`
    runs before the first search, and the values of params.yaml then stay."""
    if use_best is False:
        return {}, None
    tune = dict(params_so_far.get("tune") or {})
    flagged = (flags or {}).get("tune")
    if isinstance(flagged, dict):
        tune.update(flagged)
    if not (use_best or tune.get("use_best") is True):
        return {}, None
    path = Path(str(tune.get("best_params") or "outputs/tune/" + BEST_FILE))
    if not path.is_file():
        print(f"warning: tune.use_best is true but {path} does not exist (run `cladapter tune`): "
              "using the values of the params file", file=sys.stderr)
        return {}, None
    best = read_best_params(path)
    shown = ", ".join(f"{k}={v}" for k, v in flatten(best).items())
    print(f"tuned parameters from {path}: {shown or 'none'}", file=sys.stderr)
    return best, str(path)


def apply_best(params: dict, best) -> dict:
    """`params` with the values of a best-params file (path) or mapping set over it; the
    result is validated (ParamsError naming the file's field)."""
    from .params import validate_params
    where = str(best) if not isinstance(best, dict) else "best params"
    values = flatten(best if isinstance(best, dict) else read_best_params(best))
    known = flatten(params)
    unknown = [k for k in values if k not in known and not k.startswith("model.backbone_kwargs.")]
    if unknown:
        raise ParamsError(f"{where}: unknown parameter(s) {', '.join(unknown)}")
    p = copy.deepcopy(params)
    for k, v in values.items():
        set_dotted(p, k, v)
    problems = validate_params(p)
    if problems:
        raise ParamsError(f"{where}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return p


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_best_params(path, values: dict, header: str = "") -> Path:
    """Write the nested overrides of `values` ({dotted: value}) as YAML, atomically."""
    path = Path(path)
    text = "".join(f"# {line}\n" for line in header.splitlines())
    body = yaml.safe_dump(nest(values), sort_keys=True, default_flow_style=False) if values else "{}\n"
    _atomic_write(path, text + body)
    return path


# -- storage ---------------------------------------------------------------------------------
def redact(url: str) -> str:
    return re.sub(r"//([^/:@]+):[^/@]*@", r"//\1:***@", url)


def normalize_storage(url: str) -> str:
    """`postgresql://` and `postgres://` name the psycopg2 driver explicitly: SQLAlchemy
    would pick psycopg (3), which the platform does not install."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def open_storage(url: str):
    """An Optuna RDBStorage for `url`, checked by connecting; TuneError naming the URL."""
    import optuna
    import sqlalchemy
    from sqlalchemy.engine import make_url

    shown = redact(url)
    if not isinstance(url, str) or not url:
        raise TuneError(f"tune.storage: empty storage URL {url!r}")
    url = normalize_storage(url)
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        raise TuneError(f"tune.storage {shown!r} is not a database URL (expected e.g. "
                        "sqlite:///outputs/tune/optuna.db or postgresql://user@host:5432/db)") from e
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:":
            folder = Path(db).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TuneError(f"tune.storage {shown}: cannot create folder {folder} ({e.strerror})") from e
        kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    elif backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # driver missing, host down, bad credentials, not a database
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TuneError(f"tune.storage {shown}: cannot open the Optuna storage "
                        f"({type(e).__name__}: {first})") from e


def make_pruner(params: dict):
    import optuna
    t = params["tune"]
    kind = t["pruner"]
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    common = dict(n_startup_trials=t["pruner_startup_trials"], n_warmup_steps=t["pruner_warmup_steps"])
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(t["pruner_percentile"], **common)
    return optuna.pruners.MedianPruner(**common)


def tune_seed(params: dict) -> int:
    s = params["tune"].get("seed")
    return int(params["seed"] if s is None else s)


def open_study(params: dict, study_name: str | None = None, storage: str | None = None,
               worker_index: int = 0):
    """Create the study, or load it when one of that name exists (resume by name).

    TPE's seed is ``tune.seed`` (else ``seed``) plus `worker_index`, so parallel workers
    do not draw the same random start-up trials."""
    import optuna
    t = params["tune"]
    name = study_name or t["study_name"]
    sampler = optuna.samplers.TPESampler(seed=tune_seed(params) + worker_index,
                                         n_startup_trials=t["startup_trials"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(storage=open_storage(storage or t["storage"]), sampler=sampler,
                                    pruner=make_pruner(params), study_name=name,
                                    direction="maximize", load_if_exists=True)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise TuneError(f"study {name!r} on {redact(storage or t['storage'])} minimises; it is not "
                        "a cladapter study (choose another tune.study_name)")
    return study


# -- tracking ---------------------------------------------------------------------------------
def _tracking_on(track: bool) -> bool:
    return bool(track) and os.environ.get("CLADAPTER_TRACKING", "1") != "0"


def study_key(study_name: str, storage: str) -> str:
    """What the workers of one session search for: study name + storage (no password)."""
    blob = f"{study_name}\0{redact(normalize_storage(storage))}"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param
    items = [Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000])
             for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


def study_run(params: dict, study_name: str, storage: str, data_hash: str | None = None) -> str:
    """The MLflow run of this tuning session: the open one tagged with the study's key,
    else a new one (a child of the pipeline's parent run). Workers starting together
    may each create one: all then keep the oldest and the others are deleted."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from . import tracking
    cfg = tracking.configure(params)
    client = MlflowClient()
    key = study_key(study_name, storage)
    flt = f"tags.`{STUDY_TAG}` = '{key}'"

    def open_runs():
        runs = client.search_runs([cfg["experiment_id"]], filter_string=flt,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    with tracking._errors(f"finding the MLflow run of study {study_name!r}"):
        found = open_runs()
        if found:
            run_id = found[0].info.run_id
        else:
            source_hash = tracking._source_hash(params)
            pid = tracking.pipeline_id(params, source_hash)
            tags = tracking.run_tags(params, "tune", data_hash or source_hash)
            tags[tracking.PIPELINE_TAG] = pid
            parent = tracking._pipeline_parent(client, cfg["experiment_id"], pid, params, dict(tags))
            tags.update({STUDY_TAG: key, "optuna.study_name": study_name, "mlflow.parentRunId": parent,
                         "optuna.storage": redact(normalize_storage(storage))})
            if any(e["param"] == "model.num_centers" for e in params["tune"]["space"]):
                tags["K"] = "searched"
            mine = client.create_run(cfg["experiment_id"], run_name=f"tune-{study_name}", tags=tags)
            found = open_runs()
            run_id = found[0].info.run_id if found else mine.info.run_id
            if run_id != mine.info.run_id:
                client.delete_run(mine.info.run_id)
            else:
                _log_params(client, run_id, params)
                client.log_dict(run_id, params, "params.json")
        client.update_run(run_id, status="RUNNING")
    return run_id


class _TrialRun:
    """The MLflow run of one trial, nested under the study run. Logging failures warn
    once and never stop the search (like tracking.EpochLogger)."""

    def __init__(self, study_run_id: str | None, base_tags: dict):
        self.parent, self.base_tags, self.run_id, self._warned = study_run_id, base_tags, None, False

    def _safe(self, fn) -> None:
        if self.parent is None:
            return
        try:
            fn()
        except Exception as e:
            if not self._warned:
                warnings.warn(f"MLflow logging of a tuning trial failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); the search goes on")
                self._warned = True

    @staticmethod
    def _client():
        from mlflow import MlflowClient
        return MlflowClient()

    def start(self, trial, params: dict, values: dict) -> None:
        def go():
            client = self._client()
            exp = client.get_run(self.parent).info.experiment_id
            tags = {**self.base_tags, "mlflow.parentRunId": self.parent, "cladapter.role": "trial",
                    "optuna.trial": str(trial.number), "K": str(params["model"]["num_centers"])}
            run = client.create_run(exp, run_name=f"trial-{trial.number}", tags=tags)
            self.run_id = run.info.run_id
            _log_params(client, self.run_id, params)
            client.log_dict(self.run_id, values, "trial_params.json")
        self._safe(go)

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if _is_num(v) and math.isfinite(v)]
        if self.run_id and batch:
            self._safe(lambda: self._client().log_batch(self.run_id, metrics=batch))

    def end(self, state: str, value: float | None, epochs: int) -> None:
        def go():
            client = self._client()
            client.set_tag(self.run_id, "optuna.state", state)
            self.log({"objective": value, "epochs_run": epochs} if value is not None
                     else {"epochs_run": epochs}, step=epochs)
            client.set_terminated(self.run_id, status="FAILED" if state == "FAIL" else "FINISHED")
        if self.run_id:
            self._safe(go)


# -- one trial -------------------------------------------------------------------------------
class PruningCallback:
    """Trainer callback: reports each epoch's validation macro-F1 to the trial at a global
    step and raises optuna.TrialPruned when the pruner says so (the exception leaves
    `train.train`, which ends the trial)."""

    def __init__(self, trial, offset: int, logger: _TrialRun | None = None, counter: dict | None = None):
        self.trial, self.offset, self.logger = trial, offset, logger
        self.counter = counter if counter is not None else {"epochs": 0}

    def on_epoch_end(self, record: dict) -> None:
        import optuna
        step = self.offset + int(record["epoch"]) - 1
        self.counter["epochs"] += 1
        self.trial.set_user_attr("epochs", self.counter["epochs"])
        if self.logger is not None:
            self.logger.log({k: v for k, v in record.items() if k not in ("epoch",)}, step=step + 1)
        value = record.get(OBJECTIVE)
        if value is None:
            raise TuneError("the validation split is empty: tuning needs validation macro-F1 "
                            "(prepare the data with data.val_fraction > 0)")
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({OBJECTIVE} {value:.4f})")


def suggest(trial, space: list[dict], params: dict) -> dict:
    """The trial's value for each entry of the space, by dotted name."""
    known = flatten(params)
    values = {}
    for e in space:
        name = e["param"]
        if "choices" in e:
            values[name] = trial.suggest_categorical(name, e["choices"])
        elif _is_int_dim(e, known.get(name)):
            values[name] = trial.suggest_int(name, e["low"], e["high"], step=e.get("step") or 1,
                                             log=bool(e.get("log")))
        else:
            values[name] = trial.suggest_float(name, float(e["low"]), float(e["high"]),
                                               step=e.get("step"), log=bool(e.get("log")))
    return values


def _selected_value(model_dir: Path, stage: int, best_epoch: int) -> float | None:
    """Validation macro-F1 of the epoch the trainer kept."""
    history = json.loads((model_dir / "history.json").read_text())
    for r in history:
        if r["stage"] == stage and r["epoch"] == best_epoch:
            return r.get(OBJECTIVE)
    return None


def run_trial(trial, params: dict, prepared_dir, space: list[dict], logger: _TrialRun | None = None,
              work_dir=None) -> float:
    """One Staged Fine-Tuning run with the trial's values; returns its objective."""
    import optuna

    from .train import STAGED_MODES, train
    values = suggest(trial, space, params)
    p = trial_params(params, values)
    mode = p["train"]["mode"]
    staged = mode in STAGED_MODES and p["stage2"]["epochs"] > 0
    counter = {"epochs": 0}
    logger = logger or _TrialRun(None, {})
    logger.start(trial, p, values)
    tmp = Path(tempfile.mkdtemp(prefix=f"cladapter-trial{trial.number}-", dir=work_dir))
    state, value = "FAIL", None
    try:
        s1_epochs = p["stage1"]["epochs"] + (p["stage2"]["epochs"] if mode == "full" else 0)
        s1 = train(p, prepared_dir, tmp / "stage1", stage=1, mode=mode, resume=False, progress=False,
                   callbacks=[PruningCallback(trial, 0, logger, counter)])
        last_dir, last = tmp / "stage1", s1
        if staged:
            last = train(p, prepared_dir, tmp / "stage2", stage=2, mode=mode, init_from=tmp / "stage1",
                         resume=False, progress=False,
                         callbacks=[PruningCallback(trial, s1_epochs, logger, counter)])
            last_dir = tmp / "stage2"
        value = _selected_value(last_dir, last["stage"], last["best_epoch"])
        if value is None:
            raise TuneError(f"trial {trial.number}: no validation macro-F1 was recorded")
        state = "COMPLETE"
        return float(value)
    except optuna.TrialPruned:
        state = "PRUNED"
        raise
    finally:
        trial.set_user_attr("epochs", counter["epochs"])
        logger.end(state, value, counter["epochs"])
        shutil.rmtree(tmp, ignore_errors=True)


def _trial_line(study, frozen) -> str:
    vals = " ".join(f"{k}={_fmt(v)}" for k, v in frozen.params.items())
    epochs = frozen.user_attrs.get("epochs", "?")
    if frozen.state.name == "COMPLETE":
        try:
            best = f", best so far {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = ""
        return f"trial {frozen.number}: {vals} -> val macro-F1 {frozen.value:.4f} in {epochs} epochs{best}"
    if frozen.state.name == "PRUNED":
        return f"trial {frozen.number}: {vals} -> pruned after {epochs} epochs"
    return f"trial {frozen.number}: {vals} -> {frozen.state.name.lower()}"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- workers ---------------------------------------------------------------------------------
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

    from . import tracking
    from .train import TrainingError
    if threads:
        import torch
        torch.set_num_threads(threads)
    prepared_dir = _check_prepared(prepared_dir)
    space = check_space(params)
    name = study_name or params["tune"]["study_name"]
    storage = storage or params["tune"]["storage"]
    study = open_study(params, name, storage, worker_index)
    logger_tags, run_parent = {}, None
    if _tracking_on(track):
        data_hash = tracking.content_hash(prepared_dir / "manifest.csv")
        run_parent = study_run_id or study_run(params, name, storage, data_hash)
        logger_tags = tracking.run_tags(params, "tune-trial", data_hash)
        logger_tags.update({tracking.PIPELINE_TAG: _parent_pipeline(run_parent),
                            "optuna.study_name": name, "cladapter.tune_worker": str(worker_index)})
    mine: list[int] = []

    def objective(trial):
        mine.append(trial.number)
        trial.set_user_attr("worker", worker_index)
        return run_trial(trial, params, prepared_dir, space, _TrialRun(run_parent, logger_tags))

    def report(study, frozen):
        print(_trial_line(study, frozen), flush=True)

    study.optimize(objective, n_trials=n_trials or params["tune"]["n_trials"], timeout=timeout,
                   catch=(TrainingError,), callbacks=[report])
    done = [t for t in study.get_trials(deepcopy=False) if t.number in set(mine)]
    count = {s: sum(t.state.name == s for t in done) for s in ("COMPLETE", "PRUNED", "FAIL")}
    return {"worker": worker_index, "trials": sorted(mine), "complete": count["COMPLETE"],
            "pruned": count["PRUNED"], "failed": count["FAIL"],
            "epochs": sum(int(t.user_attrs.get("epochs", 0)) for t in done)}


def _check_prepared(prepared_dir) -> Path:
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "manifest.csv").is_file():
        raise TuneError(f"{prepared_dir}: not a prepared dataset (no manifest.csv); run `cladapter prepare`")
    return prepared_dir


def _parent_pipeline(run_id: str) -> str:
    from mlflow import MlflowClient

    from . import tracking
    try:
        return MlflowClient().get_run(run_id).data.tags.get(tracking.PIPELINE_TAG, "")
    except Exception:
        return ""


def _spawned_worker(kwargs: dict) -> dict:
    """Entry point of a `--workers` process (spawned: a fresh interpreter)."""
    import optuna
    optuna.logging.set_verbosity(kwargs.pop("optuna_verbosity"))  # as in the parent
    return tune_worker(**kwargs)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- the session --------------------------------------------------------------------------------
def tune(params: dict, prepared_dir, out_dir, *, n_trials: int | None = None, timeout: float | None = None,
         workers: int | None = None, study_name: str | None = None, storage: str | None = None,
         track: bool = True) -> dict:
    """Search: `n_trials` trials in all (split over `workers` processes sharing the
    study), then `finish_study` writes `<out_dir>/best_params.yaml` and the pictures.
    Arguments left None come from the `tune:` params. Returns finish_study's summary
    plus ``workers``: what each worker did."""
    import concurrent.futures as cf
    import multiprocessing

    t = params["tune"]
    n_trials = n_trials or t["n_trials"]
    workers = workers or t["workers"]
    timeout = timeout if timeout is not None else t["timeout"]
    name = study_name or t["study_name"]
    storage = storage or t["storage"]
    _check_prepared(prepared_dir)
    check_space(params)
    if workers > 1 and ":memory:" in storage:
        raise TuneError(f"tune.storage {storage}: an in-memory database cannot be shared by "
                        f"{workers} worker processes; use a file or a PostgreSQL URL")
    open_study(params, name, storage)  # fails fast on a bad storage, creates the study once
    run_id = None
    if _tracking_on(track):
        from . import tracking
        run_id = study_run(params, name, storage, tracking.content_hash(Path(prepared_dir) / "manifest.csv"))
    print(f"tuning study {name!r} on {redact(storage)}: {n_trials} trials, {workers} worker(s), "
          f"pruner {t['pruner']}")
    common = dict(params=params, prepared_dir=str(prepared_dir), study_name=name, storage=storage,
                  timeout=timeout, track=track, study_run_id=run_id)
    results = []
    try:
        if workers == 1:
            results.append(tune_worker(n_trials=n_trials, worker_index=0, **common))
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            import optuna
            jobs = [dict(common, n_trials=n, worker_index=i, threads=threads,
                         optuna_verbosity=optuna.logging.get_verbosity())
                    for i, n in enumerate(_split(n_trials, workers)) if n > 0]
            ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
            with cf.ProcessPoolExecutor(max_workers=len(jobs), mp_context=ctx) as pool:
                futures = [pool.submit(_spawned_worker, job) for job in jobs]
                for f in futures:
                    results.append(f.result())
    except BaseException:
        if run_id is not None:
            _end_study_run(run_id, "FAILED", close=False)
        raise
    summary = finish_study(params, out_dir, name, storage, track=track, study_run_id=run_id)
    summary["workers"] = results
    return summary


# -- results -----------------------------------------------------------------------------------
def _end_study_run(run_id: str, status: str, close: bool) -> None:
    from mlflow import MlflowClient
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        if close:  # the next session (resume) gets its own study run
            key = run.data.tags.get(STUDY_TAG)
            if key:
                client.set_tag(run_id, STUDY_CLOSED_TAG, key)
                client.delete_tag(run_id, STUDY_TAG)
        client.set_terminated(run_id, status=status)
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent:
            client.set_terminated(parent, status=status)
    except Exception as e:
        warnings.warn(f"MLflow: could not end the study run {run_id} ({type(e).__name__}: {str(e)[:200]})")


def study_table(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "last_reported": t.intermediate_values.get(last) if last is not None else None,
                     "epochs": int(t.user_attrs.get("epochs", 0)), "worker": t.user_attrs.get("worker"),
                     "seconds": round(t.duration.total_seconds(), 3) if t.duration else None,
                     **{f"param:{k}": v for k, v in t.params.items()}})
    return rows


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _atomic_write(path, buf.getvalue())


def plot_k_vs_f1(study, params: dict, path: Path) -> Path:
    """Validation macro-F1 against K: completed trials filled, pruned ones hollow at the
    last value they reported."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    base_k = params["model"]["num_centers"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for state, marker, face, label in (("COMPLETE", "o", "tab:blue", "completed"), ("PRUNED", "o", "none", "pruned")):
        xs, ys = [], []
        for t in study.get_trials(deepcopy=False):
            if t.state.name != state:
                continue
            y = t.value if state == "COMPLETE" else (
                t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
            if y is not None:
                xs.append(t.params.get("model.num_centers", base_k))
                ys.append(y)
        if xs:
            ax.scatter(xs, ys, marker=marker, facecolors=face, edgecolors="tab:blue", label=label)
    try:
        best = study.best_trial
        ax.scatter([best.params.get("model.num_centers", base_k)], [best.value], marker="*", s=220,
                   color="tab:red", label=f"best (trial {best.number})", zorder=3)
    except ValueError:
        pass
    ax.set_xlabel("K (model.num_centers)")
    ax.set_ylabel("validation macro-F1")
    ax.set_title(f"study {study.study_name}: K against macro-F1")
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


def finish_study(params: dict, out_dir, study_name: str | None = None, storage: str | None = None, *,
                 track: bool = True, study_run_id: str | None = None) -> dict:
    """Write the study's results into `out_dir` (each file atomically):
    ``best_params.yaml`` (the best trial's values, the file training reads with
    ``tune.use_best``), ``summary.json``, ``trials.csv`` and the pictures; log them on the
    session's study run and close it. Returns the summary. TuneError when no trial
    completed."""
    import optuna

    t = params["tune"]
    name = study_name or t["study_name"]
    storage = storage or t["storage"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
    rows = study_table(study)
    count = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    run_id = study_run_id
    if run_id is None and _tracking_on(track):
        run_id = study_run(params, name, storage)
    if not count["COMPLETE"]:
        if run_id is not None:
            _end_study_run(run_id, "FAILED", close=True)
        raise TuneError(f"study {name!r} on {redact(storage)}: no trial completed "
                        f"({count['PRUNED']} pruned, {count['FAIL']} failed, of {len(rows)}); "
                        "widen tune.space, lower tune.pruner_startup_trials' strictness or run more trials")
    best = study.best_trial
    header = (f"Best values of Optuna study '{name}' (trial {best.number} of {len(rows)}, "
              f"validation macro-F1 {best.value:.4f}), written by `cladapter tune`.\n"
              f"Training uses them when tune.use_best is true: "
              f"defaults < params.yaml < this file < -S flags.")
    best_path = write_best_params(out_dir / BEST_FILE, dict(best.params), header)
    figures = write_figures(study, params, out_dir)
    summary = {"study_name": name, "storage": redact(normalize_storage(storage)),
               "best_value": best.value, "best_trial": best.number, "best_params": dict(best.params),
               "best_params_file": str(best_path), "objective": OBJECTIVE,
               "n_trials": len(rows), "complete": count["COMPLETE"], "pruned": count["PRUNED"],
               "failed": count["FAIL"], "running": count["RUNNING"],
               "epochs": sum(r["epochs"] for r in rows), "pruner": t["pruner"],
               "space": t["space"], "figures": figures}
    _atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    buf = io.StringIO()
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("param:"), k))
    fields = [f for f in ("number", "state", "value", "last_reported", "epochs", "worker", "seconds")
              if f in fields] + [f for f in fields if f.startswith("param:")]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(out_dir / "trials.csv", buf.getvalue())
    if run_id is not None:
        _log_results(run_id, out_dir, summary)
        _end_study_run(run_id, "FINISHED", close=True)
        summary["mlflow_run_id"] = run_id
    print(f"best: trial {best.number}, val macro-F1 {best.value:.4f}: "
          + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()))
    print(f"{len(rows)} trials ({count['COMPLETE']} completed, {count['PRUNED']} pruned, "
          f"{count['FAIL']} failed), {summary['epochs']} epochs; best params -> {best_path}")
    return summary


def _log_results(run_id: str, out_dir: Path, summary: dict) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from . import tracking
    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = {"best_value": summary["best_value"], "n_trials": summary["n_trials"],
               "complete": summary["complete"], "pruned": summary["pruned"],
               "failed": summary["failed"], "epochs": summary["epochs"]}
    with tracking._errors("logging the study's results"):
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        client.set_tag(run_id, "optuna.best_trial", str(summary["best_trial"]))
        for f in sorted(out_dir.iterdir()):
            if f.suffix in (".png", ".yaml", ".json", ".csv") and f.is_file() and not f.name.startswith("."):
                client.log_artifact(run_id, str(f), "tune")
