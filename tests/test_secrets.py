"""No secret in tracking: a password or token in a URL-valued parameter reaches no MLflow
parameter, tag, run name or artifact, on the `cladapter tune` path (study run, pipeline
parent, every trial) and on the stage-run path every DVC stage and KFP step takes; the
values the stages run with stay whole (the study storage still connects)."""
import json
from pathlib import Path

import optuna
import pytest
import yaml

from cladapter_core import cli, tracking
from cladapter_core.data import make_demo_data, prepare
from cladapter_core.params import load_params, parse_overrides

PASSWORD = "s3cr3t-h2-7f1e"   # unique: found anywhere means leaked  # pragma: allowlist secret
TOKEN = "tok-h2-91ab"
SIGNATURE = "sig-h2-c0ffee"
TINY = [
    "model.backbone=vit_tiny_patch16_224", "model.pretrained=false",
    "model.backbone_kwargs={img_size: 16, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.rank=8", "model.num_centers=4", "train.batch_size=16", "train.warmup_epochs=0",
    "stage1.epochs=1", "stage2.epochs=0", "train.cache.views=0", "tune.pruner=none",
    "tune.space=[{param: model.num_centers, choices: [2, 4]}]",
]


def test_redact_hides_passwords_and_query_secrets_and_keeps_the_rest():
    r = tracking.redact
    assert r("postgresql+psycopg2://user:pw@db:5432/optuna") == "postgresql+psycopg2://user:***@db:5432/optuna"  # pragma: allowlist secret
    assert r("mysql://u:p@ss@h/d") == "mysql://u:***@h/d"          # a raw '@' in the password  # pragma: allowlist secret
    assert r("https://x-access-token:ghp_1@github.com/o/r.git") == "https://x-access-token:***@github.com/o/r.git"  # pragma: allowlist secret
    presigned = ("https://b.s3.amazonaws.com/w.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1"
                 "&X-Amz-Signature=abc&X-Amz-Security-Token=tt&X-Amz-Expires=60")
    assert r(presigned) == ("https://b.s3.amazonaws.com/w.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
                            "&X-Amz-Signature=***&X-Amz-Security-Token=***&X-Amz-Expires=60")
    assert r("postgresql://u@h/d?sslmode=require&password=pw") == "postgresql://u@h/d?sslmode=require&password=***"
    assert r("https://h/d.csv?sig=S&sv=2022&api_key=K&token=T#top") == "https://h/d.csv?sig=***&sv=2022&api_key=***&token=***#top"
    # nothing to hide: unchanged, user names included (they say who connects)
    for same in ("postgresql://postgres@127.0.0.1:5432/test", "sqlite:///outputs/tune/optuna.db",
                 "s3://bucket/data/train.csv", "db:5432", "lr=0.1", "a@b.org", "https://h/x?keyword=1&monkey=2"):
        assert r(same) == same
    params = {"tune": {"storage": "postgresql://u:pw@h/d", "space": [{"param": "x", "choices": [1, 2]}]},  # pragma: allowlist secret
              "data": {"source": "data/demo", "val_fraction": 0.15}, "model": {"weights": None}}
    redacted = tracking.redact_params(params)
    assert redacted["tune"]["storage"] == "postgresql://u:***@h/d"
    assert redacted["tune"]["space"] == params["tune"]["space"] and redacted["data"] == params["data"]
    assert params["tune"]["storage"] == "postgresql://u:pw@h/d"  # what runs is not touched  # pragma: allowlist secret


def _leaks(folder: Path, *secrets: str) -> list[str]:
    """Every file under `folder` (the SQLite store and its WAL, the artifact folders, the
    outputs) whose bytes hold one of `secrets`."""
    return [f"{p}: {s}" for p in sorted(folder.rglob("*")) if p.is_file()
            for s in secrets if s.encode() in p.read_bytes()]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "CLADAPTER_PIPELINE_ID", "CLADAPTER_TRACKING",
                 "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield tmp_path
    import mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def pg_url():
    """A fresh database on the machine's PostgreSQL (trust auth: any password connects)."""
    from fixtures_services import fresh_pg_database
    with fresh_pg_database("cladapter_secrets", scheme="postgresql+psycopg2") as uri:
        yield uri


