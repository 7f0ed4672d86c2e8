"""MLflow tracking against real stores: the embedded SQLite store, real subprocesses for
cross-process grouping, real DVC for data hashes, a real HTTP server for the checks."""
import http.server
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from cladapter_core import load_model, tracking
from cladapter_core.errors import TrackingError
from cladapter_core.params import flatten
from fixtures_services import CLASS_NAMES, tracked_params
from helpers import BIN, REPO, free_port


def _client():
    from mlflow import MlflowClient
    return MlflowClient()


# -- where runs go and failing fast ------------------------------------------------------
def test_default_store_is_embedded_sqlite_in_the_working_dir(clean_mlflow_env, tmp_path,
                                                             mlflow_sqlite):
    # An initialised store copied in (creating one takes seconds); then nothing set.
    shutil.copy(mlflow_sqlite.pristine, tmp_path / "mlflow.db")
    clean_mlflow_env.chdir(tmp_path)
    assert tracking.check_tracking() == "sqlite:///mlflow.db"
    cfg = tracking.configure(tracked_params("m"))
    # One experiment per dataset by default: data.source data/demo -> cladapter-demo.
    assert cfg["tracking_uri"] == "sqlite:///mlflow.db" and cfg["experiment"] == "cladapter-demo"
    assert Path(cfg["artifact_location"].removeprefix("file://")).parent == tmp_path / "mlruns"
    from mlflow import MlflowClient  # the experiment is in ./mlflow.db, not elsewhere
    local = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = local.get_experiment_by_name("cladapter-demo")
    assert exp.experiment_id == cfg["experiment_id"]
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # model training


def test_check_tracking_names_an_unreachable_server(clean_mlflow_env):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    clean_mlflow_env.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match=f"{uri} is unreachable.*MLFLOW_TRACKING_URI"):
        tracking.check_tracking()
    with pytest.raises(TrackingError, match="unreachable"):
        tracking.check_tracking("http://user:secret@127.0.0.1:1")


def test_check_tracking_refuses_a_server_that_is_not_mlflow(clean_mlflow_env):
    class NotMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"no such page")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(TrackingError, match="does not answer like an MLflow tracking server"):
            tracking.check_tracking(uri)
    finally:
        server.shutdown()


def test_check_tracking_embedded_store_in_a_missing_folder(clean_mlflow_env, tmp_path):
    with pytest.raises(TrackingError, match="does not exist"):
        tracking.check_tracking(f"sqlite:///{tmp_path}/nowhere/mlflow.db")


# -- data hashes ---------------------------------------------------------------------------
def _dvc(cwd, *args):
    subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, check=True, capture_output=True, text=True)


def test_source_hash_uses_dvc_records_else_a_deterministic_content_hash(tmp_path):
    from cladapter_core import identity
    data = tmp_path / "proj" / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("a")
    (data / "sub" / "b.txt").write_text("b")
    copy = shutil.copytree(data, tmp_path / "elsewhere" / "data")
    content = identity.content_hash(data)
    assert identity.source_hash(data) == content and len(content) == 64  # sha256
    assert identity.content_hash(copy) == content  # same files, same hash, wherever they lie
    (copy / "a.txt").write_text("changed")
    assert identity.content_hash(copy) != content
    with pytest.raises(TrackingError, match="no such file or folder"):
        identity.content_hash(tmp_path / "missing")
    assert identity.source_hash(tmp_path / "missing") is None  # not made yet: no hash
    assert identity.source_hash("s3://bucket/data") is None

    # Real DVC: `dvc add` writes data.dvc; a stage output is recorded in dvc.lock.
    proj = tmp_path / "proj"
    _dvc(proj, "init", "--no-scm", "-q")
    _dvc(proj, "add", "-q", "data")
    md5 = __import__("yaml").safe_load((proj / "data.dvc").read_text())["outs"][0]["md5"]
    assert identity.source_hash(data) == md5  # from data.dvc
    _dvc(proj, "stage", "add", "-q", "-n", "copy", "-d", "data", "-o", "out", "cp -r data out")
    _dvc(proj, "repro", "-q")
    lock = __import__("yaml").safe_load((proj / "dvc.lock").read_text())
    out_md5 = lock["stages"]["copy"]["outs"][0]["md5"]
    assert identity.source_hash(proj / "out") == out_md5  # from dvc.lock


