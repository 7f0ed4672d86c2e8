"""Who can do what on the MLflow server: `mlflow server --app-name cladapter-auth` (MLflow's
basic-auth app plus cladapter_auth's promoter rule) on loopback, with a PostgreSQL backend
store, the auth users in a PostgreSQL database of their own and artifacts proxied to S3 (moto).

Identities, as infra/README.md creates them: `admin` (MLflow's, bootstrapped from the
environment), `pipeline` (the runner: creates runs, registers versions), `promoter` (moves
`champion`), `reader` (reads). One server for the module."""
from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from types import SimpleNamespace

import pytest
import requests
from fixtures_services import (_stop, _wait_http, fresh_pg_database, reset_mlflow_globals,
                               s3_client, tracked_params, write_metrics)
from helpers import BIN, free_port

from cladapter_auth import DEFAULT_ALIASES, DEFAULT_LOCK_EXPERIMENT, Rules

USERS = ("pipeline", "promoter", "reader")


@pytest.fixture(scope="module")
def auth_server(s3_server, tmp_path_factory):
    s3 = SimpleNamespace(endpoint=s3_server, bucket=f"auth-{uuid.uuid4().hex[:8]}",
                         key="testing", secret="testing")
    s3_client(s3).create_bucket(Bucket=s3.bucket)
    folder = tmp_path_factory.mktemp("mlflow_auth")
    log, port = folder / "server.log", free_port()
    admin = SimpleNamespace(username="admin", password=secrets.token_urlsafe(18))
    with fresh_pg_database("cladapter_auth_store") as store_uri, \
            fresh_pg_database("cladapter_auth_users") as users_uri:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "MLFLOW_", "CLADAPTER_"))}
        env.update(MLFLOW_S3_ENDPOINT_URL=s3.endpoint, AWS_ACCESS_KEY_ID=s3.key,
                   AWS_SECRET_ACCESS_KEY=s3.secret, AWS_DEFAULT_REGION="us-east-1",
                   MLFLOW_AUTH_ADMIN_USERNAME=admin.username,
                   MLFLOW_AUTH_ADMIN_PASSWORD=admin.password,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
                   CLADAPTER_AUTH_DATABASE_URI=users_uri,
                   CLADAPTER_PROMOTERS="promoter", CLADAPTER_WRITERS="pipeline")
        cmd = [str(BIN / "mlflow"), "server", "--app-name", "cladapter-auth",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", store_uri, "--serve-artifacts",
               "--artifacts-destination", f"s3://{s3.bucket}/mlflow"]
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                    cwd=folder, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        try:
            _wait_http(uri + "/health", proc, log)
            users = {"admin": admin}
            for name in USERS:  # as the runbook does: through MLflow's auth REST API
                users[name] = SimpleNamespace(username=name, password=secrets.token_urlsafe(18))
                _as(users["admin"], uri).post(
                    f"{uri}/api/2.0/mlflow/users/create",
                    json={"username": name, "password": users[name].password}).raise_for_status()
            yield SimpleNamespace(uri=uri, users=users, log=log, s3=s3, users_db=users_uri)
        finally:
            _stop(proc)


def _as(user, uri=None) -> requests.Session:
    session = requests.Session()
    if user is not None:
        session.auth = (user.username, user.password)
    return session


@pytest.fixture
def login(auth_server, monkeypatch, tmp_path):
    """login("pipeline"): the MLflow client and `cladapter` act as that user from here on."""
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "AWS_")) or name in ("CLADAPTER_PIPELINE_ID",):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.uri)
    monkeypatch.chdir(tmp_path)

    def as_user(name: str):
        from mlflow import MlflowClient
        user = auth_server.users[name]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user.username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user.password)
        return MlflowClient(auth_server.uri)
    yield as_user
    reset_mlflow_globals()


def _denied(call, status=403):
    from mlflow.exceptions import RestException
    with pytest.raises(RestException) as err:
        call()
    assert err.value.get_http_status_code() == status, err.value
    return str(err.value)


# -- unit-level facts the server rule relies on --------------------------------------------
def test_plugin_defaults_match_the_registry_names():
    from cladapter_core.registry.versions import CHAMPION, LOCK_EXPERIMENT
    assert (DEFAULT_ALIASES, DEFAULT_LOCK_EXPERIMENT) == (CHAMPION, LOCK_EXPERIMENT)
    rules = Rules.from_env({"CLADAPTER_PROMOTERS": " promoter, alice ,"})
    assert rules.promoters == {"promoter", "alice"} and rules.writers is None
    assert rules.protected("Champion") and not rules.protected("challenger")
    with pytest.raises(ValueError, match="CLADAPTER_PROTECTED_ALIASES"):
        Rules.from_env({"CLADAPTER_PROTECTED_ALIASES": " , "})


# -- anonymous ----------------------------------------------------------------------------
def test_anonymous_requests_are_refused(auth_server):
    uri, anon = auth_server.uri, _as(None)
    api = f"{uri}/api/2.0/mlflow"
    calls = [
        ("post", f"{api}/runs/create", {"json": {"experiment_id": "0"}}),
        ("post", f"{api}/registered-models/alias",
         {"json": {"name": "m", "alias": "champion", "version": "1"}}),
        ("delete", f"{api}/registered-models/delete", {"json": {"name": "m"}}),
        ("put", f"{uri}/api/2.0/mlflow-artifacts/artifacts/0/x/artifacts/model/model_code.py",
         {"data": b"import os\n"}),
        ("get", f"{api}/experiments/search", {"params": {"max_results": "1"}}),
    ]
    for method, url, kwargs in calls:
        assert getattr(anon, method)(url, timeout=30, **kwargs).status_code == 401, url
    wrong = SimpleNamespace(username="pipeline", password="not-the-password")
    assert _as(wrong).post(f"{api}/runs/create", json={"experiment_id": "0"},
                           timeout=30).status_code == 401
    assert requests.get(f"{uri}/health", timeout=30).status_code == 200  # probes still pass
