"""Stage runs and how the runs of one pipeline execution are grouped under a parent run."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .. import identity
from ..errors import TrackingError
from ..identity import dataset_name, git_commit
from ..settings import exported, settings
from .store import (PIPELINE_TAG, ROLE_TAG, _PARAM_MAX, configure, errors, redact, redact_params, run_name,
                    tracking_uri)

# -- grouping the runs of one pipeline execution -----------------------------------------
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


def pipeline_id(params: dict, source_of: str | None = None) -> str:
    """The id shared by all stage runs of one pipeline execution.

    ``$CLADAPTER_PIPELINE_ID`` when set (KFP passes its run id); else the first 16 hex of
    sha256(git commit, resolved params, `source_of`: ``identity.source_hash`` of
    ``data.source``, its text when there is none), so every stage of one ``dvc repro``
    (separate processes) finds the same parent run."""
    env = settings().pipeline_id.strip()
    if env:
        # The id is matched in a search filter: keep it to safe characters.
        return env if _SAFE_ID.match(env) else hashlib.sha256(env.encode()).hexdigest()[:16]
    commit, _ = git_commit()
    source = (params.get("data") or {}).get("source")
    source_of = source_of or identity.source_hash(source) or str(source)
    blob = json.dumps({"git": commit, "params": params, "data": source_of}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_tags(params: dict, stage: str, data_hash: str | None = None) -> dict[str, str]:
    """Tags every stage run carries: stage, backbone, K, mode, git commit, data hash."""
    m, t = params.get("model") or {}, params.get("train") or {}
    commit, dirty = git_commit()
    tags = {"stage": str(stage), "backbone": str(m.get("backbone")),
            "K": str(m.get("num_centers")), "mode": str(t.get("mode")),
            "git_commit": commit or "unknown", "git_dirty": str(dirty).lower(),
            "data_hash": data_hash or "unknown", ROLE_TAG: "stage"}
    return tags


def _param_value(v: Any) -> str:
    """A parameter's value as MLflow stores it: text, without credentials (`redact`)."""
    text = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return redact(text)[:_PARAM_MAX]