# -- stage runs ----------------------------------------------------------------------------
STAGE_SCRIPT = textwrap.dedent("""
    import json, sys
    from cladapter_core import tracking
    from fixtures_services import tracked_params
    with tracking.stage_run(tracked_params(sys.argv[2]), sys.argv[1]) as run:
        print(json.dumps({"run": run.info.run_id}))
""")


def _stage_process(stage, name, env):
    env = {**env, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
    return subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, stage, name], cwd=Path.cwd(),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_stages_in_separate_processes_share_one_pipeline_parent(embedded_mlflow):
    import os
    env, name = dict(os.environ), f"grouping-{uuid.uuid4().hex[:8]}"  # a pipeline not seen yet
    # Two stages of one `dvc repro` start at the same moment: both may create the parent.
    procs = [_stage_process("prepare", name, env), _stage_process("train-stage1", name, env)]
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        runs.append(_client().get_run(json.loads(out.strip().splitlines()[-1])["run"]))
    prepare, train = runs
    pid = prepare.data.tags[tracking.PIPELINE_TAG]
    assert pid == tracking.pipeline_id(tracked_params(name))
    assert train.data.tags[tracking.PIPELINE_TAG] == pid
    parent = prepare.data.tags["mlflow.parentRunId"]
    assert train.data.tags["mlflow.parentRunId"] == parent
    assert {r.data.tags["stage"] for r in runs} == {"prepare", "train-stage1"}
    # Exactly one live parent per pipeline id, whatever the race did.
    from mlflow.entities import ViewType
    parents = _client().search_runs(
        [prepare.info.experiment_id], f"tags.`{tracking.PIPELINE_TAG}` = '{pid}' "
        f"and tags.`{tracking.ROLE_TAG}` = 'pipeline'", run_view_type=ViewType.ACTIVE_ONLY)
    assert [r.info.run_id for r in parents] == [parent]
    assert parents[0].data.params["model.num_centers"] == "4"
    # A later stage of the same pipeline (this process) joins the same parent...
    with tracking.stage_run(tracked_params(name), "evaluate") as run:
        assert run.data.tags["mlflow.parentRunId"] == parent
    # ...and a KFP run (its run id in CLADAPTER_PIPELINE_ID) gets its own.
    embedded_mlflow.monkeypatch.setenv("CLADAPTER_PIPELINE_ID", "kfp-run-42")
    with tracking.stage_run(tracked_params(name), "evaluate") as run:
        assert run.data.tags[tracking.PIPELINE_TAG] == "kfp-run-42"
        assert run.data.tags["mlflow.parentRunId"] != parent


