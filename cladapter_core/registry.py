"""The MLflow model registry: register a trained, evaluated model; promote it; show its lineage.

Aliases (not the deprecated stages): ``challenger`` is the newest registration,
``champion`` the model to serve (``models:/<name>@champion``).

Version tags written by ``register``: ``run_id``, ``data_hash``, ``model_hash`` (content
hash of the model directory: what makes re-registration idempotent), ``git_commit``,
``pipeline_id``, ``metric.<name>`` for every metric on the decision split
(``register.split``, validation by default; ``metric_split`` names it and
``eval_data_hash`` identifies its data), ``test_metric.<name>`` for the reported split
(information only: promotion never reads it), and ``cladapter.registration`` =
``pending`` while being made, ``complete`` when done.

``promote`` decides on the decision split only, and compares two versions only when both
were measured on the same data (``eval_data_hash``) and split; otherwise it re-evaluates
the champion on the challenger's data first (the prepared folder must be at hand), or
refuses. It writes the decision with its evidence on the candidate (``promotion.decision``,
``.reason``, ``.compared_with``, ``.metric``, ``.split``, ``.data_hash``,
``.candidate_value``, ``.champion_value``, ``.champion_reevaluated``, ``.time``) and
``promotion.replaced_by`` on the old champion.

Concurrent promotions are serialised by a lock built on the one write-once value MLflow
has: a run parameter. Logging a parameter key a second time with another value is refused
by every database-backed store (the unique key (run, key); INVALID_PARAMETER_VALUE), over
the REST API too. The lock of model ``<name>`` is a run in the experiment
``cladapter-promotion-locks`` (tag ``cladapter.lock_for = <name>``, a run, not a
registered model: the registry shows only real models); its parameters are numbered
slots: ``lock.<n>`` names the holder of the n-th promotion and the time it began,
``release.<n>`` ends it (written by the holder, or by whoever breaks a dead holder's lock).
To take the lock a promoter writes ``lock.<n+1>`` after the last slot ``n`` was released;
only one writer gets a given slot. So two ``promote`` commands against the same server (or
SQLite file) run one after the other, and the second compares against the champion the
first left: the better model ends as the one champion. A lock older than
``STALE_LOCK_S``, or one whose holder on this machine no longer runs (a killed promote),
is broken. Should two first promotions of a model each create a lock run, both take every
lock run they see, in order: the first run created is seen by all, so they still exclude
each other. The plain-file store (``./mlruns``) cannot refuse a parameter atomically: use a
database (``sqlite:///mlflow.db``, the default) or a server for concurrent promotions.
"""
from __future__ import annotations

