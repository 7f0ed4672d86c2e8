"""Least privilege below MLflow: what each identity of the install can do in PostgreSQL
and in S3, whatever MLflow's own authentication says.

PostgreSQL: the dev overlay's init SQL (infra/k8s/overlays/dev/postgres-init/roles.psql)
is run with psql, as its entrypoint runs it, on the machine's PostgreSQL under
throw-away names, and the roles are then used for real: MLflow's role builds MLflow's
schema, Optuna's its study tables, and neither reaches the other's database.

S3: the policy documents the dev overlay's MinIO gets (JSON, AWS IAM syntax, the same
for an AWS install) are attached to users of a moto S3 server that checks IAM, and each
identity is tried on each bucket for real. The manifests (kustomize, as
tests/test_infra.py renders them) wire those identities and close MinIO to other pods.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from helpers import BIN, free_port
from infra_helpers import (INSTALL_MODES, K8S, compiled_pod_labels, find, generated, pod_specs,
                           policy_allows, render_overlay, secret_data)

DEV = K8S / "overlays" / "dev"
INIT_SQL = DEV / "postgres-init" / "roles.psql"
INIT_SH = DEV / "postgres-init" / "10-roles.sh"
POLICIES = DEV / "minio-policies"
PG_HOST, PG_PORT, PG_ADMIN = "127.0.0.1", 5432, "postgres"


# ----------------------------------------------------------------------------- PostgreSQL

def psql(*args: str, user: str = PG_ADMIN, db: str = "postgres", env: dict | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("psql")
    if exe is None:
        pytest.fail("psql is not on PATH: install PostgreSQL's client (Debian: postgresql-client)")
    proc = subprocess.run([exe, "-X", "-q", "-At", "-h", PG_HOST, "-p", str(PG_PORT), "-U", user,
                           "-d", db, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def pg_roles():
    """The init SQL run once under names of its own (`h7lp_<random>_*`), all dropped after."""
    import psycopg2
    try:
        admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_ADMIN, dbname="postgres",
                                 connect_timeout=10)
    except psycopg2.OperationalError as e:
        pytest.skip(f"PostgreSQL at {PG_HOST}:{PG_PORT} unavailable: {e}")
    admin.autocommit = True
    prefix = f"h7lp_{uuid.uuid4().hex[:8]}"
    names = SimpleNamespace(mlflow_role=f"{prefix}_mlflow", mlflow_db=f"{prefix}_mlflow",
                            mlflow_auth_db=f"{prefix}_mlflow_auth",
                            optuna_role=f"{prefix}_optuna", optuna_db=f"{prefix}_optuna",
                            admin_db=f"{prefix}_admin", template_db=f"{prefix}_template")
    with admin.cursor() as cur:  # stand-ins for the admin's database and template1
        cur.execute(f'CREATE DATABASE "{names.admin_db}"')
        cur.execute(f'CREATE DATABASE "{names.template_db}"')
    try:
        variables = [f"--variable={k}={getattr(names, k)}" for k in
                     ("mlflow_role", "mlflow_db", "mlflow_auth_db", "optuna_role", "optuna_db", "template_db")]
        proc = psql("-v", "ON_ERROR_STOP=1", *variables, "-f", str(INIT_SQL), db=names.admin_db,
                    env={"MLFLOW_DB_PASSWORD": "mlflow-pw-1", "OPTUNA_DB_PASSWORD": "optuna-pw-2"},  # pragma: allowlist secret
                    check=False)
        assert proc.returncode == 0, f"the init SQL failed:\n{proc.stderr}"
        yield names
    finally:
        with admin.cursor() as cur:
            for db in (names.mlflow_db, names.mlflow_auth_db, names.optuna_db, names.admin_db, names.template_db):
                cur.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            for role in (names.mlflow_role, names.optuna_role):
                cur.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.close()


def url(role: str, db: str) -> str:
    # trust auth on this server: the role is who connects; CONNECT privileges still apply
    return f"postgresql+psycopg2://{role}@{PG_HOST}:{PG_PORT}/{db}"


def test_init_sql_gives_each_service_a_role_that_owns_only_its_database(pg_roles):
    r = pg_roles
    rows = psql("-c", "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolreplication, "
                      "rolbypassrls, rolcanlogin, rolpassword IS NOT NULL FROM pg_authid "
                      f"WHERE rolname IN ('{r.mlflow_role}', '{r.optuna_role}') ORDER BY 1").stdout
    # no superuser, no CREATEDB/CREATEROLE/REPLICATION/BYPASSRLS; a password each
    assert rows.split() == [f"{r.mlflow_role}|f|f|f|f|f|t|t", f"{r.optuna_role}|f|f|f|f|f|t|t"]
    owners = psql("-c", "SELECT datname, pg_get_userbyid(datdba) FROM pg_database "
                        f"WHERE datname LIKE '{r.mlflow_db.rsplit('_', 1)[0]}%' ORDER BY 1").stdout
    assert f"{r.mlflow_db}|{r.mlflow_role}" in owners.split()
    assert f"{r.mlflow_auth_db}|{r.mlflow_role}" in owners.split()  # the auth app's users
    assert f"{r.optuna_db}|{r.optuna_role}" in owners.split()
    # PUBLIC has no CONNECT on any database the script touched: an ACL without "=c"
    for db in (r.mlflow_db, r.mlflow_auth_db, r.optuna_db, r.admin_db, r.template_db):
        acl = psql("-c", f"SELECT datacl FROM pg_database WHERE datname = '{db}'").stdout.strip()
        assert acl and not re.search(r"(^|[{,])=[A-Za-z]*c", acl), f"{db}: PUBLIC still has CONNECT ({acl})"
        for role in (r.mlflow_role, r.optuna_role):
            owner = (db in (r.mlflow_db, r.mlflow_auth_db) and role == r.mlflow_role) or \
                (db == r.optuna_db and role == r.optuna_role)
            allowed = psql("-c", f"SELECT has_database_privilege('{role}', '{db}', 'CONNECT')").stdout.strip()
            assert allowed == ("t" if owner else "f"), (role, db, allowed)


def test_optuna_cannot_reach_the_registry_and_mlflow_works_unprivileged(pg_roles):
    """MLflow's own schema made by its unprivileged role; Optuna's study by its own; the
    tuning role can neither connect to MLflow's database nor read registered_model_aliases."""
    import optuna
    import sqlalchemy
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    r = pg_roles
    store = SqlAlchemyStore(url(r.mlflow_role, r.mlflow_db), "file:///nonexistent-artifacts")
    store.engine.dispose()
    tables = psql("-c", "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
                  db=r.mlflow_db).stdout.split()
    assert "registered_model_aliases" in tables and "model_versions" in tables
    assert psql("-c", "SELECT has_table_privilege('{}', 'registered_model_aliases', 'SELECT,UPDATE')"
                .format(r.optuna_role), db=r.mlflow_db).stdout.strip() == "f"

    # the tuning workers' storage, as the tuning role: works in its own database
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url(r.optuna_role, r.optuna_db))
    study = optuna.create_study(study_name="h7", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2
    storage.engine.dispose()

    # ... and nowhere else: MLflow's database refuses the connection itself
    denied = psql("-c", "UPDATE registered_model_aliases SET version = 1", user=r.optuna_role,
                  db=r.mlflow_db, check=False)
    assert denied.returncode != 0 and "permission denied for database" in denied.stderr, denied.stderr
    engine = sqlalchemy.create_engine(url(r.optuna_role, r.mlflow_db))
    with pytest.raises(sqlalchemy.exc.OperationalError, match="permission denied for database"):
        engine.connect()
    engine.dispose()
    # nor can MLflow's role open the study database, nor either role the admin's
    for role, db in ((r.mlflow_role, r.optuna_db), (r.optuna_role, r.admin_db), (r.mlflow_role, r.admin_db)):
        proc = psql("-c", "SELECT 1", user=role, db=db, check=False)
        assert proc.returncode != 0 and "permission denied for database" in proc.stderr, (role, db)


def test_init_sql_stops_without_a_password_and_leaves_no_role():
    """An unset password variable stops the script at the first role (ON_ERROR_STOP) and
    the entrypoint's wrapper names the missing key before psql even starts."""
    prefix = f"h7lp_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DB_PASSWORD")}
    proc = subprocess.run([shutil.which("psql") or "psql", "-X", "-q", "-h", PG_HOST, "-U", PG_ADMIN,
                           "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-v", f"mlflow_role={prefix}_m",
                           "-v", f"optuna_role={prefix}_o", "-v", f"mlflow_db={prefix}_m",
                           "-v", f"optuna_db={prefix}_o", "-f", str(INIT_SQL)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0 and "syntax error" in proc.stderr, proc.stderr
    left = psql("-c", f"SELECT count(*) FROM pg_roles WHERE rolname LIKE '{prefix}%'").stdout.strip()
    assert left == "0"
    wrapper = subprocess.run(["sh", "-c", f'. "{INIT_SH}"'], capture_output=True, text=True,
                             timeout=30, env={"PATH": os.environ["PATH"], "POSTGRES_USER": "x",
                                              "POSTGRES_DB": "x"})
    assert wrapper.returncode != 0 and "MLFLOW_DB_PASSWORD" in wrapper.stderr, wrapper.stderr


def test_dev_secrets_give_mlflow_and_optuna_their_own_roles(dev_rendered):
    """The Secret templates agree with the init SQL: the server connects as `mlflow`,
    the tuning workers as `optuna` to `optuna`, the admin is neither."""
    dev = dev_rendered["dev"]
    postgres = secret_data(dev, "cladapter-postgres")
    db = urlsplit(secret_data(dev, "cladapter-mlflow-db")["MLFLOW_BACKEND_STORE_URI"])
    assert (db.username, db.path) == ("mlflow", "/mlflow")
    assert postgres["POSTGRES_USER"] not in ("mlflow", "optuna")
    assert {"MLFLOW_DB_PASSWORD", "OPTUNA_DB_PASSWORD"} <= postgres.keys()
    init = generated(dev, "ConfigMap", "cladapter-postgres-init")
    assert set(init["data"]) == {"10-roles.sh", "roles.psql"}
    assert init["data"]["roles.psql"] == INIT_SQL.read_text()
    for mode in INSTALL_MODES:
        text = (K8S / "overlays" / mode / "secrets" / "tune.env.example").read_text()
        (line,) = [ln for ln in text.splitlines() if ln.startswith("CLADAPTER_TUNE_STORAGE=")]
        tune = urlsplit(line.split("=", 1)[1])
        assert (tune.username, tune.path) == ("optuna", "/optuna"), line


# ----------------------------------------------------------------------------- S3

IDENTITIES = {"cladapter-mlflow-server", "cladapter-runs", "cladapter-data-writer"}


def policy(name: str) -> dict:
    return json.loads((POLICIES / f"{name}.json").read_text())


def buckets_of(doc: dict, effect: str = "Allow", write: bool | None = None) -> set[str]:
    """Buckets a policy's statements of `effect` name (write=True: only statements that
    put or delete objects; False: only those that read them)."""
    out = set()
    for st in doc["Statement"]:
        if st["Effect"] != effect:
            continue
        actions = set(st["Action"])
        writes = bool(actions & {"s3:PutObject", "s3:DeleteObject", "s3:*"})
        if write is not None and writes != write:
            continue
        out |= {re.match(r"arn:aws:s3:::([^/]+)", r).group(1) for r in st["Resource"]}
    return out


@pytest.fixture(scope="module")
def dev_rendered(tmp_path_factory):
    base = tmp_path_factory.mktemp("lp-k8s")
    return {o: render_overlay(o, base / o) for o in ("dev", "standalone")}


def test_each_identity_reaches_only_its_buckets():
    """The policy documents: the server alone writes the registry's bucket; the runs read
    datasets and write checkpoints and are denied the registry outright."""
    assert {p.stem for p in POLICIES.glob("*.json")} == IDENTITIES
    server, runs, writer = (policy(n) for n in ("cladapter-mlflow-server", "cladapter-runs",
                                                "cladapter-data-writer"))
    for doc in (server, runs, writer):
        for st in doc["Statement"]:
            if st["Effect"] == "Allow":  # no wildcard grants, no "every bucket"
                assert not [a for a in st["Action"] if "*" in a], st
                assert not [r for r in st["Resource"] if r in ("*", "arn:aws:s3:::*")], st
    assert buckets_of(server) == buckets_of(server, write=True) == {"mlflow"}
    assert buckets_of(runs, write=True) == {"checkpoints"}
    assert buckets_of(runs) == {"checkpoints", "datasets"}
    assert buckets_of(runs, "Deny") == buckets_of(writer, "Deny") == {"mlflow"}
    assert buckets_of(writer) == buckets_of(writer, write=True) == {"datasets"}


def test_manifests_wire_one_identity_per_job(dev_rendered):
    dev, runs = dev_rendered["dev"], dev_rendered["standalone"]
    # MinIO's root: MinIO and its setup Job only
    readers = {}
    for owner, spec in pod_specs(dev):
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
                if ref:
                    readers.setdefault(ref, set()).add(owner["metadata"]["name"])
            for ref in c.get("envFrom", []):
                if "secretRef" in ref:
                    readers.setdefault(ref["secretRef"]["name"], set()).add(owner["metadata"]["name"])
    assert readers["cladapter-minio-root"] == {"cladapter-minio", "cladapter-minio-buckets"}
    assert readers["cladapter-minio-users"] == {"cladapter-minio-buckets"}
    assert "cladapter-minio" not in readers["cladapter-s3"]  # the server's key is not MinIO's root
    # the setup Job attaches each policy file, made from these very files
    job = find(dev, "Job", "cladapter-minio-buckets")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    attached = set(re.findall(r"^user .* (cladapter-[a-z-]+)$", script, re.M))
    assert attached == IDENTITIES
    cm = generated(dev, "ConfigMap", "cladapter-minio-policies")
    assert {k: json.loads(v) for k, v in cm["data"].items()} == {f"{n}.json": policy(n) for n in IDENTITIES}
    (volume,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "policies"]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    # every bucket a policy names is created; the registry's is the server's destination
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    server_cm = generated(dev, "ConfigMap", "cladapter-mlflow-server")
    registry = urlsplit(server_cm["data"]["MLFLOW_ARTIFACTS_DESTINATION"]).netloc
    created = {registry, *env["BUCKETS"].split()}
    named = set().union(*(buckets_of(policy(n)) | buckets_of(policy(n), "Deny") for n in IDENTITIES))
    assert named <= created and buckets_of(policy("cladapter-mlflow-server"), write=True) == {registry}
    # the runs' checkpoints go to a bucket they may write, which is not the registry's
    root = find(runs, "ConfigMap", "cladapter-pipeline")["data"]["CLADAPTER_CHECKPOINT_ROOT"]
    bucket = urlsplit(root).netloc
    assert bucket in buckets_of(policy("cladapter-runs"), write=True) and bucket != registry
    # the pretrained weights mirror is a bucket the runs read and the data writer fills
    mirror = urlsplit(find(runs, "ConfigMap", "cladapter-pipeline")["data"]["CLADAPTER_WEIGHTS_MIRROR"]).netloc
    assert mirror in buckets_of(policy("cladapter-runs")) and mirror != registry
    assert mirror in buckets_of(policy("cladapter-data-writer"), write=True)


def test_minio_is_closed_to_all_but_its_clients(dev_rendered, compiled_labels):
    dev = dev_rendered["dev"]
    np_ = find(dev, "NetworkPolicy", "cladapter-minio")
    minio = find(dev, "Deployment", "cladapter-minio")["spec"]["template"]["metadata"]["labels"]
    assert np_["spec"]["podSelector"]["matchLabels"].items() <= minio.items()
    assert np_["spec"]["policyTypes"] == ["Ingress"]
    labels = {name: find(dev, kind, name)["spec"]["template"]["metadata"]["labels"]
              for kind, name in (("Deployment", "cladapter-mlflow"), ("Job", "cladapter-minio-buckets"),
                                 ("StatefulSet", "cladapter-postgres"))}
    standalone = {"kubernetes.io/metadata.name": "kubeflow"}
    profile = {"kubernetes.io/metadata.name": "kubeflow-user-example-com",
               "app.kubernetes.io/part-of": "kubeflow-profile"}
    elsewhere = {"kubernetes.io/metadata.name": "default"}
    train = compiled_labels["exec-train-stage1"]
    assert policy_allows(np_, 9000, {}, labels["cladapter-mlflow"], True)
    assert policy_allows(np_, 9000, {}, labels["cladapter-minio-buckets"], True)
    assert not policy_allows(np_, 9000, {}, labels["cladapter-postgres"], True)
    assert not policy_allows(np_, 9000, {}, {"app": "anything"}, True)
    for ns in (standalone, profile):
        assert policy_allows(np_, 9000, ns, train, False)
        assert not policy_allows(np_, 9000, ns, {}, False)
    assert not policy_allows(np_, 9000, elsewhere, train, False)
    # the console: nobody, and the Service does not even offer it
    for ns, pod, same in (({}, labels["cladapter-mlflow"], True), (standalone, train, False),
                          ({}, {"app": "anything"}, True)):
        assert not policy_allows(np_, 9001, ns, pod, same)
    assert [p["port"] for p in find(dev, "Service", "cladapter-minio")["spec"]["ports"]] == [9000]


@pytest.fixture(scope="module")
def compiled_labels():
    return compiled_pod_labels()


@pytest.fixture(scope="module")
def s3_policies(tmp_path_factory):
    """A moto S3 server that checks IAM: one user per policy document, the three buckets
    with one object each, made before authentication is switched on."""
    import boto3
    import requests
    from fixtures_services import _stop, _wait_http

    port = free_port()
    log = tmp_path_factory.mktemp("moto_policies") / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_http(endpoint + "/moto-api/", proc, log, timeout=60)
        setup = dict(endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="setup", aws_secret_access_key="setup")
        iam, s3 = boto3.client("iam", **setup), boto3.client("s3", **setup)
        clients = {}
        for name in sorted(IDENTITIES):
            iam.create_user(UserName=name)
            key = iam.create_access_key(UserName=name)["AccessKey"]
            iam.put_user_policy(UserName=name, PolicyName=name,
                                PolicyDocument=(POLICIES / f"{name}.json").read_text())
            clients[name] = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                         aws_access_key_id=key["AccessKeyId"],
                                         aws_secret_access_key=key["SecretAccessKey"])
        for bucket in ("mlflow", "checkpoints", "datasets"):
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="seed", Body=b"x")
        requests.post(endpoint + "/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        yield clients
    finally:
        _stop(proc)


def can(client, op: str, bucket: str) -> bool:
    from botocore.exceptions import ClientError
    try:
        if op == "get":
            client.get_object(Bucket=bucket, Key="seed")["Body"].read()
        elif op == "list":
            client.list_objects_v2(Bucket=bucket)
        elif op == "put":
            client.put_object(Bucket=bucket, Key=f"probe-{uuid.uuid4().hex[:6]}", Body=b"y")
        elif op == "delete":
            client.delete_object(Bucket=bucket, Key="seed-to-delete")
        return True
    except ClientError as e:
        assert e.response["Error"]["Code"] == "AccessDenied", e.response["Error"]
        return False


def test_s3_enforces_the_policies_per_identity(s3_policies):
    """Each identity tried on each bucket against an S3 server that evaluates the
    attached IAM policies (moto): what is allowed works, the rest is AccessDenied."""
    expected = {
        "cladapter-mlflow-server": {"mlflow": {"get", "list", "put", "delete"}},
        "cladapter-runs": {"datasets": {"get", "list"}, "checkpoints": {"get", "list", "put", "delete"}},
        "cladapter-data-writer": {"datasets": {"get", "list", "put", "delete"}},
    }
    seen = {}
    for name, client in s3_policies.items():
        for bucket in ("mlflow", "checkpoints", "datasets"):
            for op in ("get", "list", "put", "delete"):
                seen.setdefault(name, {}).setdefault(bucket, set())
                if can(client, op, bucket):
                    seen[name][bucket].add(op)
        seen[name] = {b: ops for b, ops in seen[name].items() if ops}
    assert seen == expected
