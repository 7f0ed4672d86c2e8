"""An MLflow upgrade as the runbook does it (infra/README.md, "Upgrades and teardown"), on
the PostgreSQL server here: a database one schema revision behind this MLflow (made with
the current MLflow, then `alembic downgrade -1` through MLflow's own alembic config: the
newest migration's real downgrade, so the schema the previous MLflow wrote); the upgrade
Job's exact command, parsed from infra/k8s/mlflow-upgrade and run with its environment,
migrates it (and again, changing nothing); then the server of the rendered dev Deployment
starts, answers /health and still has the data written before.

What the server itself does on an older schema (mlflow/store/tracking/sqlalchemy_store.py):
when every table of its models exists but the revision is older, it exits ("Detected
out-of-date database schema"); when a migration adds tables, as the newest one of MLflow
3.17.2 does, it runs the migrations itself while it starts, under the startup probe, in
every new replica at once and beside the old pods. Neither is an upgrade procedure: the
Job runs once, before the rollout, with the old servers stopped.
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port

from infra_helpers import K8S, find, kubectl, policy_allows, render_overlay, secret_data

K8S_VERSION = "1.29.0"  # the oldest Kubernetes the manifests must apply to (as test_infra.py)


# -- what the kubelet gives a container, and a server process (as test_infra.py's helpers) --
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args ($$ escapes $)."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(docs: list[dict], owner: dict, container: dict) -> dict[str, str]:
    """The environment the kubelet would give the container (env in order)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        frm = var["valueFrom"]
        if "fieldRef" in frm:
            env[var["name"]] = owner["metadata"]["namespace"]
            continue
        if "secretKeyRef" in frm:
            ref, values = frm["secretKeyRef"], secret_data(docs, frm["secretKeyRef"]["name"])
        else:
            ref = frm["configMapKeyRef"]
            values = dict(find(docs, "ConfigMap", ref["name"]).get("data", {}))
        if ref["key"] in values:
            env[var["name"]] = values[ref["key"]]
        else:
            assert ref.get("optional"), f"{ref['name']} has no key {ref['key']}"
    return env


def mlflow_container(docs: list[dict]) -> dict:
    spec = find(docs, "Deployment", "cladapter-mlflow")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "mlflow"]
    return container