import logging
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from . import identity, tracking
from .errors import TrackingError
from .settings import settings, var

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
STATE_TAG = "cladapter.registration"
METRIC_TAG = "metric."
TEST_METRIC_TAG = "test_metric."
LOCK_EXPERIMENT = "cladapter-promotion-locks"
LOCK_FOR_TAG = "cladapter.lock_for"       # on a lock run: the registered model it guards
LOCK_SUFFIX = ".promotion-lock"           # the registered model older versions used as a lock
STALE_LOCK_S = 120.0


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
             data_hash: str | None = None) -> dict:
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
    no partial registration remains; a half-made version left by a killed process is
    removed by the next ``register`` of the same model.

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
        same = _versions_with_tag(client, name, "model_hash", model_hash)
        done = [v for v in same if v.tags.get(STATE_TAG) == "complete"]
        if done:
            return _describe(client.get_model_version(name, done[0].version), created=False)
        for stale in same:  # half-made by a process that died mid-registration
            client.delete_model_version(name, stale.version)

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
        run_tags = client.get_run(run_id).data.tags
        tags = {"run_id": run_id, "model_hash": model_hash,
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


# -- promote ---------------------------------------------------------------------------
def _host() -> str:
    """This machine (and PID namespace: containers may share a host name)."""
    try:
        return f"{socket.gethostname()}#{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _holder_gone(owner: str | None) -> bool:
    """A lock taken on this machine by a process that no longer exists (a promote killed
    while holding it) is broken at once instead of after ``STALE_LOCK_S``."""
    host, _, rest = (owner or "").rpartition(":")[0].rpartition(":")
    if host != _host() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _lock_runs(client, name: str) -> list[str]:
    """Ids of the lock runs of registered model `name`, created when there is none."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    exp = client.get_experiment_by_name(LOCK_EXPERIMENT)
    if exp is None:
        try:
            exp_id = client.create_experiment(LOCK_EXPERIMENT, tags={
                "mlflow.note.content": "Promotion locks of `cladapter promote` (one run per "
                                       "registered model). Do not delete."})
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp_id = client.get_experiment_by_name(LOCK_EXPERIMENT).experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage != "active":
            client.restore_experiment(exp_id)
    flt = f"tags.`{LOCK_FOR_TAG}` = '{name}'"

    def search():
        return sorted(r.info.run_id for r in client.search_runs(
            [exp_id], flt, run_view_type=ViewType.ACTIVE_ONLY, max_results=100))

    found = search()
    if not found:
        run = client.create_run(exp_id, run_name=f"promotion lock: {name}", tags={
            LOCK_FOR_TAG: name, "mlflow.note.content": f"Promotion lock of registered model "
                                                     f"{name!r}: lock.<n> / release.<n>"})
        client.set_terminated(run.info.run_id)  # its parameters still take writes
        found = search()
    return found


def _write_once(client, run_id: str, key: str, value: str) -> bool:
    """Log parameter `key` = `value`; True when it now holds `value`, False when another
    writer's value was there first."""
    from mlflow.exceptions import MlflowException
    try:
        client.log_param(run_id, key, value, synchronous=True)
        return True
    except MlflowException:
        held = client.get_run(run_id).data.params.get(key)
        if held is None:
            raise
        return held == value


def _lock_state(params: dict) -> tuple[int, str | None, float]:
    """(last slot n, its holder or None when released/never taken, when it was taken)."""
    slots = [int(k[5:]) for k in params if k.startswith("lock.") and k[5:].isdigit()]
    n = max(slots, default=0)
    if n == 0 or f"release.{n}" in params:
        return n, None, 0.0
    holder, _, since = params[f"lock.{n}"].rpartition("@")
    try:
        return n, holder, float(since)
    except ValueError:
        return n, holder, 0.0


def _take(client, run_id: str, name: str, owner: str, deadline: float,
          stale_after: float) -> int:
    """Take the lock run `run_id`; returns the slot taken."""
    while True:
        n, holder, since = _lock_state(client.get_run(run_id).data.params)
        if holder is None:
            now = math.floor(time.time() * 1000) / 1000  # never after the clock: age >= 0
            if _write_once(client, run_id, f"lock.{n + 1}", f"{owner}@{now:.3f}"):
                return n + 1
            continue  # another promoter took slot n + 1 first
        age = time.time() - since
        if age >= stale_after or _holder_gone(holder):  # its holder died: break it
            _write_once(client, run_id, f"release.{n}", f"broken by {owner} after {age:.0f}s")
            continue
        if time.monotonic() > deadline:
            raise TrackingError(f"registered model {name!r}: another promotion holds the lock "
                                f"({holder}, {age:.0f}s; run {run_id} of experiment "
                                f"{LOCK_EXPERIMENT!r}, parameter lock.{n}); retry later, or "
                                f"log parameter release.{n} on that run if no promote is running")
        time.sleep(0.2 + random.random() * 0.3)


@contextlib.contextmanager
def promotion_lock(name: str, timeout: float = 120.0, stale_after: float = STALE_LOCK_S):
    """Hold the promotion lock of registered model ``name`` (see the module docstring)."""
    client = _client()
    owner = f"{_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout
    held: list[tuple[str, int]] = []
    try:
        with tracking.errors(f"taking the promotion lock of {name!r}"):
            for run_id in _lock_runs(client, name):
                held.append((run_id, _take(client, run_id, name, owner, deadline, stale_after)))
        yield owner
    finally:
        for run_id, n in reversed(held):
            with contextlib.suppress(Exception):
                _write_once(client, run_id, f"release.{n}", owner)


def promote(params: dict, dry_run: bool = False, *, version: int | str | None = None,
            lock_timeout: float = 120.0, prepared_dir: str | Path | None = None) -> dict:
    """Make the candidate (``version``, default the ``challenger``) the ``champion`` when its
    metric ``params["register"]["metric"]`` on the decision split beats the champion's by
    at least ``params["register"]["margin"]`` (and by more than 0); the first model becomes
    champion.

    Both values must come from the same evaluation data and split. When the champion was
    measured on other data (another data version, another split, or test metrics of an
    older registration), it is re-evaluated on the candidate's data, the prepared folder
    ``prepared_dir`` (whose manifest must be the candidate's), before deciding; without
    ``prepared_dir`` that is a TrackingError and nothing changes.

    The decision and its evidence are written on the candidate as tags. ``dry_run=True``
    decides and returns the same answer but writes nothing and takes no lock. Concurrent
    promotions are serialised (``promotion_lock``).

    Returns ``{"model_name", "metric", "margin", "split", "data_hash", "candidate",
    "candidate_value", "champion_before", "champion_value", "champion_reevaluated",
    "champion_after", "decision" ("promoted" | "rejected" | "unchanged"), "reason", "dry_run"}``.
    """
    reg = params["register"]
    name, metric, margin = reg["model_name"], reg["metric"], float(reg["margin"])
    tracking.configure(params)
    client = _client()
    lock = contextlib.nullcontext() if dry_run else promotion_lock(name, lock_timeout)
    with lock:
        with tracking.errors(f"reading registered model {name!r}"):
            candidate = _candidate(client, name, version)
            champion = _alias(client, name, CHAMPION)
        champion_value = None
        if champion is not None and champion.version != candidate.version and not same_evaluation(candidate, champion):
            champion_value = reevaluate(champion, candidate, metric, params, prepared_dir)
        result = decide(candidate, champion, metric, margin, champion_value=champion_value)
        result.update(model_name=name, dry_run=dry_run)
        if not dry_run and result["decision"] != "unchanged":
            with tracking.errors(f"writing the promotion of {name!r} v{candidate.version}"):
                _apply(client, name, candidate, champion, result)
    return result


def _candidate(client, name: str, version):
    if version is not None:
        return client.get_model_version(name, str(version))
    candidate = _alias(client, name, CHALLENGER)
    if candidate is None:
        raise TrackingError(f"registered model {name!r} has no {CHALLENGER!r} version: run `register` first")
    return candidate


def _evaluation_of(version) -> tuple[str | None, str | None]:
    return version.tags.get("metric_split"), version.tags.get("eval_data_hash")


def same_evaluation(a, b) -> bool:
    """Were both versions' decision metrics measured on the same data and split?"""
    split, data = _evaluation_of(a)
    return split is not None and data is not None and split != "test" and (split, data) == _evaluation_of(b)


def reevaluate(champion, candidate, metric: str, params: dict, prepared_dir) -> float:
    """The champion's `metric` on the candidate's evaluation data (its split of `prepared_dir`)."""
    from .distributed import pick_device
    from .evaluate import decision_metrics
    from .model import load_model
    split, data_hash = _evaluation_of(candidate)
    where = (f"champion v{champion.version} was measured on split {_evaluation_of(champion)[0]!r} of data "
             f"{str(_evaluation_of(champion)[1])[:12]}, the challenger v{candidate.version} on split "
             f"{split!r} of data {str(data_hash)[:12]}")
    if prepared_dir is None:
        raise TrackingError(f"{where}: the two cannot be compared. Pass the challenger's prepared data "
                            "(`cladapter promote --prepared DIR`) to re-evaluate the champion on it first; "
                            f"v{champion.version} stays champion")
    found = identity.data_hash(prepared_dir) if (Path(prepared_dir) / "manifest.csv").is_file() else "no manifest.csv"
    if found != data_hash:
        raise TrackingError(f"{prepared_dir}: not the data the challenger v{candidate.version} was evaluated "
                            f"on (manifest hash {found[:16]} != {str(data_hash)[:16]})")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, _ = resolve_model(f"models:/{champion.name}/{champion.version}", cache_dir=tmp)
        model = load_model(model_dir)
        found = decision_metrics(model, Path(prepared_dir), params, pick_device(), split=split)
    value = found["metrics"].get(metric)
    if value is None or math.isnan(value):
        raise TrackingError(f"champion v{champion.version}: {metric} undefined on the {split} split of "
                            f"{prepared_dir}; cannot compare")
    log.info("promote: %s; champion re-evaluated on the challenger's data: %s=%.4f", where, metric, value)
    return float(value)


def decide(candidate, champion, metric: str, margin: float, champion_value: float | None = None) -> dict:
    """The promotion decision for two model versions (no side effects). `champion_value`:
    the champion re-evaluated on the candidate's data (else its own tag is used, which
    must come from the same data and split)."""
    if candidate.tags.get(STATE_TAG, "complete") != "complete":
        raise TrackingError(f"{candidate.name!r} v{candidate.version} is a half-made registration "
                            "(cladapter.registration=pending): run `register` again")
    split, data_hash = _evaluation_of(candidate)
    cand_v = _metric_of(candidate, metric)
    if cand_v is None or split in (None, "test"):
        raise TrackingError(f"{candidate.name!r} v{candidate.version} has no {metric!r} on a decision "
                            f"split (tag {METRIC_TAG}{metric}, metric_split {split!r}; test metrics never "
                            "decide): register it again with this version of cladapter")
    out = {"metric": metric, "margin": margin, "split": split, "data_hash": data_hash,
           "candidate": int(candidate.version), "candidate_value": cand_v, "champion_before": None,
           "champion_value": None, "champion_reevaluated": champion_value is not None}
    if champion is None:
        return {**out, "champion_after": out["candidate"], "decision": "promoted",
                "reason": f"first model: no champion yet ({split} {metric}={cand_v:.4f})"}
    out["champion_before"] = int(champion.version)
    if champion.version == candidate.version:
        return {**out, "champion_value": cand_v, "champion_after": out["candidate"],
                "decision": "unchanged", "reason": f"v{candidate.version} is already the champion"}
    return _compare_with_champion(out, champion, metric, margin, champion_value)


def _compare_with_champion(out: dict, champion, metric: str, margin: float, champion_value) -> dict:
    champ_v = champion_value if champion_value is not None else _metric_of(champion, metric)
    if champ_v is None:
        raise TrackingError(
            f"champion {champion.name!r} v{champion.version} has no metric {metric!r} "
            f"(tag {METRIC_TAG}{metric}), so v{out['candidate']} cannot be compared with it; "
            f"v{champion.version} stays champion. Tag it with its metric, or move the alias "
            "by hand if it should go")
    out["champion_value"] = champ_v
    cand_v, diff = out["candidate_value"], out["candidate_value"] - champ_v
    on = f"{out['split']} {metric}" + (" (champion re-evaluated on the same data)" if champion_value is not None else "")
    if diff > 0 and diff >= margin:
        return {**out, "champion_after": out["candidate"], "decision": "promoted",
                "reason": f"{on} {cand_v:.4f} vs champion v{champion.version} "
                          f"{champ_v:.4f}: {diff:+.4f} >= margin {margin:g}"}
    why = "not better" if diff <= 0 else f"below margin {margin:g}"
    return {**out, "champion_after": out["champion_before"], "decision": "rejected",
            "reason": f"{on} {cand_v:.4f} vs champion v{champion.version} "
                      f"{champ_v:.4f}: {diff:+.4f}, {why}"}


def _apply(client, name: str, candidate, champion, result: dict) -> None:
    # The alias moves last: a promote killed before it leaves the old champion serving
    # and its rerun decides and writes everything again; killed after it, nothing is left
    # to write (its rerun finds the candidate already champion).
    v = candidate.version
    evidence = {"decision": result["decision"], "reason": result["reason"],
                "compared_with": str(result["champion_before"] or "none"), "metric": result["metric"],
                "split": result["split"], "data_hash": str(result["data_hash"]),
                "candidate_value": repr(result["candidate_value"]),
                "champion_value": repr(result["champion_value"]),
                "champion_reevaluated": str(result["champion_reevaluated"]).lower(), "time": _now()}
    for key, value in evidence.items():
        client.set_model_version_tag(name, v, f"promotion.{key}", value)
    if result["decision"] == "promoted":
        if champion is not None:
            client.set_model_version_tag(name, champion.version, "promotion.replaced_by", str(v))
        client.set_registered_model_alias(name, CHAMPION, v)


# -- lineage ---------------------------------------------------------------------------
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
MODEL_CACHE_ENV = var("model_cache")  # CLADAPTER_MODEL_CACHE


def is_model_uri(text) -> bool:
    """Does `text` name a registered model (``models:/...``) rather than a folder?"""
    return str(text).startswith("models:/")


def model_version(model_uri: str, client=None):
    """The registered version behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
    in the configured store; a TrackingError naming the store when the model, alias or
    version is not there (and which models or aliases are)."""
    from mlflow.exceptions import MlflowException
    m = _URI.match(model_uri or "")
    if not m:
        raise TrackingError(f"model URI {model_uri!r}: expected models:/<name>@<alias> "
                            "or models:/<name>/<version>")
    name, client = m["name"], client or _client()
    store = tracking._redact(tracking.tracking_uri())
    with tracking.errors(f"looking up {model_uri}"):
        try:
            model = client.get_registered_model(name)
        except MlflowException as e:
            if _code(e) not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
            names = sorted(r.name for r in client.search_registered_models(max_results=50))
            raise TrackingError(f"{model_uri}: no registered model {name!r} in the store {store} "
                                f"(registered there: {', '.join(names) or 'none'})") from None
        if m["alias"]:
            mv = _alias(client, name, m["alias"])
            if mv is None:
                aliases = ", ".join(f"{a} (v{v})" for a, v in sorted((model.aliases or {}).items()))
                raise TrackingError(f"{model_uri}: registered model {name!r} in the store {store} has "
                                    f"no alias {m['alias']!r} (its aliases: {aliases or 'none'})")
            return mv
        try:
            return client.get_model_version(name, m["version"])
        except MlflowException as e:
            if _code(e) not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
                raise
            raise TrackingError(f"{model_uri}: registered model {name!r} in the store {store} has no "
                                f"version {m['version']}") from None


def model_cache_dir() -> Path:
    """Where registered models are downloaded: ``$CLADAPTER_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/cladapter/models`` (``~/.cache/cladapter/models``)."""
    s = settings()
    if s.model_cache:
        return s.model_cache
    base = s.xdg_cache_home or Path.home() / ".cache"
    return Path(base) / "cladapter" / "models"


def resolve_model(model: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, dict | None]:
    """A model folder for `model`, and the registered version it came from (None for a folder).

    A folder is returned as given. ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
    is looked up in the configured store (``tracking.tracking_uri()``; call
    ``tracking.check_tracking(existing=True)`` first so a missing store is not created), and
    the version's model folder (the pyfunc artifact ``model_dir``, ``serving.model_dir_in``)
    is downloaded once into `cache_dir` (default ``model_cache_dir()``), keyed by store,
    name, version and source, and checked against the version's ``model_hash`` tag.
    """
    import mlflow

    if not is_model_uri(model):
        return Path(model), None
    mv = model_version(str(model))
    info = _describe(mv)
    store = tracking.tracking_uri()
    key = hashlib.sha256("\0".join([tracking._redact(store), mv.name, str(mv.version), str(mv.source),
                                     str(mv.creation_timestamp)]).encode()).hexdigest()[:16]
    folder = Path(cache_dir or model_cache_dir()) / f"{_safe_name(mv.name)}-v{mv.version}-{key}"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)  # a copy left half-made
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
            with tracking.errors(f"downloading {model} ({mv.name} v{mv.version})"):
                local = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=tmp))
            _place(local, folder, mv)
    return folder, info


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:80] or "model"