def test_a_password_in_the_study_storage_reaches_nothing_in_the_mlflow_store(workdir, pg_url, monkeypatch, capsys):
    data = workdir.parent / f"{workdir.name}-data"
    make_demo_data(data / "digits")
    prepare(data / "digits", data / "prepared",
            load_params(None, TINY + ["data.shots_per_class=8", "data.val_fraction=0.1", "data.test_fraction=0.05"]))
    monkeypatch.setattr("tempfile.tempdir", str(data))  # trials train there, outside the searched folder
    storage = pg_url.replace("://postgres@", f"://postgres:{PASSWORD}@")
    assert PASSWORD in storage
    # The user's params.yaml (as under DVC) and --storage on the command line (as the finding)
    (workdir / "params.yaml").write_text(yaml.safe_dump(parse_overrides(TINY)))
    rc = cli.main(["tune", "--prepared", str(data / "prepared"), "--n-trials", "2", "--storage", storage])
    out, err = capsys.readouterr()
    assert rc == 0, err

    # The URL still worked for connecting: the study is in PostgreSQL, both trials done.
    study = optuna.load_study(study_name="cladapter", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    # Nowhere in the store (database file, artifacts), the outputs, or what was printed.
    assert (workdir / "mlflow.db").is_file() and (workdir / "mlruns").is_dir()
    assert _leaks(workdir, PASSWORD) == []
    assert PASSWORD not in out + err
    # ... and the runs say which storage it was, without the password: parent, study run, trials.
    from mlflow import MlflowClient
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    roles = sorted(r.data.tags.get("cladapter.role") for r in runs)
    assert roles == ["pipeline", "stage", "trial", "trial"]
    shown = pg_url.replace("://postgres@", "://postgres:***@")
    for r in runs:
        assert r.data.params["tune.storage"] == shown, r.info.run_name
    study_run = next(r for r in runs if r.data.tags.get("cladapter.role") == "stage")
    assert study_run.data.tags["optuna.storage"] == shown
    logged = json.loads(Path(client.download_artifacts(study_run.info.run_id, "params.json", str(workdir.parent))).read_text())
    assert logged["tune"]["storage"] == shown


def test_a_stage_run_logs_no_credential_of_any_url_parameter(workdir):
    """The path of every DVC stage and KFP step: `tracking.stage_run` (parent run, stage run,
    params.json) and the dataset inputs (their source)."""
    prepared = workdir / "prepared"
    prepared.mkdir()
    (prepared / "manifest.csv").write_text("path,label,split,sha256\na.png,0,train,00\nb.png,1,val,11\n")
    (prepared / "classes.json").write_text('["a", "b"]')
    (prepared / "summary.json").write_text('{"dataset": "digits"}')
    params = load_params(None, [
        f"tune.storage=postgresql://optuna:{PASSWORD}@db:5432/optuna",
        f"model.weights=https://b.s3.amazonaws.com/w.safetensors?X-Amz-Signature={SIGNATURE}&X-Amz-Expires=60",
        f"data.source=https://data.example.org/digits.csv?token={TOKEN}"])
    with tracking.stage_run(params, "train_stage1", prepared=prepared) as run:
        tracking.log_data_inputs(params, prepared, ("train", "val"))
        run_id = run.info.run_id
    assert params["tune"]["storage"].endswith(f":{PASSWORD}@db:5432/optuna")  # the caller's dict is whole
    assert _leaks(workdir, PASSWORD, TOKEN, SIGNATURE) == []
    from mlflow import MlflowClient
    r = MlflowClient().get_run(run_id)
    assert r.data.params["tune.storage"] == "postgresql://optuna:***@db:5432/optuna"
    assert r.data.params["model.weights"].endswith("X-Amz-Signature=***&X-Amz-Expires=60")
    assert "token=***" in r.data.params["data.source"]
    sources = [json.loads(d.dataset.source) for d in r.inputs.dataset_inputs]
    assert sources and all("token=***" in json.dumps(s) for s in sources)


def test_a_compare_or_sweep_study_logs_no_credential(workdir):
    """`compare` and `sweep` log their params on a parent run and each cell's on a child
    (experiments/study_runs.py): the same redaction as every stage run."""
    from cladapter_core.experiments.study_runs import StudyRuns
    prepared = workdir / "prepared"
    prepared.mkdir()
    (prepared / "manifest.csv").write_text("path,label,split,sha256\na.png,0,train,00\nb.png,1,val,11\n")
    (prepared / "classes.json").write_text('["a", "b"]')
    (prepared / "summary.json").write_text('{"dataset": "digits"}')
    params = load_params(None, [f"tune.storage=postgresql://optuna:{PASSWORD}@db:5432/optuna"])
    runs = StudyRuns(params, {"methods": ["linear"]}, prepared, kind="compare", run_name="compare-test",
                     splits=("train", "val"), resume=False)
    runs.cell("linear seed 0", "linear seed 0", {"storage": params["tune"]["storage"]}, {"macro_f1": 0.5})
    runs.finish([])
    assert _leaks(workdir, PASSWORD) == []
    from mlflow import MlflowClient
    assert MlflowClient().get_run(runs.run_id).data.params["tune.storage"] == "postgresql://optuna:***@db:5432/optuna"
