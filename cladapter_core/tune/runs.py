"""MLflow runs of a tuning session: one "study run" (a child of the pipeline's parent
run) and, nested under it, one run per trial with its parameters, per-epoch metrics and
outcome; the study's results are logged on the study run when it closes.

Workers in other processes or on other machines find the session's open study run by a
tag (`study_key`: study name + storage, no password). Closing moves the tag aside, so a
later session on the same study (a resume) gets its own study run.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path

from .. import identity, tracking
from ..tracking import redact_params
from ..params import flatten
from .storage import normalize_storage, redact

STUDY_TAG = "cladapter.optuna_study"          # on the open study run of a session
STUDY_CLOSED_TAG = "cladapter.optuna_study_closed"


def study_key(study_name: str, storage: str) -> str:
    """What the workers of one session search for: study name + storage (no password)."""
    blob = f"{study_name}\0{redact(normalize_storage(storage))}"
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param
    items = [Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000])
             for k, v in flatten(redact_params(params)).items()]  # never the storage's password
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


def _new_study_run(client, experiment_id: str, params: dict, study_name: str, storage: str,
                   data_hash: str | None, prepared=None, outer=None) -> str:
    """Create a study run under the `outer` run (`tracking.outer_run`), else under the
    pipeline's parent run; returns its id."""
    source_of = identity.source_hash(params["data"]["source"])
    pid = tracking.pipeline_id(params, source_of)
    tags = tracking.run_tags(params, "tune", data_hash or source_of)
    tags[tracking.PIPELINE_TAG] = pid
    parent = (outer.info.run_id if outer is not None
              else tracking.pipeline_parent(client, experiment_id, pid, params, dict(tags), prepared))
    tags.update({STUDY_TAG: study_key(study_name, storage), "optuna.study_name": study_name,
                 "mlflow.parentRunId": parent, "optuna.storage": redact(normalize_storage(storage))})
    if any(e["param"] == "model.num_centers" for e in params["tune"]["space"]):
        tags["K"] = "searched"
    return client.create_run(experiment_id, run_name=f"tune-{study_name}", tags=tags).info.run_id


def study_run(params: dict, study_name: str, storage: str, data_hash: str | None = None,
              prepared=None) -> str:
    """The MLflow run of this tuning session: the open one tagged with the study's key,
    else a new one (a child of the run its launcher opened, in that run's experiment, or of
    the pipeline's parent run, in the experiment of the `prepared` data). Workers starting
    together may each create one: all then keep the oldest and the others are deleted."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    mlflow.set_tracking_uri(tracking.tracking_uri())
    client = MlflowClient()
    outer = tracking.outer_run(client)
    cfg = {"experiment_id": outer.info.experiment_id} if outer else tracking.configure(params, prepared)
    flt = f"tags.`{STUDY_TAG}` = '{study_key(study_name, storage)}'"

    def open_runs():
        runs = client.search_runs([cfg["experiment_id"]], filter_string=flt,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    with tracking.errors(f"finding the MLflow run of study {study_name!r}"):
        found = open_runs()
        if found:
            run_id = found[0].info.run_id
        else:
            mine = _new_study_run(client, cfg["experiment_id"], params, study_name, storage, data_hash, prepared,
                                  outer)
            found = open_runs()
            run_id = found[0].info.run_id if found else mine
            if run_id != mine:
                client.delete_run(mine)
            else:
                _log_params(client, run_id, params)
                client.log_dict(run_id, redact_params(params), "params.json")
        client.update_run(run_id, status="RUNNING")
    return run_id


def pipeline_of(run_id: str) -> str:
    """The pipeline id tag of run `run_id` ('' when it cannot be read)."""
    from mlflow import MlflowClient
    try:
        return MlflowClient().get_run(run_id).data.tags.get(tracking.PIPELINE_TAG, "")
    except Exception:
        return ""


def end_study_run(run_id: str, status: str, close: bool) -> None:
    """End the study run (and its parent) with `status`; `close`: the next session on
    this study gets its own study run. A failure here warns: the results are written."""
    from mlflow import MlflowClient
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        if close:
            key = run.data.tags.get(STUDY_TAG)
            if key:
                client.set_tag(run_id, STUDY_CLOSED_TAG, key)
                client.delete_tag(run_id, STUDY_TAG)
        client.set_terminated(run_id, status=status)
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and tracking.is_ours(client, parent):  # an outer run is its launcher's to end
            client.set_terminated(parent, status=status)
    except Exception as e:
        warnings.warn(f"MLflow: could not end the study run {run_id} ({type(e).__name__}: {str(e)[:200]})")


def log_results(run_id: str, out_dir: Path, summary: dict) -> None:
    """The study's numbers as metrics of the study run, and the files of `out_dir`
    (pictures, best_params.yaml, summary.json, trials.csv) as its ``tune/`` artifacts."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = {k: summary[k] for k in ("best_value", "n_trials", "complete", "pruned", "failed", "epochs")}
    with tracking.errors("logging the study's results"):
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        client.set_tag(run_id, "optuna.best_trial", str(summary["best_trial"]))
        for f in sorted(out_dir.iterdir()):
            if f.suffix in (".png", ".yaml", ".json", ".csv") and f.is_file() and not f.name.startswith("."):
                client.log_artifact(run_id, str(f), "tune")


class TrialRun:
    """The MLflow run of one trial, nested under the study run (`study_run_id`; None:
    nothing is logged). Logging failures warn once and never stop the search (like
    tracking.EpochLogger)."""

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

    def start(self, trial, params: dict, values: dict, prepared_dir=None) -> None:
        """The trial's run: its values, params, and the data it trains on (`prepared_dir`,
        as dataset inputs train and val)."""
        def go():
            client = self._client()
            exp = client.get_run(self.parent).info.experiment_id
            tags = {**self.base_tags, "mlflow.parentRunId": self.parent, "cladapter.role": "trial",
                    "optuna.trial": str(trial.number), "K": str(params["model"]["num_centers"])}
            name = f"trial-{trial.number} " + tracking.run_name(params, "tune", prepared=prepared_dir)[len("tune "):]
            run = client.create_run(exp, run_name=name, tags=tags)
            self.run_id = run.info.run_id
            _log_params(client, self.run_id, params)
            client.log_dict(self.run_id, redact_params(values), "trial_params.json")
            if prepared_dir is not None:
                tracking.log_data_inputs(params, prepared_dir, ("train", "val"), run_id=self.run_id)
        self._safe(go)

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
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
