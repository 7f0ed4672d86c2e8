"""Data-parallel training (DDP) through torchrun, on the CPU with the gloo backend and two
processes, gives the weights of one process within float tolerance: the command's path
(`torchrun -m cladapter_core.cli train`) and the pipeline step's path (`num_gpus` > 1).

Batch size 17 on 120 training scans makes every step uneven across the two ranks (9 and
8 samples) and leaves a last batch of one sample, which only one rank can hold.
"""
import json
import subprocess
import sys

import pytest
from helpers import assert_same_training, child_env, ddp_params as params, one_thread

from cladapter_core.training import train
from components import runtime


def test_torchrun_two_processes_match_one_process(ddp_dataset, stage1_reference, tmp_path):
    flags = []
    p = params()
    for key, value in (("model.backbone", p["model"]["backbone"]), ("model.pretrained", "false"),
                       ("model.backbone_kwargs", json.dumps(p["model"]["backbone_kwargs"])),
                       ("model.num_centers", 4), ("model.rank", 8), ("model.dropout", 0.0),
                       ("train.batch_size", 17), ("train.warmup_epochs", 1),
                       ("train.cache.views", "null"), ("stage1.epochs", 2)):
        flags += ["-S", f"{key}={value}"]
    (tmp_path / "empty.yaml").write_text("")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cladapter_core.cli", "train", "--params", str(tmp_path / "empty.yaml"), "--no-track",
           "--stage", "1", "--prepared", str(runtime.prepared_dir(ddp_dataset)), "--out", str(tmp_path / "ddp"),
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=child_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "on cpu" in proc.stdout
    assert_same_training(stage1_reference, tmp_path / "ddp")


def test_training_step_with_two_devices_runs_torchrun_and_logs_once(ddp_dataset, stage1_reference, tmp_path,
                                                                     clean_mlflow_env):
    """The pipeline's stage-2 step with num_gpus=2: torchrun, rank 0 logging epochs into
    the step's MLflow run, the weights of one process."""
    p = params()
    with one_thread():
        train(p, runtime.prepared_dir(ddp_dataset), tmp_path / "ref2", stage=2, init_from=stage1_reference,
              progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = clean_mlflow_env  # a monkeypatch; MLflow's globals are reset after the test
    env.setenv("MLFLOW_TRACKING_URI", uri)
    env.setenv("OMP_NUM_THREADS", "1")
    for name in ("CLADAPTER_TRACKING", "CLADAPTER_PIPELINE_ID"):
        env.delenv(name, raising=False)
    env.chdir(tmp_path)
    summary = runtime.train_task(p, ddp_dataset, tmp_path / "step" / "model", stage=2,
                                 init_from=stage1_reference, pipeline_id="ddp-run-1", num_gpus=2)
    assert summary["epochs_run"] == 1
    assert_same_training(tmp_path / "ref2", tmp_path / "step" / "model")

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    from cladapter_core.tracking import experiment_name, run_name
    exp = client.get_experiment_by_name(experiment_name(p))  # the dataset's experiment
    runs = client.search_runs([exp.experiment_id], "tags.`cladapter.pipeline_id` = 'ddp-run-1'")
    steps = [r for r in runs if r.data.tags.get("stage") == "train_stage2"]
    assert [r.info.run_name for r in steps] == [run_name(p, "train_stage2")]
    assert len(steps) == 1 and steps[0].info.status == "FINISHED"
    history = client.get_metric_history(steps[0].info.run_id, "train_loss")
    assert [m.step for m in history] == [1]  # one value per epoch: rank 0 alone logs
    hist = json.loads((tmp_path / "step" / "model" / "history.json").read_text())
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == \
        pytest.approx([r["train_loss"] for r in hist if r["stage"] == 2])
    assert any(a.path == "model_dir" for a in client.list_artifacts(steps[0].info.run_id))
