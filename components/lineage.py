"""Lineage of a pipeline run in MLflow: what every stage run of a KFP run is tagged with,
the parent run named after the KFP run, and the exit handler that closes it.

Tags set on each stage run and on the parent run (besides the core's `tracking.run_tags`):

- `git_commit`: the commit the image was built from (`$CLADAPTER_GIT_COMMIT`, set by the
  Dockerfile's `GIT_COMMIT` build argument; the image has no `.git`).
- `image`: the image the steps run in (`$CLADAPTER_IMAGE`, set on every step at compile time).
- `kfp.run_id`, `kfp.run_name`: the KFP run.
- `data_hash`: the prepared data's one identity, `identity.data_hash` (the hash of the
  manifest, which lists every file's pixel hash, label and split).
- `dataset_uri`, `dataset_rev`: where the files are; for a DVC repository the revision as
  the commit SHA it resolved to when the run prepared its data.

Nothing here imports kfp.
"""
from __future__ import annotations

import os

from cladapter_core.settings import settings, var
from cladapter_core.tracking.store import redact

GIT_ENV, IMAGE_ENV = var("git_commit"), var("image")
RUN_NAME_TAG = "mlflow.runName"
FINAL_STATE_TAG = "kfp.final_state"


def lineage_tags(pipeline_id: str = "", pipeline_name: str = "", data_hash: str = "",
                 source: dict | None = None) -> dict[str, str]:
    """The tags above that are known here (empty values left out)."""
    tags = {"kfp.run_id": pipeline_id, "kfp.run_name": pipeline_name,
            # the image only when the step says which: settings().image would give the default
            "image": os.environ.get(IMAGE_ENV, ""), "data_hash": data_hash}
    commit = settings().git_commit.strip()
    if commit and commit != "unknown":
        tags.update(git_commit=commit, git_dirty="false")
    for key in ("uri", "rev"):
        if source and source.get(key):
            tags[f"dataset_{key}"] = str(source[key])
    # a DVC repository's git URL may carry a token: tags never hold a credential
    return {k: redact(str(v)) for k, v in tags.items() if v and "{{" not in str(v)}


def tag_stage_and_parent(run, tags: dict[str, str], pipeline_name: str = "") -> None:
    """Tag the active stage run and its parent; the parent is named after the KFP run. A
    parent that KFP's MLflow integration opened (`tracking.outer_run`) is KFP's to name."""
    import mlflow
    from mlflow import MlflowClient

    from cladapter_core import tracking
    if tags:
        mlflow.set_tags(tags)
    parent = run.data.tags.get("mlflow.parentRunId")
    client = MlflowClient()
    if parent and tracking.is_ours(client, parent):
        for key, value in tags.items():
            client.set_tag(parent, key, value)
        if pipeline_name and "{{" not in pipeline_name:
            client.set_tag(parent, RUN_NAME_TAG, pipeline_name)


def tag_model_version(name: str, version: str, tags: dict[str, str]) -> None:
    """The registered version carries the same lineage as its runs."""
    from mlflow import MlflowClient
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def close_pipeline_run(pipeline_id: str, pipeline_name: str, state: str, error: str = "") -> str:
    """Exit handler of a KFP run. Finds the MLflow runs tagged with the run's pipeline id in
    every active experiment; when the run did not succeed (a step failed, its pod was
    killed, the run was cancelled) each of them still RUNNING ends FAILED, the parent
    included. Every parent gets `kfp.final_state` and, given one, the KFP run's name."""
    from mlflow import MlflowClient

    from cladapter_core import tracking
    tracking.check_tracking()
    client = MlflowClient(tracking.tracking_uri())
    pid = tracking.pipeline_id({}) if settings().pipeline_id else pipeline_id
    with tracking.errors(f"closing the MLflow runs of pipeline run {pid}"):
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.`{tracking.PIPELINE_TAG}` = '{pid}'",
                                  max_results=5000) if experiments else []
        failed = str(state).upper() not in ("SUCCEEDED", "SUCCESS")
        closed = []
        for r in runs:
            if failed and r.info.status == "RUNNING":
                client.set_terminated(r.info.run_id, status="FAILED")
                closed.append(r.info.run_id)
        parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "pipeline"]
        for r in parents:
            client.set_tag(r.info.run_id, FINAL_STATE_TAG, str(state))
            if failed:
                client.set_terminated(r.info.run_id, status="FAILED")
                if error:
                    client.set_tag(r.info.run_id, "kfp.error", redact(str(error))[:5000])
            if pipeline_name and "{{" not in pipeline_name:
                client.set_tag(r.info.run_id, RUN_NAME_TAG, pipeline_name)
    return (f"pipeline run {pid} ended {state}: {len(parents)} parent run(s), "
            f"{len(closed)} run(s) closed as FAILED")
