"""Fixtures for the tracking and registry tests: real services, no mocks.

- ``mlflow_sqlite`` / ``embedded_mlflow``: the embedded store (a SQLite file) in a
  session folder; each test works in that folder, so artifacts land beside it.
- ``pg_database``: a fresh database on the machine's PostgreSQL (127.0.0.1:5432, trust
  auth), dropped at the end of the session.
- ``s3_iam``: a moto S3 server with IAM authentication switched on, a bucket and one
  valid key pair: wrong credentials are refused as they would be by MinIO or AWS.
- ``mlflow_server``: the production topology in miniature - ``mlflow server`` with the
  PostgreSQL backend store and artifacts proxied to ``s3://<bucket>/mlflow`` (the moto
  server of conftest's ``s3_server``).
- ``tiny_model_dirs``: three small saved CLAdapter models (different weights).

Register with ``pytest_plugins = ["fixtures_services"]`` in tests/conftest.py (tests/ is on
sys.path there, as for tiny.py); test files import helpers ``from fixtures_services``.
"""
from __future__ import annotations

import json
import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import BIN, free_port
from tiny import SMALL

PG_HOST, PG_PORT = "127.0.0.1", 5432
CLIENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CLADAPTER_PIPELINE_ID",
              "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_REGISTRY_URI",
              "MLFLOW_RUN_ID", "CLADAPTER_OUTER_RUN")


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    import requests
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n"
                               + log.read_text()[-3000:])
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n" + log.read_text()[-3000:])


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session (uvicorn/gunicorn workers included)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass


def reset_mlflow_globals() -> None:
    """mlflow.set_tracking_uri also sets the MLFLOW_TRACKING_URI env var: undo both, so
    no test (of ours or others) inherits a store from a previous one."""
    import mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def clean_mlflow_env(monkeypatch):
    """No tracking or S3 variables from the outside; all restored after the test."""
    for name in CLIENT_ENV:
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    yield monkeypatch
    reset_mlflow_globals()


# -- embedded store ----------------------------------------------------------------------
@pytest.fixture(scope="session")
def mlflow_sqlite(tmp_path_factory):
    """A folder with an initialised MLflow SQLite store (creating one takes seconds), and
    `pristine`: a copy of it as initialised, for tests that need an empty store."""
    import shutil
    folder = tmp_path_factory.mktemp("mlflow_embedded")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    from mlflow import MlflowClient
    with pytest.MonkeyPatch.context() as mp:
        # MLflow keeps one store per URI, with the default artifact root ./mlruns resolved
        # where it is first opened: here, not in the repository (shared by xdist workers).
        mp.chdir(folder)
        MlflowClient(tracking_uri=uri).search_experiments()
    pristine = tmp_path_factory.mktemp("mlflow_pristine") / "mlflow.db"
    shutil.copy(folder / "mlflow.db", pristine)
    return SimpleNamespace(folder=folder, uri=uri, pristine=pristine)


@pytest.fixture
def embedded_mlflow(mlflow_sqlite, clean_mlflow_env):
    """MLFLOW_TRACKING_URI -> the session's SQLite store; cwd = its folder."""
    clean_mlflow_env.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite.uri)
    clean_mlflow_env.chdir(mlflow_sqlite.folder)
    return SimpleNamespace(folder=mlflow_sqlite.folder, uri=mlflow_sqlite.uri,
                           monkeypatch=clean_mlflow_env)


# -- PostgreSQL --------------------------------------------------------------------------
def _pg_connect(dbname: str):
    import psycopg2
    errors = []
    for user in (os.environ.get("CLADAPTER_TEST_PG_USER"), "postgres", "root"):
        if not user:
            continue
        try:
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=user, dbname=dbname,
                                    connect_timeout=5)
            return conn, user
        except psycopg2.OperationalError as e:
            errors.append(f"{user}: {str(e).strip()}")
    raise RuntimeError("; ".join(errors))


@contextlib.contextmanager
def fresh_pg_database(prefix: str, scheme: str = "postgresql+psycopg2"):
    """Create a database `<prefix>_<random>` on the machine's PostgreSQL, yield its URI
    (with `scheme`), drop it afterwards; skip the test if PostgreSQL is unavailable."""
    admin = user = None
    for dbname in ("postgres", "test"):
        try:
            admin, user = _pg_connect(dbname)
            break
        except RuntimeError as e:
            reason = str(e)
    if admin is None:
        pytest.skip(f"PostgreSQL at {PG_HOST}:{PG_PORT} unavailable: {reason}")
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{scheme}://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database `cladapter_test_<random>`; yields its URI."""
    # psycopg2 driver named: MLflow would pick psycopg (3), which is not installed
    with fresh_pg_database("cladapter_test") as uri:
        yield uri


