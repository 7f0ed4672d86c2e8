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

import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port

from test_infra import (K8S, container_env, expand, find, http_get, mlflow_container, render_overlay,
                        run, stop_process_group, tool)

UPGRADE = K8S / "mlflow-upgrade"


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict:
    """The dev services and the upgrade Job, rendered by kustomize."""
    import yaml
    dev = render_overlay("dev", tmp_path_factory.mktemp("dev"))
    proc = run([tool("kubectl"), "kustomize", str(UPGRADE)])
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
    import os
    deployment, container = find(docs, "Deployment", "cladapter-mlflow"), mlflow_container(docs)
    env = container_env(docs, deployment, container)
    env.update(MLFLOW_BACKEND_STORE_URI=uri, HOME=str(tmp), TMPDIR=str(tmp),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    port = free_port()
    args = [expand(a, env) for a in container["args"]]
    args = [f"--port={port}" if a.startswith("--port=") else
            "--host=127.0.0.1" if a.startswith("--host=") else a for a in args]
    return [tool(container["command"][0]), *container["command"][1:], *args], {**env, "PORT": str(port)}


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
        status, body = http_get(int(env["PORT"]), f"/api/2.0/mlflow/experiments/get?experiment_id={experiment}",
                                "localhost")
        assert status == 200 and "written-before-the-upgrade" in body, body
    finally:
        stop_process_group(server)


def test_the_upgrade_job_runs_the_servers_image_and_is_a_valid_job(manifests):
    """The Job is the migration of the image the services overlays roll out (same name and
    tag), reads the server's own database Secret, runs as the server does (non-root, no
    token, read-only root), is not retried blind, and the dev database admits it."""
    import kubernetes_validate
    from test_infra import K8S_VERSION, policy_allows
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