def test_stage_run_logs_params_tags_epoch_metrics_and_reports(embedded_mlflow, tiny_model_dirs,
                                                              tmp_path):
    params = tracked_params("m")
    model = load_model(tiny_model_dirs[0])
    with tracking.stage_run(params, "train-stage1", data_hash="abc123.dir") as run:
        logger = tracking.EpochLogger()
        logger.on_train_start({"params": params, "stage": 1, "mode": "cla",
                               "param_report": model.param_report(), "out_dir": "x"})
        for epoch in range(3):
            logger.on_epoch_end({"stage": 1, "epoch": epoch, "train_loss": 1.0 / (epoch + 1),
                                 "val_loss": 2.0 - epoch, "val_accuracy": 0.3 + 0.1 * epoch,
                                 "val_macro_f1": 0.2 * epoch, "lr": 1e-3, "seconds": 1.5,
                                 "note": "not a number"})
        logger.on_epoch_end({"stage": 2, "epoch": 0, "train_loss": 0.1})  # e.g. lp-ft's 2nd part
        logger.on_train_end({"best_epoch": 2, "best": {"val_macro_f1": 0.4}})
        (tmp_path / "report.html").write_text("<html></html>")
        (tmp_path / "curves.png").write_bytes(b"\x89PNG fake")
        (tmp_path / "metrics.json").write_text(json.dumps({"macro_f1": 0.5, "roc_auc": None}))
        tracking.log_evaluation(tmp_path)
    client = _client()
    r = client.get_run(run.info.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params == {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                             for k, v in flatten(params).items()}
    tags = r.data.tags
    assert (tags["stage"], tags["backbone"], tags["K"], tags["mode"], tags["data_hash"]) == \
        ("train-stage1", "vit_tiny_patch16_224", "4", "cla", "abc123.dir")
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == \
        [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    stage2 = client.get_metric_history(run.info.run_id, "stage2/train_loss")
    assert [m.value for m in stage2] == [0.1]
    assert r.data.metrics["val_macro_f1"] == pytest.approx(0.4)
    assert r.data.metrics["params_adapter"] == model.param_report()["adapter"]
    assert r.data.metrics["summary.best.val_macro_f1"] == 0.4
    assert "note" not in r.data.metrics and "epoch" not in r.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"params.json", "param_report.json", "train_summary.json", "evaluation"} <= names
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == \
        {"evaluation/report.html", "evaluation/curves.png", "evaluation/metrics.json"}
    assert r.data.metrics["test_macro_f1"] == 0.5 and "test_roc_auc" not in r.data.metrics


def test_failed_stage_marks_its_run_and_the_parent_failed(embedded_mlflow):
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run(tracked_params("m"), "evaluate") as run:
            raise RuntimeError("boom")
    r = _client().get_run(run.info.run_id)
    assert r.info.status == "FAILED"
    assert _client().get_run(r.data.tags["mlflow.parentRunId"]).info.status == "FAILED"
    import mlflow
    assert mlflow.active_run() is None


def test_logging_outside_a_run_or_of_missing_files_is_a_clear_error(embedded_mlflow, tmp_path):
    with pytest.raises(TrackingError, match="needs an active MLflow run"):
        tracking.log_artifacts_dir(tmp_path)
    with tracking.stage_run(tracked_params("m"), "evaluate"):
        with pytest.raises(TrackingError, match="does not exist"):
            tracking.log_artifacts_dir(tmp_path / "missing", "x")
        with pytest.raises(TrackingError, match="not a model directory"):
            tracking.log_model(tmp_path)


# -- the model as a pyfunc -----------------------------------------------------------------
def test_logged_model_predicts_labels_and_probabilities(embedded_mlflow, tiny_model_dirs):
    import mlflow
    model_dir = tiny_model_dirs[1]
    with tracking.stage_run(tracked_params("m"), "register"):
        uri = tracking.log_model(model_dir, registered_name="pyfunc-check")
    loaded = mlflow.pyfunc.load_model(uri)
    # Two input forms (images, tensor; serving/pyfunc.py): no input schema, the model checks its
    # input itself; the output schema names the columns.
    assert loaded.metadata.get_input_schema() is None
    assert loaded.metadata.get_output_schema().input_names() == \
        ["label"] + [f"prob_{c}" for c in CLASS_NAMES]
    batch = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    out = loaded.predict(batch)
    assert list(out.columns) == ["label"] + [f"prob_{c}" for c in CLASS_NAMES]
    probs = out[[f"prob_{c}" for c in CLASS_NAMES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # Same numbers as the model itself on normalised input.
    model = load_model(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(model((torch.from_numpy(batch) - mean) / std), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    assert list(out["label"]) == [CLASS_NAMES[i] for i in expected.argmax(axis=1)]
    # The registered copy serves the same way.
    by_version = mlflow.pyfunc.load_model("models:/pyfunc-check/1").predict(batch)
    assert list(by_version["label"]) == list(out["label"])
    # Bad input is refused with a message that says what was expected.
    with pytest.raises(Exception, match=r"shape|\(B, 3, 32, 32\)"):
        loaded.predict(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(Exception, match=r"values in \[0, 1\]"):
        loaded.predict(batch * 255)
