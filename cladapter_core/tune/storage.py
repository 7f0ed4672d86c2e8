"""Where studies live: an Optuna storage (SQLite by default, ``tune.storage``; a
PostgreSQL URL that workers on many machines share), and the study in it, created once
and resumed by name with its sampler and pruner."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..param_models import Tune
from ..errors import TuneError
from ..tracking.store import redact  # noqa: F401  (the one redaction; tune.redact is this)

DEFAULT_STORAGE = Tune.model_fields["storage"].default
SQLITE_TIMEOUT_S = 60      # workers on one SQLite file wait for each other's writes
PG_CONNECT_TIMEOUT_S = 10


def normalize_storage(url: str) -> str:
    """`postgresql://` and `postgres://` name the psycopg2 driver explicitly: SQLAlchemy
    would pick psycopg (3), which the platform does not install."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def _engine_kwargs(parsed, shown: str) -> dict[str, Any]:
    """SQLAlchemy engine options: a SQLite file's folder is made, connections time out."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    backend = parsed.get_backend_name()
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
    return kwargs


def open_storage(url: str):
    """An Optuna RDBStorage for `url`, checked by connecting; TuneError naming the URL."""
    import optuna
    import sqlalchemy
    from sqlalchemy.engine import make_url

    if not isinstance(url, str) or not url:
        raise TuneError(f"tune.storage: empty storage URL {url!r}")
    shown = redact(url)
    url = normalize_storage(url)
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        raise TuneError(f"tune.storage {shown!r} is not a database URL (expected e.g. "
                        "sqlite:///outputs/tune/optuna.db or postgresql://user@host:5432/db)") from e
    kwargs = _engine_kwargs(parsed, shown)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # driver missing, host down, bad credentials, not a database
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TuneError(f"tune.storage {shown}: cannot open the Optuna storage "
                        f"({type(e).__name__}: {first})") from e


def make_pruner(params: dict):
    """The Optuna pruner ``tune.pruner`` names, with its ``tune.pruner_*`` settings."""
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
    """The sampler's seed: ``tune.seed``, else the top-level ``seed``."""
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


def load_study(name: str, storage: str):
    """The existing study `name` on `storage` (for results once the workers are done)."""
    import optuna
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.load_study(study_name=name, storage=open_storage(storage))