# -- S3 with authentication --------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_iam(tmp_path_factory):
    """moto S3 on loopback with IAM auth on after setup: one bucket, one valid key pair."""
    import boto3
    import requests
    port = free_port()
    log = tmp_path_factory.mktemp("moto_iam") / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_http(endpoint + "/moto-api/", proc, log, timeout=60)
        anon = dict(endpoint_url=endpoint, region_name="us-east-1",
                    aws_access_key_id="setup", aws_secret_access_key="setup")
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="mlflow")
        key = iam.create_access_key(UserName="mlflow")["AccessKey"]
        iam.put_user_policy(UserName="mlflow", PolicyName="s3-all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        bucket = "cladapter-mlflow"
        boto3.client("s3", **anon).create_bucket(Bucket=bucket)
        # From here on every S3 request must be signed with a known key.
        requests.post(endpoint + "/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        yield SimpleNamespace(endpoint=endpoint, bucket=bucket, key=key["AccessKeyId"],
                              secret=key["SecretAccessKey"])
    finally:
        _stop(proc)


def s3_client(s3):
    import boto3
    return boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                        aws_access_key_id=s3.key, aws_secret_access_key=s3.secret)


# -- mlflow server: PostgreSQL + S3 ------------------------------------------------------
@pytest.fixture(scope="session")
def mlflow_server(pg_database, s3_server, s3_iam, tmp_path_factory):
    """`mlflow server` on loopback: backend store PostgreSQL, artifacts proxied to
    ``s3://mlflow-<random>/mlflow`` on the shared moto server (conftest ``s3_server``).

    Not on ``s3_iam``: for S3 destinations MLflow 3 clients download artifacts through
    presigned URLs, and moto's IAM check cannot read presigned (query-string) signatures.
    ``s3_iam`` serves the direct-to-S3 credential test."""
    s3 = SimpleNamespace(endpoint=s3_server, bucket=f"mlflow-{uuid.uuid4().hex[:8]}",
                         key="testing", secret="testing")
    s3_client(s3).create_bucket(Bucket=s3.bucket)
    port = free_port()
    folder = tmp_path_factory.mktemp("mlflow_server")
    log = folder / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(MLFLOW_S3_ENDPOINT_URL=s3.endpoint, AWS_ACCESS_KEY_ID=s3.key,
               AWS_SECRET_ACCESS_KEY=s3.secret, AWS_DEFAULT_REGION="us-east-1")
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", pg_database,
           "--artifacts-destination", f"s3://{s3.bucket}/mlflow", "--serve-artifacts"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", proc, log)
        yield SimpleNamespace(uri=uri, s3=s3, s3_iam=s3_iam, log=log, db=pg_database)
    finally:
        _stop(proc)


@pytest.fixture
def remote_mlflow(mlflow_server, clean_mlflow_env, tmp_path):
    """MLFLOW_TRACKING_URI -> the loopback server; no S3 credentials on the client (the
    server proxies artifacts). cwd = a fresh folder."""
    clean_mlflow_env.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    clean_mlflow_env.chdir(tmp_path)
    return SimpleNamespace(**vars(mlflow_server), monkeypatch=clean_mlflow_env)


# -- models ------------------------------------------------------------------------------
CLASS_NAMES = ["cat", "dog", "owl"]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Three saved models (vit_tiny, depth 1, 32 px, K=4, r=8), different weights."""
    import torch
    from cladapter_core import build_model, save_model
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("vit_tiny_patch16_224", len(CLASS_NAMES), num_centers=4, rank=8,
                            img_size=32, patch_size=8, backbone_kwargs={"depth": 1},
                            class_names=CLASS_NAMES, pretrained=False)
        dirs.append(save_model(model, root / f"model{seed}"))
    return dirs


def write_metrics(folder: Path, *, decision_split: str = "val", data_hash: str = "data-v1",
                  **metrics) -> Path:
    """An evaluation folder as `evaluate` writes it: metrics.json (the reported split),
    decision_metrics.json (the same numbers, as if measured on `decision_split` of the data
    `data_hash`) and a small report."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    decision = {"split": decision_split, "data_hash": data_hash,
                "metrics": {k: v for k, v in metrics.items() if v is not None}}
    score = next((metrics[k] for k in ("macro_f1", "accuracy") if metrics.get(k) is not None), None)
    if score is not None:  # per-image predictions as evaluate records them, right on a `score` share
        decision["predictions"] = synthetic_predictions(score)
    (folder / "decision_metrics.json").write_text(json.dumps(decision))
    (folder / "report.html").write_text("<html><body>report</body></html>\n")
    return folder


def synthetic_predictions(score: float, n: int = 200, classes: int = 3) -> dict:
    """Predictions on the same `n` images for every call (labels i mod `classes`): the
    first round(score * n) right, the rest wrong; two such sets differ only on the images
    between their two counts, all in favour of the higher score (a clear paired test)."""
    right = round(score * n)
    labels = [i % classes for i in range(n)]
    return {"image": [f"img{i:04d}" for i in range(n)], "label": labels, "num_classes": classes,
            "predicted": [y if i < right else (y + 1) % classes for i, y in enumerate(labels)]}


def tracked_params(model_name: str, **register) -> dict:
    """Resolved params for the tiny models, registering under `model_name`."""
    from cladapter_core.params import load_params
    params = load_params(None, SMALL)
    params["model"].update(backbone="vit_tiny_patch16_224", num_centers=4, rank=8,
                           backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 1})
    params["register"].update(model_name=model_name, **register)
    return params