def pipeline_parent(client, experiment_id: str, pid: str, params: dict, tags: dict, prepared=None) -> str:
    """Run id of the parent run of pipeline execution `pid` in `experiment_id`: the
    oldest active run tagged with `pid` and role "pipeline", created (with `tags` less
    "stage", and the flattened `params`) when there is none. Stages or tuning sessions
    starting at the same moment may each create one: all then keep the oldest and the
    others are deleted. `client`: an ``mlflow.MlflowClient``."""
    from mlflow.entities import Param, ViewType

    flt = f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{ROLE_TAG}` = 'pipeline'"

    def parents():
        runs = client.search_runs([experiment_id], filter_string=flt,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = parents()
    if found:
        return found[0].info.run_id
    parent_tags = redact_params({k: v for k, v in tags.items() if k not in ("stage",)})
    parent_tags.update({PIPELINE_TAG: pid, ROLE_TAG: "pipeline"})
    mine = client.create_run(experiment_id, run_name=redact(f"pipeline {dataset_name(params, prepared)} {pid[:12]}"),
                             tags=parent_tags)
    client.log_batch(mine.info.run_id, params=[Param(k, _param_value(v))
                                               for k, v in _flat(params).items()])
    # Another stage may have created a parent at the same moment: all keep the oldest.
    found = parents()
    winner = found[0].info.run_id if found else mine.info.run_id
    if winner != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return winner


def outer_run(client):
    """The run this process was started inside, when the platform nests under it: the run
    of ``$MLFLOW_RUN_ID`` (KFP 2.17's MLflow integration opens one per task and injects
    it; so does ``mlflow run``) unless ``CLADAPTER_OUTER_RUN=own``. None otherwise.

    Nesting under it, in its experiment, keeps one tree per pipeline run instead of the
    launcher's and a second parent of our own; the outer run itself is the launcher's to
    name and end. `client`: an ``mlflow.MlflowClient``."""
    s = settings()
    if s.outer_run == "own" or not s.mlflow_run_id:
        return None
    with errors(f"reading the run that $MLFLOW_RUN_ID names ({s.mlflow_run_id}); "
                "set CLADAPTER_OUTER_RUN=own to ignore it"):
        run = client.get_run(s.mlflow_run_id.strip())
    if run.info.lifecycle_stage != "active":
        raise TrackingError(f"$MLFLOW_RUN_ID names the deleted run {run.info.run_id}: restore it, "
                            "or set CLADAPTER_OUTER_RUN=own to ignore it")
    return run


def is_ours(client, run_id: str) -> bool:
    """Whether `run_id` is a parent run this platform made (role "pipeline"), which it may
    name, tag and end; an outer run is its launcher's."""
    return client.get_run(run_id).data.tags.get(ROLE_TAG) == "pipeline"


def start_run_here(**kwargs):
    """``mlflow.start_run`` that never resumes ``$MLFLOW_RUN_ID``: MLflow would log into
    that run (and delete the variable) instead of starting the run asked for."""
    import mlflow
    with exported(mlflow_run_id=None):
        return mlflow.start_run(**kwargs)


def end_run_here(status: str) -> None:
    """``mlflow.end_run``, which also deletes ``$MLFLOW_RUN_ID``: the variable is kept for
    the rest of the step (its next runs, the processes it starts)."""
    import mlflow
    with exported(mlflow_run_id=settings().mlflow_run_id):
        mlflow.end_run(status)


def _flat(params: dict) -> dict:
    from ..params import flatten
    return flatten(params)


@contextlib.contextmanager
def stage_run(params: dict, stage: str, data_hash: str | None = None, prepared=None, *,
              name: str | None = None):
    """Run one pipeline stage inside an MLflow run; yields the active ``mlflow.ActiveRun``.
    The run is named `name`, else ``run_name(params, stage)`` (what ran); its ``stage`` tag
    is `stage`.

    The run is a child of the active run when one is open in this process (e.g. tuning
    trials under the tune stage), else of the run its launcher opened (``outer_run``:
    KFP 2.17's task run, in that run's experiment), else of the pipeline's parent run
    (see ``pipeline_id``). It gets the flattened params, ``params.json`` and the tags of
    ``run_tags`` (``data_hash``: the given one, else ``identity.data_hash(prepared)`` when the stage's
    prepared folder is given, else the hash of ``data.source``). It ends FINISHED, or
    FAILED when the body raises; the parent's status follows its latest stage.

    Example::

        tracking.check_tracking()
        with tracking.stage_run(params, "train-stage1", prepared=prepared):
            train.train(params, prepared, out, stage=1, callbacks=[tracking.EpochLogger()])
            tracking.log_artifacts_dir(out, "model_dir")
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    outer = outer_run(client) if mlflow.active_run() is None else None
    cfg = None if outer else configure(params, prepared)
    if data_hash is None and prepared is not None and (Path(prepared) / "manifest.csv").is_file():
        data_hash = identity.data_hash(prepared)
    needs_source = data_hash is None or not settings().pipeline_id
    source_of = identity.source_hash((params.get("data") or {}).get("source")) if needs_source else None
    pid = pipeline_id(params, source_of)
    tags = run_tags(params, stage, data_hash or source_of)
    tags[PIPELINE_TAG] = pid
    active = mlflow.active_run()
    with errors(f"starting the MLflow run of stage {stage!r}"):
        if active is not None:
            parent_id, experiment_id = active.info.run_id, active.info.experiment_id
        elif outer is not None:
            parent_id, experiment_id = outer.info.run_id, outer.info.experiment_id
        else:
            experiment_id = cfg["experiment_id"]
            parent_id = pipeline_parent(client, experiment_id, pid, params, tags, prepared)
            client.update_run(parent_id, status="RUNNING")
        tags["mlflow.parentRunId"] = parent_id
        shown = redact(name or run_name(params, stage, prepared=prepared))
        run = start_run_here(experiment_id=experiment_id, run_name=shown, tags=redact_params(tags),
                             nested=active is not None)
    status = "FAILED"
    try:
        try:
            with errors(f"logging the params of stage {stage!r}"):
                client.log_batch(run.info.run_id, params=[
                    Param(k, _param_value(v)) for k, v in _flat(params).items()])
                mlflow.log_dict(redact_params(params), "params.json")  # never a password
            yield run
            status = "FINISHED"
        finally:
            # Not `with run:` - closing the run on a server that went away must neither
            # hide the stage's own error nor end the stage in a raw traceback.
            if status == "FINISHED":
                with errors(f"ending the MLflow run of stage {stage!r}"):
                    end_run_here(status)
            else:
                with contextlib.suppress(Exception):
                    end_run_here(status)
    finally:
        if active is None and outer is None:
            with contextlib.suppress(Exception):  # cosmetic: the parent shows the last status
                client.set_terminated(parent_id, status=status)


def _active_run_id(what: str) -> str:
    import mlflow
    run = mlflow.active_run()
    if run is None:
        raise TrackingError(f"{what} needs an active MLflow run: call it inside "
                            "`with tracking.stage_run(params, stage):`")
    return run.info.run_id