def _place(local: Path, folder: Path, mv) -> None:
    """Move the model folder of the downloaded MLflow model `local` to `folder`, once its
    content matches the version's ``model_hash`` tag."""
    from . import serving
    try:
        found = serving.model_dir_in(local)
    except ValueError as e:
        raise TrackingError(f"models:/{mv.name}/{mv.version}: {e}") from None
    want = mv.tags.get("model_hash")
    if want and identity.content_hash(found) != want:
        raise TrackingError(f"models:/{mv.name}/{mv.version}: the downloaded model folder does not "
                            f"match the version's model_hash tag {want} (a changed or partial artifact)")
    try:
        os.replace(found, folder)       # atomic: a reader never sees half a folder
    except OSError as e:
        if not (folder / "model.safetensors").is_file():  # not another process's copy: a real error
            raise TrackingError(f"cannot place the model folder in {folder}: {e}") from e


def lineage(model_uri: str) -> dict:
    """The chain behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: the
    registered version (aliases, tags, test metrics), its run, the git commit, the data
    hash, the parameters, and the other stage runs of the same pipeline execution.
    Uses the tracking URI as configured (``tracking.configure``)."""
    from mlflow.entities import ViewType

    client = _client()
    mv = model_version(model_uri, client)
    with tracking.errors(f"looking up {model_uri}"):
        out = {"model_uri": model_uri, "model": _describe(mv), "run": None,
               "git_commit": mv.tags.get("git_commit"), "data_hash": mv.tags.get("data_hash"),
               "model_hash": mv.tags.get("model_hash"), "params": {}, "pipeline": None}
        if not mv.run_id:
            return out
        run = client.get_run(mv.run_id)
        t = run.data.tags
        out["run"] = {"run_id": run.info.run_id, "name": run.info.run_name,
                      "stage": t.get("stage"), "status": run.info.status,
                      "experiment_id": run.info.experiment_id,
                      "artifact_uri": run.info.artifact_uri,
                      "start": _ms(run.info.start_time), "end": _ms(run.info.end_time)}
        out["git_commit"] = out["git_commit"] or t.get("git_commit")
        out["git_dirty"] = t.get("git_dirty")
        out["data_hash"] = out["data_hash"] or t.get("data_hash")
        out["params"] = dict(sorted(run.data.params.items()))
        parent = t.get("mlflow.parentRunId")
        if parent:
            children = client.search_runs([run.info.experiment_id],
                                          f"tags.`mlflow.parentRunId` = '{parent}'",
                                          run_view_type=ViewType.ACTIVE_ONLY, max_results=200)
            out["pipeline"] = {
                "pipeline_id": t.get(tracking.PIPELINE_TAG), "parent_run_id": parent,
                "stages": [{"stage": c.data.tags.get("stage"), "run_id": c.info.run_id,
                            "status": c.info.status, "start": _ms(c.info.start_time)}
                           for c in sorted(children, key=lambda c: c.info.start_time)]}
    return out


