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
from cladapter_core.registry.versions import CHAMPION, LOCK_EXPERIMENT

USERS = ("pipeline", "promoter", "reader")


@pytest.fixture(scope="module")
def auth_server(s3_server, tmp_path_factory):
    s3 = SimpleNamespace(endpoint=s3_server, bucket=f"auth-{uuid.uuid4().hex[:8]}",
                         key="testing", secret="testing")
    s3_client(s3).create_bucket(Bucket=s3.bucket)
    folder = tmp_path_factory.mktemp("mlflow_auth")
    log, port = folder / "server.log", free_port()
    admin = SimpleNamespace(username="admin", password=secrets.token_urlsafe(18))
    # MLflow's auth config file, as an operator writes one: no secret in it (the database URI
    # comes from CLADAPTER_AUTH_DATABASE_URI, the admin from MLFLOW_AUTH_ADMIN_*). The login
    # cache spares a PBKDF2 hash per request (a registration makes ~100 requests).
    ini = folder / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///unused.db\n"
                   "admin_username = nobody\nauth_cache_ttl_seconds = 300\n")
    with fresh_pg_database("cladapter_auth_store") as store_uri, \
            fresh_pg_database("cladapter_auth_users") as users_uri:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "MLFLOW_", "CLADAPTER_"))}
        env.update(MLFLOW_S3_ENDPOINT_URL=s3.endpoint, AWS_ACCESS_KEY_ID=s3.key,
                   AWS_SECRET_ACCESS_KEY=s3.secret, AWS_DEFAULT_REGION="us-east-1",
                   MLFLOW_AUTH_ADMIN_USERNAME=admin.username,
                   MLFLOW_AUTH_ADMIN_PASSWORD=admin.password,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16), MLFLOW_AUTH_CONFIG_PATH=str(ini),
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
            assert not (folder / "unused.db").exists()  # the users live in PostgreSQL
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
    """`call` fails with HTTP `status`; returns the server's message."""
    from mlflow.exceptions import MlflowException, RestException
    with pytest.raises(MlflowException) as err:
        call()
    if isinstance(err.value, RestException):
        assert err.value.get_http_status_code() == status, err.value
    else:  # the batching log_param path wraps the HTTP error: its text names the status
        assert f"error code {status} " in str(err.value), err.value
    return str(err.value)


# -- unit-level facts the server rule relies on --------------------------------------------
def test_plugin_defaults_match_the_registry_names():
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
    wrong = SimpleNamespace(username="pipeline", password="not-the-password")  # pragma: allowlist secret
    assert _as(wrong).post(f"{api}/runs/create", json={"experiment_id": "0"},
                           timeout=30).status_code == 401
    assert requests.get(f"{uri}/health", timeout=30).status_code == 200  # probes still pass


# -- the roles ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(auth_server, tiny_model_dirs, tmp_path_factory):
    """One version registered by the pipeline identity with the real `register`."""
    from cladapter_core import registry
    name = f"auth-{uuid.uuid4().hex[:6]}"
    params = tracked_params(name)
    env = {"MLFLOW_TRACKING_URI": auth_server.uri, "MLFLOW_TRACKING_USERNAME": "pipeline",
           "MLFLOW_TRACKING_PASSWORD": auth_server.users["pipeline"].password}
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("MLFLOW_", "AWS_")) or key == "CLADAPTER_PIPELINE_ID":
                mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        mp.chdir(tmp_path_factory.mktemp("auth_register"))
        made = registry.register(tiny_model_dirs[0],
                                 write_metrics(tmp_path_factory.mktemp("eval"), macro_f1=0.8), params)
        reset_mlflow_globals()
    assert made["created"] and made["aliases"] == ["challenger"]
    return SimpleNamespace(name=name, params=params, version=str(made["version"]),
                           run_id=made["run_id"])


def test_the_pipeline_registers_only_the_promoter_moves_champion(auth_server, login, registered):
    from mlflow.server.auth.client import AuthServiceClient

    from cladapter_core import registry
    from cladapter_core.errors import TrackingError
    name, v1 = registered.name, registered.version

    runner = login("pipeline")
    said = _denied(lambda: runner.set_registered_model_alias(name, "champion", v1))
    assert "for promoters only" in said and "'pipeline'" in said
    _denied(lambda: runner.set_registered_model_alias(name, "CHAMPION", v1))
    _denied(lambda: runner.delete_registered_model(name))
    _denied(lambda: runner.rename_registered_model(name, name + "-x"))
    _denied(lambda: runner.set_model_version_tag(name, v1, "promotion.decision", "promoted"))
    with pytest.raises(TrackingError, match="for promoters only"):  # `cladapter promote`'s path
        registry.promote(registered.params)
    assert "champion" not in runner.get_registered_model(name).aliases

    # The runbook's one grant: the promoter may edit every registered model (MLflow's check).
    login("admin")
    AuthServiceClient(auth_server.uri).grant_user_permission("promoter", "registered_model", "*", "EDIT")
    login("promoter")
    won = registry.promote(registered.params)
    assert won["decision"] == "promoted" and str(won["champion_after"]) == v1

    runner = login("pipeline")
    assert runner.get_model_version_by_alias(name, "champion").version == v1
    # The served version stays as the promoter left it.
    _denied(lambda: runner.delete_registered_model_alias(name, "champion"))
    _denied(lambda: runner.delete_model_version(name, v1))
    _denied(lambda: runner.set_model_version_tag(name, v1, "integrity.sha256", "0" * 64))
    _denied(lambda: runner.delete_model_version_tag(name, v1, "model_hash"))
    # The promotion lock is the promoters' (its experiment and its runs).
    lock = runner.get_experiment_by_name(LOCK_EXPERIMENT)
    lock_run = runner.search_runs([lock.experiment_id], max_results=1)[0]
    _denied(lambda: runner.log_param(lock_run.info.run_id, "ticket.999", "pipeline"))
    # The pipeline's own work goes on: `challenger` is its to move.
    runner.set_registered_model_alias(name, "challenger", v1)
    assert runner.get_registered_model(name).aliases == {"champion": v1, "challenger": v1}


def test_a_reader_reads_and_writes_nothing(auth_server, login, registered):
    name, version = registered.name, registered.version
    reader = login("reader")
    assert reader.get_model_version(name, version).tags["model_hash"]
    run = reader.get_run(registered.run_id)
    assert run.data.metrics  # the registration's metrics are readable
    _denied(lambda: reader.set_registered_model_alias(name, "challenger", version))
    _denied(lambda: reader.create_run(run.info.experiment_id))
    _denied(lambda: reader.log_param(registered.run_id, "x", "1"))
    said = _denied(lambda: reader.create_experiment(f"reader-{uuid.uuid4().hex[:6]}"))
    assert "for writers only" in said
    _denied(lambda: reader.create_registered_model(f"reader-{uuid.uuid4().hex[:6]}"))
    # No artifact write through the server's proxy either.
    path = f"{run.info.experiment_id}/{registered.run_id}/artifacts/evaluation/metrics.json"
    put = _as(auth_server.users["reader"]).put(
        f"{auth_server.uri}/api/2.0/mlflow-artifacts/artifacts/{path}", data=b"{}", timeout=30)
    assert put.status_code == 403
