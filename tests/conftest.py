"""Shared fixtures. Services (S3-compatible server, MLflow server) run as real processes
on loopback; PostgreSQL is the machine's server on 127.0.0.1:5432."""
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# MLflow server + PostgreSQL + S3 fixtures (tests/fixtures_services.py)
pytest_plugins = ["fixtures_services"]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3-compatible server on loopback; yields its endpoint URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 (AWS_ENDPOINT_URL) at the loopback S3 server with test credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture
def bucket(s3_env, request):
    import boto3
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The demo digits, prepared with 12 training scans per class (fast epochs)."""
    from cladapter_core.data import make_demo_data, prepare
    from tiny import tiny_params
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "digits")
    params = tiny_params("data.shots_per_class=12", "data.val_fraction=0.05", "data.test_fraction=0.05")
    prepare(root / "digits", root / "prepared", params)
    return root / "prepared"