def _ms(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def format_lineage(info: dict) -> str:
    """A printable form of ``lineage()``."""
    mv, run = info["model"], info["run"]
    lines = [f"{info['model_uri']}  ->  {mv['name']} v{mv['version']}"
             + (f"  [{', '.join(mv['aliases'])}]" if mv["aliases"] else ""),
             "  metrics:    " + (", ".join(f"{k}={v:.4f}" for k, v in sorted(mv["metrics"].items()))
                                 or "-"),
             f"  source:     {mv['source']}"]
    if run:
        lines.append(f"  run:        {run['run_id']} ({run['name']}, {run['status']})")
    lines += [f"  git commit: {info.get('git_commit') or '-'}"
              + (" (dirty)" if info.get("git_dirty") == "true" else ""),
              f"  data hash:  {info.get('data_hash') or '-'}",
              f"  model hash: {info.get('model_hash') or '-'}"]
    if info.get("pipeline"):
        p = info["pipeline"]
        lines.append(f"  pipeline:   {p['pipeline_id']} (parent run {p['parent_run_id']})")
        lines += [f"    - {s['stage']}: {s['run_id']} {s['status']}" for s in p["stages"]]
    if info["params"]:
        lines.append("  params:")
        lines += [f"    {k} = {v}" for k, v in info["params"].items()]
    return "\n".join(lines)
