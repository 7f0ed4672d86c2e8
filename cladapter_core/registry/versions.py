"""Registered versions: their tags, reading an evaluation, and `register`."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

from .. import identity, tracking
from ..errors import TrackingError
from . import integrity, owners

log = logging.getLogger(__name__)


CHALLENGER, CHAMPION = "challenger", "champion"
STATE_TAG = "cladapter.registration"
METRIC_TAG = "metric."
TEST_METRIC_TAG = "test_metric."
LOCK_EXPERIMENT = "cladapter-promotion-locks"
LOCK_FOR_TAG = "cladapter.lock_for"       # on a lock run: the registered model it guards
STALE_LOCK_S = 120.0                      # a lock not renewed for this long is broken
OWNER_TAG = "cladapter.registered_by"     # on a version: the `register` process that made it
# A pending version (a registration in progress) older than this is taken for the leftover of
# a register that died on another machine, and deleted; a younger one is waited for.
STALE_PENDING_S = 600.0


# -- helpers ---------------------------------------------------------------------------
def _client():
    from mlflow import MlflowClient
    return MlflowClient()


def _code(e: Exception) -> str:
    return str(getattr(e, "error_code", ""))


def read_metrics(eval_dir: str | Path) -> dict[str, float]:
    """``eval_dir/metrics.json``: a flat ``{name: number}`` dict (null values are left out)."""
    path = Path(eval_dir) / "metrics.json"
    if not path.is_file():
        raise TrackingError(f"{path}: no such file (run `evaluate` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrackingError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise TrackingError(f"{path}: expected a flat {{name: number}} mapping")
    out = {}
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TrackingError(f"{path}: metric {k!r} must be a number, got {v!r}")
        out[str(k)] = float(v)
    return out


def read_decision(eval_dir: str | Path, metric: str) -> dict:
    """``eval_dir/decision_metrics.json`` (written by ``evaluate``): the split promotion
    decides on, its data identity and metrics, which must hold ``metric``."""
    path = Path(eval_dir) / "decision_metrics.json"
    if not path.is_file():
        raise TrackingError(f"{path}: no such file: run `cladapter evaluate` again (it writes the "
                            "metrics on register.split that promotion decides on)")
    try:
        data = json.loads(path.read_text())
        split, data_hash, metrics = data["split"], data["data_hash"], data["metrics"]
    except (ValueError, KeyError, TypeError) as e:
        raise TrackingError(f"{path}: not a decision-metrics file ({e})") from e
    value = metrics.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise TrackingError(f"{path}: no value for {metric!r} (register.metric) on the {split} split, "
                            f"which promotion compares; has: {', '.join(sorted(metrics)) or 'nothing'}")
    return {"split": split, "data_hash": data_hash, "metrics": {k: float(v) for k, v in metrics.items()}}


def _metric_of(version, metric: str) -> float | None:
    raw = version.tags.get(METRIC_TAG + metric)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _alias(client, name: str, alias: str):
    """The version an alias points at, or None (no such alias or model)."""
    from mlflow.exceptions import MlflowException
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _code(e) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _versions_with_tag(client, name: str, key: str, value: str) -> list:
    from mlflow.exceptions import MlflowException
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as e:
        if _code(e) == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted((v for v in versions if v.tags.get(key) == value), key=lambda v: int(v.version))


def _describe(version, created: bool | None = None) -> dict:
    out = {"name": version.name, "version": int(version.version),
           "model_uri": f"models:/{version.name}/{version.version}",
           "run_id": version.run_id, "source": version.source,
           "aliases": sorted(getattr(version, "aliases", []) or []),
           "metrics": {k[len(METRIC_TAG):]: float(v) for k, v in version.tags.items()
                       if k.startswith(METRIC_TAG)},
           "tags": dict(version.tags)}
    if created is not None:
        out["created"] = created
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- register --------------------------------------------------------------------------
def register(model_dir: str | Path, eval_dir: str | Path, params: dict, *,
             data_hash: str | None = None, stale_pending_after: float = STALE_PENDING_S) -> dict:
    """Register a trained model directory as a new version of
    ``params["register"]["model_name"]`` with alias ``challenger``.

    Logs into the active MLflow run, or opens a ``register`` stage run (see
    ``tracking.stage_run``): the test metrics (``test_<name>``), ``eval_dir`` as artifacts
    under ``evaluation/``, and the model as a pyfunc (``tracking.log_model``). The version
    is tagged with its run id, data hash, model hash, git commit and every metric of
    ``eval_dir/metrics.json`` (``metric.<name>``); that file must hold
    ``params["register"]["metric"]``.

    Idempotent: a model directory whose content was already registered returns that
    version (``"created": False``) and logs nothing. If anything fails after the version
    was created, the version is deleted (and the previous challenger keeps its alias), so
    no partial registration remains. A version of the same weights still being made
    (``cladapter.registration=pending``) by another live ``register`` is waited for and
    then returned, so two concurrent registrations of one model both succeed; one left by
    a killed process (on this machine: at once; elsewhere: once older than
    `stale_pending_after` seconds) is deleted and the model registered anew.

    The version also records every file of the logged model (``registry/integrity.py``:
    tags ``integrity.sha256`` and ``integrity.manifest``), which every load from the
    registry checks.

    Returns ``{"name", "version", "model_uri", "run_id", "source", "aliases", "metrics",
    "tags", "created"}``.
    """
    import mlflow

    model_dir, eval_dir = Path(model_dir), Path(eval_dir)
    reg = params["register"]
    name, metric = reg["model_name"], reg["metric"]
    metrics = read_metrics(eval_dir)
    decision = read_decision(eval_dir, metric)
    for f in ("config.json", "model.safetensors"):
        if not (model_dir / f).is_file():
            raise TrackingError(f"model directory {model_dir}: missing {f}")
    model_hash = identity.content_hash(model_dir)
    tracking.configure(params)
    client = _client()

    with tracking.errors(f"looking up registered model {name!r}"):
        done = _registered(client, name, model_hash, stale_pending_after)
        if done is not None:
            return _describe(done, created=False)

    active = mlflow.active_run()
    run_ctx = contextlib.nullcontext(active) if active is not None else \
        tracking.stage_run(params, "register", data_hash)
    with run_ctx as run:
        run_id = run.info.run_id
        with tracking.errors("logging evaluation metrics"):
            mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
            mlflow.log_metrics({f"{decision['split']}_{k}": v for k, v in decision["metrics"].items()})
        tracking.log_artifacts_dir(eval_dir, "evaluation")
        model_uri = tracking.log_model(model_dir)
        recorded = integrity.record(client, run_id, model_uri, model_hash)
        run_tags = client.get_run(run_id).data.tags
        tags = {"run_id": run_id, "model_hash": model_hash, **recorded, OWNER_TAG: owners.new_owner(),
                "data_hash": data_hash or run_tags.get("data_hash", "unknown"),
                "git_commit": run_tags.get("git_commit", "unknown"),
                "pipeline_id": run_tags.get(tracking.PIPELINE_TAG, "unknown"),
                "metric_split": decision["split"], "eval_data_hash": decision["data_hash"],
                STATE_TAG: "pending",
                **{METRIC_TAG + k: repr(v) for k, v in decision["metrics"].items()},
                **{TEST_METRIC_TAG + k: repr(v) for k, v in metrics.items()}}
        description = (f"{run_tags.get('backbone')} K={run_tags.get('K')} mode={run_tags.get('mode')}; "
                       f"{decision['split']} {metric}={decision['metrics'][metric]:.4f}")
        return _create_version(client, name, model_uri, tags, description)


def _registered(client, name: str, model_hash: str, stale_after: float, poll: float = 1.0):
    """The complete version of the weights `model_hash`, or None when there is none (yet).
    A pending one whose maker still runs is waited for; one whose maker is dead (or that is
    older than `stale_after` seconds) is deleted."""
    from mlflow.exceptions import MlflowException
    said = False
    while True:
        same = _versions_with_tag(client, name, "model_hash", model_hash)
        done = [v for v in same if v.tags.get(STATE_TAG) == "complete"]
        if done:
            return client.get_model_version(name, done[0].version)
        waiting = []
        for v in same:
            age = time.time() - (v.creation_timestamp or 0) / 1000
            maker = v.tags.get(OWNER_TAG)
            if age < stale_after and not owners.holder_gone(maker):
                waiting.append(f"v{v.version} ({maker or 'unknown maker'}, {age:.0f}s old)")
                continue
            log.warning("register: deleting %s v%s, a registration left half-made (%s, %.0fs old)",
                        name, v.version, maker or "unknown maker", age)
            try:  # half-made by a process that died mid-registration
                client.delete_model_version(name, v.version)
            except MlflowException as e:
                if _code(e) != "RESOURCE_DOES_NOT_EXIST":  # another register deleted it first
                    raise
        if not waiting:
            return None
        if not said:
            log.info("register: these weights of %s are being registered by another process: %s; "
                     "waiting for it to finish", name, ", ".join(waiting))
            said = True
        time.sleep(poll)


def _create_version(client, name: str, model_uri: str, tags: dict, description: str) -> dict:
    """Create the version, point ``challenger`` at it, mark it complete - or undo it all."""
    import mlflow
    from mlflow.exceptions import MlflowException

    created_model, version, previous = False, None, None
    try:
        with tracking.errors(f"registering {model_uri} as {name!r}"):
            try:
                client.create_registered_model(name, description="CLAdapter models; aliases "
                                               "`champion` (serve) and `challenger` (newest)")
                created_model = True
            except MlflowException as e:
                if _code(e) != "RESOURCE_ALREADY_EXISTS":
                    raise
            previous = _alias(client, name, CHALLENGER)
            mv = mlflow.register_model(model_uri, name, tags=tags)
            version = mv.version
            client.update_model_version(name, version, description=description)
            client.set_registered_model_alias(name, CHALLENGER, version)
            client.set_model_version_tag(name, version, STATE_TAG, "complete")
            return _describe(client.get_model_version(name, version), created=True)
    except BaseException:
        _undo(client, name, version, previous, created_model)
        raise


def _undo(client, name, version, previous, created_model) -> None:
    with contextlib.suppress(Exception):
        if version is not None:
            client.delete_model_version(name, version)
    with contextlib.suppress(Exception):
        if previous is not None and _alias(client, name, CHALLENGER) is None:
            client.set_registered_model_alias(name, CHALLENGER, previous.version)
    with contextlib.suppress(Exception):
        if created_model and not client.search_model_versions(f"name = '{name}'"):
            client.delete_registered_model(name)
