"""KFP 2.17's MLflow integration, as its backend does it, against a real MLflow server.

With `plugins.mlflow` configured and `injectUserEnvVars: true`, KFP's API server opens a
parent run per KFP run (tagged `kfp.pipeline_run_id`, in its own experiment), the driver a
child run per task, and the task's container gets MLFLOW_RUN_ID = that child run and
MLFLOW_EXPERIMENT_ID (kubeflow/pipelines 2.17.0: backend/src/apiserver/plugins/mlflow/
run_start.go, backend/src/v2/common/plugins/mlflow/handler.go). The tests below build that
tree on the server the way KFP does and run a step's own tracking inside it.
"""
from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient

from cladapter_core import tracking
from cladapter_core.errors import TrackingError
from components.step_tracking import stage_tracking
from fixtures_services import tracked_params


def kfp_task_run(monkeypatch, kfp_run_id: str) -> tuple[str, str, str]:
    """What KFP 2.17 makes before a task's container starts: its experiment, the parent
    run of the KFP run, the task's child run; the container's MLflow variables. Returns
    (experiment id, parent run id, task run id)."""
    client = MlflowClient()
    name = f"KFP-Default-{uuid.uuid4().hex[:6]}"
    exp = client.create_experiment(name, tags={"mlflow.experiment.sourceType": "kfp"})
    parent = client.create_run(exp, run_name="my-kfp-run", tags={"kfp.pipeline_run_id": kfp_run_id}).info.run_id
    task = client.create_run(exp, run_name="train-stage1", tags={"mlflow.parentRunId": parent}).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", task)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp)
    return exp, parent, task


def pipeline_parents(client, pid: str) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, f"tags.`{tracking.PIPELINE_TAG}` = '{pid}' and "
                                    f"tags.`{tracking.ROLE_TAG}` = 'pipeline'")


def test_a_step_nests_under_the_task_run_kfp_injected(remote_mlflow):
    pid = f"kfp-{uuid.uuid4().hex[:8]}"
    exp, kfp_parent, task = kfp_task_run(remote_mlflow.monkeypatch, pid)
    params = tracked_params(f"nest-{pid}")
    params["tracking"]["experiment"] = f"ours-{pid}"
    with stage_tracking(params, "train_stage1", pid, "data-v1", pipeline_name="my-kfp-run") as run:
        import mlflow
        mlflow.log_metric("val_macro_f1", 0.5)
        mine = run.info.run_id
    client = MlflowClient()
    got = client.get_run(mine)
    # one tree: our stage run is a child of KFP's task run, in KFP's experiment
    assert got.data.tags["mlflow.parentRunId"] == task
    assert got.info.experiment_id == exp and got.info.status == "FINISHED"
    assert got.data.params["model.num_centers"] == "4" and got.data.metrics["val_macro_f1"] == 0.5
    assert got.data.tags["kfp.run_id"] == pid and got.data.tags[tracking.PIPELINE_TAG] == pid
    # no second parent, no experiment of our own
    assert pipeline_parents(client, pid) == []
    assert client.get_experiment_by_name(f"ours-{pid}") is None
    # KFP's runs are KFP's: not renamed, not ended, no params of ours
    t = client.get_run(task)
    assert t.info.run_name == "train-stage1" and t.info.status == "RUNNING" and t.data.params == {}
    assert t.data.tags["mlflow.parentRunId"] == kfp_parent
    assert client.get_run(kfp_parent).info.run_name == "my-kfp-run"
    # MLflow would have consumed the variable on start_run: the step's later processes still see it
    import os
    assert os.environ["MLFLOW_RUN_ID"] == task


def test_a_tuning_session_nests_under_the_task_run(remote_mlflow):
    from cladapter_core.tune.runs import end_study_run, study_run
    pid = f"kfp-{uuid.uuid4().hex[:8]}"
    exp, _, task = kfp_task_run(remote_mlflow.monkeypatch, pid)
    remote_mlflow.monkeypatch.setenv("CLADAPTER_PIPELINE_ID", pid)
    params = tracked_params(f"tune-{pid}")
    run_id = study_run(params, f"study-{pid}", "sqlite:///unused.db", data_hash="data-v1")
    client = MlflowClient()
    got = client.get_run(run_id)
    assert got.data.tags["mlflow.parentRunId"] == task and got.info.experiment_id == exp
    assert pipeline_parents(client, pid) == []
    end_study_run(run_id, "FAILED", close=True)
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_run(task).info.status == "RUNNING"  # the launcher ends it


def test_own_mode_keeps_the_platforms_tree_and_leaves_the_task_run_alone(remote_mlflow):
    pid = f"kfp-{uuid.uuid4().hex[:8]}"
    exp, _, task = kfp_task_run(remote_mlflow.monkeypatch, pid)
    remote_mlflow.monkeypatch.setenv("CLADAPTER_OUTER_RUN", "own")
    params = tracked_params(f"own-{pid}")
    params["tracking"]["experiment"] = f"ours-{pid}"
    with stage_tracking(params, "evaluate", pid, "data-v1", pipeline_name="my-kfp-run") as run:
        mine = run.info.run_id
    client = MlflowClient()
    got = client.get_run(mine)
    parents = pipeline_parents(client, pid)
    assert [p.info.run_id for p in parents] == [got.data.tags["mlflow.parentRunId"]]
    assert got.info.experiment_id == client.get_experiment_by_name(f"ours-{pid}").experiment_id != exp
    assert parents[0].info.run_name == "my-kfp-run"
    t = client.get_run(task)
    assert t.data.params == {} and t.info.status == "RUNNING"


def test_a_deleted_injected_run_is_a_clear_error(remote_mlflow):
    pid = f"kfp-{uuid.uuid4().hex[:8]}"
    _, _, task = kfp_task_run(remote_mlflow.monkeypatch, pid)
    MlflowClient().delete_run(task)
    with pytest.raises(TrackingError, match="CLADAPTER_OUTER_RUN=own"):
        with stage_tracking(tracked_params(f"del-{pid}"), "evaluate", pid, "data-v1"):
            pass