def http_get(port: int, path: str, host: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the session the test started (the server and its workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()

UPGRADE = K8S / "mlflow-upgrade"


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict:
    """The dev services and the upgrade Job, rendered by kustomize."""
    import yaml
    dev = render_overlay("dev", tmp_path_factory.mktemp("dev"))
    proc = subprocess.run([kubectl(), "kustomize", str(UPGRADE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {"dev": dev, "upgrade": [d for d in yaml.safe_load_all(proc.stdout) if d]}


def _schema_revision(uri: str) -> str:
    import sqlalchemy
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()


def _server_env(docs: list[dict], uri: str, tmp: Path) -> tuple[list[str], dict]:
    """The dev Deployment's command line and environment, on a local port and database."""
    deployment, container = find(docs, "Deployment", "cladapter-mlflow"), mlflow_container(docs)
    env = container_env(docs, deployment, container)
    # the templates' placeholders where the server checks a value (the admin password's length)
    for name, value in env.items():
        if value == "REPLACE_ME":
            env[name] = f"test-only-{name.lower()}-0123456789"
    # other databases the server names (its auth database): a throw-away one of their own
    for name, value in env.items():
        if value.startswith("postgresql") and name != "MLFLOW_BACKEND_STORE_URI":
            env[name] = _side_database(uri, name)
    env.update(MLFLOW_BACKEND_STORE_URI=uri, HOME=str(tmp), TMPDIR=str(tmp),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    port = free_port()
    args = [expand(a, env) for a in container["args"]]
    args = [f"--port={port}" if a.startswith("--port=") else
            "--host=127.0.0.1" if a.startswith("--host=") else a for a in args
            # the tracking server alone: its auth app (another database, its own migrations
            # at start) is not what this test is about, and test_infra.py starts it whole
            if not a.startswith("--app-name")]
    return [str(Path(sys.executable).parent / container["command"][0]), *container["command"][1:], *args], {**env, "PORT": str(port)}


_SIDE_DATABASES: list[str] = []


def _side_database(uri: str, purpose: str) -> str:
    """A fresh database beside `uri`'s on the same server (dropped by `_drop_side_databases`)."""
    import uuid

    import sqlalchemy
    name = f"{sqlalchemy.engine.make_url(uri).database}_{purpose.lower()[:20]}_{uuid.uuid4().hex[:6]}"
    engine = sqlalchemy.create_engine(uri, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    _SIDE_DATABASES.append((uri, name))
    return str(sqlalchemy.engine.make_url(uri).set(database=name).render_as_string(hide_password=False))


def _drop_side_databases() -> None:
    import sqlalchemy
    while _SIDE_DATABASES:
        uri, name = _SIDE_DATABASES.pop()
        engine = sqlalchemy.create_engine(uri, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as fh:
        return subprocess.Popen(command, env=env, cwd=log.parent, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_the_upgrade_job_migrates_the_previous_schema_before_the_server_starts(manifests, pg_database, tmp_path):
    from alembic import command
    from mlflow import MlflowClient
    from mlflow.store.db.utils import _get_alembic_config, _get_latest_schema_revision

    head = _get_latest_schema_revision()
    # 1. a database of the MLflow before this one: the current schema, with data, one revision down
    client = MlflowClient(tracking_uri=pg_database)
    experiment = client.create_experiment("written-before-the-upgrade")
    command.downgrade(_get_alembic_config(pg_database), "-1")
    older = _schema_revision(pg_database)
    assert older != head

    server_cmd, env = _server_env(manifests["dev"], pg_database, tmp_path)

    # 3. the Job's exact command and environment (the Secret's URI pointed at this database)
    (job,) = [d for d in manifests["upgrade"] if d["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    job_env = container_env(manifests["dev"] + manifests["upgrade"], job, container)
    assert job_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")  # the dev Secret's
    job_env.update(MLFLOW_BACKEND_STORE_URI=pg_database, PATH=env["PATH"], HOME=str(tmp_path),
                   TMPDIR=str(tmp_path))
    argv = [expand(part, job_env) for part in container["command"] + container["args"]]
    migrated = subprocess.run(argv, env=job_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert migrated.returncode == 0, migrated.stdout[-3000:] + migrated.stderr[-3000:]
    assert _schema_revision(pg_database) == head
    again = subprocess.run(argv, env=job_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and _schema_revision(pg_database) == head  # idempotent

    # 4. now the same server starts, answers its probe and has the data of before
    server = _start(server_cmd, env, tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 240  # a guard against hanging, not a timing check
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                if http_get(int(env["PORT"]), "/health", "kubelet.probe")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-4000:]
            time.sleep(1)
        # the data of before, through the store the server serves (its API may need a login)
        assert MlflowClient(tracking_uri=pg_database).get_experiment(experiment).name == "written-before-the-upgrade"
    finally:
        stop_process_group(server)
        _drop_side_databases()


def test_the_upgrade_job_runs_the_servers_image_and_is_a_valid_job(manifests):
    """The Job is the migration of the image the services overlays roll out (same name and
    tag), reads the server's own database Secret, runs as the server does (non-root, no
    token, read-only root), is not retried blind, and the dev database admits it."""
    import kubernetes_validate
    (job,) = manifests["upgrade"]
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert job["metadata"]["namespace"] == "cladapter" and job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == mlflow_container(manifests["dev"])["image"]
    prod = render_overlay("prod", Path(__import__("tempfile").mkdtemp()))
    assert container["image"] == mlflow_container(prod)["image"]
    ref = {e["name"]: e for e in container["env"]}["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "cladapter-mlflow-db", "key": "MLFLOW_BACKEND_STORE_URI"}
    assert "mlflow db upgrade" in " ".join(container["args"]) and "postgresql" not in str(container)
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    labels = pod.get("metadata", job["spec"]["template"]["metadata"])["labels"]
    service = find(manifests["dev"], "Service", "cladapter-mlflow")
    assert not service["spec"]["selector"].items() <= labels.items()  # no requests sent to the Job
    policy = find(manifests["dev"], "NetworkPolicy", "cladapter-postgres")
    assert policy_allows(policy, 5432, {}, labels, True)
    readme = (REPO / "infra" / "README.md").read_text()
    for step in ("kubectl apply -k infra/k8s/mlflow-upgrade", "job/cladapter-mlflow-db-upgrade",
                 "--replicas=0"):
        assert step in readme, step
    assert "exec deploy/cladapter-mlflow -- sh -c 'mlflow db upgrade" not in readme
