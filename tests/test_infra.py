"""infra/: the GPU image's and the MLflow server's Dockerfiles and the Kubernetes
manifests, checked offline.

There is no Docker engine and no cluster here, so: hadolint lints the Dockerfiles; the
real kustomize (`kubectl kustomize`) renders each overlay (the server side, dev and prod;
the install modes, standalone and multi-user), with its secrets generated from the
committed *.env.example templates; kubernetes-validate checks every rendered object
against the Kubernetes schemas; the runner's Role is checked for least privilege and the
NetworkPolicies for whom they let in; the MLflow server is started from the rendered
Deployment's own command, arguments and environment against the local PostgreSQL.
Tools: infra/scripts/install-tools.sh.
"""

from __future__ import annotations

import base64
import copy
import http.client
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from helpers import REPO, free_port

INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
MLFLOW_DOCKERFILE = INFRA / "docker" / "mlflow.Dockerfile"
MLFLOW_REQUIREMENTS = INFRA / "docker" / "mlflow-requirements.txt"
K8S = INFRA / "k8s"
OVERLAYS = ("dev", "prod")                     # the services: MLflow (+ PostgreSQL, MinIO in dev)
INSTALL_MODES = {"standalone": "kubeflow",     # what the runs need, where they start
                 "multi-user": "kubeflow-user-example-com"}
ALL_OVERLAYS = OVERLAYS + tuple(INSTALL_MODES)
NAMESPACE = "cladapter"
IMAGE = "ghcr.io/cladapter/cladapter:0.1.0"
MLFLOW_IMAGE = "ghcr.io/cladapter/cladapter-mlflow:0.1.0"
# The oldest Kubernetes the manifests must apply to (kubernetes-validate ships 1.25+).
K8S_VERSION = "1.29.0"
INSTALL_HINT = "install it with infra/scripts/install-tools.sh"
PLACEHOLDER = "REPLACE_ME"
# Secrets the KFP pipeline's pods read by name, and the keys it reads from them.
# Every key the pipeline maps must be in the Secret (no `optional` on the oldest supported
# KFP backend: a missing key stops the pod); pipelines/cladapter_pipeline.py SECRET_KEYS.
PIPELINE_SECRETS = {
    "cladapter-mlflow": {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                         "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "CLADAPTER_OUTER_RUN"},
    "cladapter-mlflow-promoter": {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                  "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "CLADAPTER_OUTER_RUN"},
    "cladapter-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                     "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION"},
    "cladapter-tune": {"CLADAPTER_TUNE_STORAGE"},
}
PIPELINE_CONFIG_MAPS = {"cladapter-pipeline": {"CLADAPTER_CHECKPOINT_ROOT", "CLADAPTER_WEIGHTS_MIRROR"}}
# A local PostgreSQL (trust auth) for the server test; a throw-away database is made in it.
POSTGRES_ADMIN_URI = os.environ.get("CLADAPTER_TEST_POSTGRES",
                                    "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


# ----------------------------------------------------------------------------- helpers

def tool(name: str) -> str:
    """A command-line tool from the test's virtualenv, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is neither next to {sys.executable} nor on PATH: {INSTALL_HINT}")
    return found


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


def render_overlay(overlay: str, workdir: Path) -> list[dict]:
    """`kubectl kustomize` on a copy of infra/k8s whose secrets are the templates."""
    tree = workdir / "k8s"
    # Filled-in *.env files someone has locally are never read, let alone copied.
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))
    for template in tree.rglob("*.env.example"):
        shutil.copyfile(template, template.with_suffix(""))
    proc = run([tool("kubectl"), "kustomize", str(tree / "overlays" / overlay)])
    assert proc.returncode == 0, f"kustomize failed on overlays/{overlay}:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    return {o: render_overlay(o, tmp_path_factory.mktemp(f"k8s-{o}")) for o in ALL_OVERLAYS}


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_specs(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            yield doc, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            yield doc, doc["spec"]


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def secret_data(docs: list[dict], name: str) -> dict[str, str]:
    secret = find(docs, "Secret", name)
    plain = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    plain.update(secret.get("stringData", {}))
    return plain


def mlflow_container(docs: list[dict]) -> dict:
    deployment = find(docs, "Deployment", "cladapter-mlflow")
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                    if c["name"] == "mlflow"]
    return container


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args ($$ escapes $)."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(sub, text)


def container_env(docs: list[dict], owner: dict, container: dict) -> dict[str, str]:
    """The environment the kubelet would give the container (envFrom, then env in order)."""
    env: dict[str, str] = {}

    def source(kind: str, name: str) -> dict[str, str]:
        if kind == "Secret":
            return secret_data(docs, name)
        return dict(find(docs, "ConfigMap", name).get("data", {}))

    for ref in container.get("envFrom", []):
        if "secretRef" in ref:
            env.update(source("Secret", ref["secretRef"]["name"]))
        else:
            env.update(source("ConfigMap", ref["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        frm = var["valueFrom"]
        if "fieldRef" in frm:
            assert frm["fieldRef"]["fieldPath"] == "metadata.namespace", frm
            env[var["name"]] = owner["metadata"]["namespace"]
            continue
        kind, ref = (("Secret", frm["secretKeyRef"]) if "secretKeyRef" in frm
                     else ("ConfigMap", frm["configMapKeyRef"]))
        values = source(kind, ref["name"])
        if ref["key"] in values:
            env[var["name"]] = values[ref["key"]]
        else:
            assert ref.get("optional"), f"{kind} {ref['name']} has no key {ref['key']}"
    return env


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def built_from(all_stages: list, stage: list) -> list[tuple[str, str]]:
    """The instructions an image of `stage` carries: its own and those of every stage it is
    built FROM (an image inherits their ARG scope no further, their ENV and LABELs whole)."""
    by_alias = {s[0][1].split()[-1]: s for s in all_stages if " AS " in s[0][1].upper()}
    chain = [stage]
    while chain[-1][0][1].split()[0] in by_alias:
        chain.append(by_alias[chain[-1][0][1].split()[0]])
    return [ins for st in reversed(chain) for ins in st]


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches parents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


SENSITIVE_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE|CREDENTIAL", re.I)


def template_problems(name: str, text: str) -> list[str]:
    """Real-looking values in a secret template; commented-out lines count too."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        body = line.lstrip("# ").strip()
        if "=" not in body or " " in body.split("=", 1)[0]:
            continue  # prose, not KEY=VALUE
        key, value = body.split("=", 1)
        if SENSITIVE_KEY.search(key) and value not in (PLACEHOLDER, ""):  # empty: not set
            problems.append(f"{name}:{number}: {key} must be {PLACEHOLDER}, not a value")
        if "://" in value and urlsplit(value).password not in (None, PLACEHOLDER):
            problems.append(f"{name}:{number}: {key} has a password in its URI")
    return problems


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the session the test started (the server and its workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # the whole group has exited already
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def http_get(port: int, path: str, host: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


# ----------------------------------------------------------------------------- Dockerfile

def test_hadolint_passes_on_the_dockerfile():
    proc = run([tool("hadolint"), "--no-color", str(DOCKERFILE)])
    assert proc.returncode == 0, f"hadolint found problems:\n{proc.stdout}{proc.stderr}"


def test_hadolint_rejects_a_careless_dockerfile(tmp_path):
    # Proves the linter really runs: an unpinned base and unpinned, uncleaned apt.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    proc = run([tool("hadolint"), "--no-color", str(bad)])
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3008" in proc.stdout, proc.stdout


def test_dockerfile_is_pinned_non_root_secret_free_and_copies_what_exists():
    """What `docker build` would make of infra/docker/Dockerfile, read from the file (no
    image is built here): pinned base images, a numeric non-root USER, no secret in ENV or
    ARG, the constraints installed, every COPY source present, the Python of pyproject."""
    text = DOCKERFILE.read_text()
    instructions = dockerfile_instructions(text)
    all_stages = stages(instructions)
    aliases = {s[0][1].split()[-1] for s in all_stages if " AS " in s[0][1].upper()}
    for stage in all_stages:
        image = stage[0][1].split()[0]
        if image in aliases:
            continue
        assert re.search(r":[^:/]*\d", image) and not image.endswith(":latest"), \
            f"base image {image} must carry a pinned version tag"
    cuda = [s[0][1].split()[0].split("@")[0] for s in all_stages if s[0][1].startswith("nvidia/cuda:")]
    assert cuda and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]+-ubuntu22\.04", cuda[0]), cuda

    by_alias = {s[0][1].split()[-1]: s for s in all_stages if " AS " in s[0][1].upper()}
    for final in (all_stages[-1], by_alias["light"]):  # the GPU image (default target) and the light one
        users = [args for kw, args in final if kw == "USER"]
        assert users, "the final stage must switch to a non-root USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric non-root UID"
        image = built_from(all_stages, final)
        entry = [args for kw, args in image if kw == "ENTRYPOINT"]
        assert entry and json.loads(entry[-1]) == ["cladapter"], entry
        env_text = " ".join(args for kw, args in image if kw == "ENV")
        assert "PYTHONUNBUFFERED=1" in env_text and "CLADAPTER_GIT_COMMIT=${GIT_COMMIT}" in env_text
    for kw, args in instructions:
        if kw in {"ENV", "ARG"}:
            assert not SENSITIVE_KEY.search(args.split("=")[0] if kw == "ARG" else args), \
                f"{kw} {args}: no secrets in the image"

    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    # every dependency by hash, then the project without fetching (tests/test_supply_chain.py)
    assert "pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock" in runs
    assert "pip install --no-cache-dir --no-deps --no-build-isolation ." in runs
    # What the build copies exists in the context (the repository root).
    for kw, args in instructions:
        if kw == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source == "." or (REPO / source).exists(), f"COPY {source}: no such file"
                patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                            if ln.strip() and not ln.startswith("#")]
                assert source == "." or not dockerignore_excludes(source, patterns), \
                    f"COPY {source}: left out of the build context by {DOCKERIGNORE.name}"
    # The Python the image installs satisfies the project's requires-python.
    python = re.search(r"uv python install (\d+\.\d+)\.\d+", runs)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python and python.group(1) == "3.11" and ">=3.11" in requires, (python, requires)


def test_image_carries_its_git_commit():
    """Lineage: the commit arrives as a build argument and becomes the OCI revision label
    and $CLADAPTER_GIT_COMMIT, which the pipeline steps tag their MLflow runs with."""
    all_stages = stages(dockerfile_instructions(DOCKERFILE.read_text()))
    by_alias = {s[0][1].split()[-1]: s for s in all_stages if " AS " in s[0][1].upper()}
    for final in (all_stages[-1], by_alias["light"]):
        image = built_from(all_stages, final)
        # the ARG, its label and its variable in one stage (an ARG is scoped to its stage)
        carrier = next(st for st in all_stages if ("ARG", "GIT_COMMIT=unknown") in st)
        assert all(ins in image for ins in carrier)
        labels = " ".join(a for kw, a in carrier if kw == "LABEL")
        env_text = " ".join(a for kw, a in carrier if kw == "ENV")
        assert 'org.opencontainers.image.revision="${GIT_COMMIT}"' in labels
        assert "CLADAPTER_GIT_COMMIT=${GIT_COMMIT}" in env_text
    from components.lineage import GIT_ENV
    assert GIT_ENV == "CLADAPTER_GIT_COMMIT"
    assert '--build-arg GIT_COMMIT="$(git rev-parse HEAD)"' in (INFRA / "README.md").read_text()


def test_dockerfile_dependency_layer_installs_the_pyproject_pins():
    """The image's dependency layer is the hashed lock; the lock pins torch and torchvision
    as pyproject.toml and constraints.txt do, at the versions the tests run (the rest of
    the lock: tests/test_supply_chain.py)."""
    runs = [args for kw, args in dockerfile_instructions(DOCKERFILE.read_text()) if kw == "RUN"]
    assert any("--require-hashes" in r and "-r requirements.lock" in r for r in runs), runs
    lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (INFRA / "docker" / "requirements.lock").read_text(), re.M))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {r.split("==")[0]: r.split("==")[1] for r in project["dependencies"] if "==" in r}
    constraints = dict(line.split("==", 1) for line in
                       (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    for package in ("torch", "torchvision"):
        assert package in pins, f"pyproject.toml must pin {package} exactly"
        assert constraints.get(package) == pins[package] == lock.get(package), \
            f"constraints.txt or the lock disagrees on {package}"
        installed = importlib.metadata.version(package).split("+")[0]
        assert installed == pins[package], f"{package}: tests run {installed}, image gets {pins[package]}"


def test_cuda_base_matches_the_torch_build():
    requires = importlib.metadata.requires("torch") or []
    majors = {int(m) for r in requires
              for m in re.findall(r"(?:^cuda-toolkit\[.*\]==|-cu)(\d+)", r.split(";")[0])}
    if not majors:
        pytest.skip("the installed torch is a CPU build: no CUDA version to compare")
    base = re.search(r"FROM nvidia/cuda:(\d+)\.", DOCKERFILE.read_text())
    assert base and {int(base.group(1))} == majors, \
        f"base image CUDA {base and base.group(1)} vs torch built for CUDA {sorted(majors)}"


def test_dockerignore_drops_secrets_and_keeps_build_inputs():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".git/config", ".venv/bin/python", "infra/k8s/overlays/dev/secrets/s3.env",
                 "somewhere/deep/.env", "data/demo/x.png", "mlruns/0/meta.yaml",
                 "cladapter_core/__pycache__/model.cpython-311.pyc"):
        assert dockerignore_excludes(path, patterns), f"{path} would enter the build context"
    tracked = run(["git", "ls-files", "cladapter_core"], cwd=REPO).stdout.split()
    for path in ["pyproject.toml", "constraints.txt", "README.md", *tracked]:
        assert not dockerignore_excludes(path, patterns), f"{path} is needed by pip install ."


def test_mlflow_server_image_is_slim_pinned_and_lint_clean():
    """The server's own image: hadolint-clean, pinned slim Python base, non-root, the
    clients' MLflow (the versions of constraints.txt and of this environment, where the
    server test below runs it), and none of the training stack."""
    proc = run([tool("hadolint"), "--no-color", str(MLFLOW_DOCKERFILE)])
    assert proc.returncode == 0, f"hadolint found problems:\n{proc.stdout}{proc.stderr}"
    instructions = dockerfile_instructions(MLFLOW_DOCKERFILE.read_text())
    all_stages = stages(instructions)
    aliases = {s[0][1].split()[-1] for s in all_stages if " AS " in s[0][1].upper()}
    bases = [s[0][1].split()[0] for s in all_stages if s[0][1].split()[0] not in aliases]
    assert bases and all(re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", b)
                         for b in bases), bases
    final = all_stages[-1]
    uid = [a for kw, a in final if kw == "USER"][-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    for kw, args in instructions:
        if kw == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (REPO / source).is_file(), f"COPY {source}: no such file"
        if kw in {"ENV", "ARG"}:
            assert not SENSITIVE_KEY.search(args), f"{kw} {args}: no secrets in the image"
    runs = " ".join(a for kw, a in instructions if kw == "RUN")
    assert "-c constraints.txt -r mlflow-requirements.txt" in runs and "torch" not in runs
    pins = dict(line.split("==", 1) for line in MLFLOW_REQUIREMENTS.read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    constraints = dict(line.split("==", 1) for line in
                       (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    assert set(pins) == {"mlflow", "psycopg2-binary", "boto3"}, pins
    for package, version in pins.items():
        assert constraints[package] == version == importlib.metadata.version(package), package
    # what pip installs for it on Linux, from the installed packages' own metadata: no torch, no CUDA
    from packaging.requirements import Requirement
    closure, todo = set(), ["mlflow", "psycopg2-binary", "boto3"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in closure:
            continue
        closure.add(name)
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": "", "sys_platform": "linux",
                                                          "platform_system": "Linux"}):
                todo.append(req.name)
    heavy = sorted(n for n in closure if n.startswith(("torch", "nvidia", "triton", "timm")))
    assert not heavy and "mlflow-skinny" in closure and "gunicorn" in closure, heavy
    # its build context is two files: nothing else of the repository enters it
    patterns = [ln.strip() for ln in (INFRA / "docker" / "mlflow.Dockerfile.dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    tracked = run(["git", "ls-files"], cwd=REPO).stdout.split()
    kept = {t for t in tracked + ["infra/docker/mlflow-requirements.txt"] if not dockerignore_excludes(t, patterns)}
    assert kept == {"constraints.txt", "infra/docker/mlflow-requirements.txt"}, sorted(kept)


# ----------------------------------------------------------------------------- manifests

@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_rendered_manifests_are_valid_kubernetes(rendered, overlay):
    import kubernetes_validate

    docs = rendered[overlay]
    failures = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert not failures, "\n".join(failures)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    if overlay in INSTALL_MODES:  # what the runs need, in the namespace they start in
        namespace = INSTALL_MODES[overlay]
        expected = {("ServiceAccount", "cladapter-pipeline-runner"), ("Role", "cladapter-pipeline-runner"),
                    ("RoleBinding", "cladapter-pipeline-runner"), ("ConfigMap", "cladapter-pipeline"),
                    *(("Secret", name) for name in PIPELINE_SECRETS)}
        # the namespace belongs to KFP or the profile controller: never created, labelled or deleted
        assert not [d for d in docs if d["kind"] == "Namespace"]
        assert not list(pod_specs(docs))
    else:
        namespace = NAMESPACE
        expected = {("Namespace", NAMESPACE), ("Deployment", "cladapter-mlflow"),
                    ("Service", "cladapter-mlflow"), ("NetworkPolicy", "cladapter-mlflow"),
                    ("Secret", "cladapter-mlflow"), ("Secret", "cladapter-s3")}
        assert ("ServiceAccount", "cladapter-pipeline-runner") not in kinds  # runs do not start here
    if overlay == "dev":
        expected |= {("StatefulSet", "cladapter-postgres"), ("Deployment", "cladapter-minio"),
                     ("Job", "cladapter-minio-buckets"), ("NetworkPolicy", "cladapter-postgres")}
    assert expected == kinds or expected <= kinds, f"missing: {expected - kinds}"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]


def test_validator_rejects_broken_manifests(rendered):
    import kubernetes_validate

    deployment = find(rendered["dev"], "Deployment", "cladapter-mlflow")
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    no_containers = copy.deepcopy(deployment)
    del no_containers["spec"]["template"]["spec"]["containers"]
    for broken in (wrong_type, typo, no_containers):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(rendered, overlay):
    missing = []
    for owner, spec in pod_specs(rendered[overlay]):
        for c in all_containers(spec):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    if what not in res.get(part, {}):
                        missing.append(f"{owner['kind']}/{owner['metadata']['name']} "
                                       f"container {c['name']}: no {part}.{what}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged_with_pinned_images(rendered, overlay):
    for owner, spec in pod_specs(rendered[overlay]):
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, where
        for c in all_containers(spec):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            image = c["image"]
            assert "@sha256:" in image or re.search(r":[^:/]*\d[^:/]*$", image), \
                f"{where}: image {image} is not pinned to a version"


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_reference_resolves(rendered, overlay):
    docs = rendered[overlay]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for owner, spec in pod_specs(docs):
        where = f"{owner['kind']}/{owner['metadata']['name']}"
        sa = spec.get("serviceAccountName")
        assert sa is None or ("ServiceAccount", sa) in names, f"{where}: no ServiceAccount {sa}"
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names, f"{where}: no PVC {claim}"
        for c in all_containers(spec):
            container_env(docs, owner, c)  # raises on a missing Secret, ConfigMap or key
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, f"{where}: {probe} port {port}"
    templates = [(o, s) for o, s in pod_specs(docs)]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        backends = [(o, s) for o, s in templates
                    if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert backends, f"Service {svc['metadata']['name']} selects no pods"
        ports = {p["name"] for _, s in backends for c in s["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {svc['metadata']['name']}: {port}"
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert ("Role", binding["roleRef"]["name"]) in names
        for subject in binding["subjects"]:
            assert ("ServiceAccount", subject["name"]) in names
            assert subject["namespace"] == binding["metadata"]["namespace"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_takes_credentials_from_secrets(rendered, overlay):
    docs = rendered[overlay]
    container = mlflow_container(docs)
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "cladapter-mlflow-db"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "cladapter-s3", key
    literal = [e["value"] for e in container["env"] if "value" in e]
    for text in literal + container["args"] + container["command"]:
        assert not re.search(r"://[^/\s]*:[^@\s]*@", text), f"credentials in {text!r}"
        assert "postgresql" not in text, "the backend store URI belongs in the Secret"
    for e in container["env"]:
        if SENSITIVE_KEY.search(e["name"]):
            assert "valueFrom" in e, f"{e['name']} must come from a Secret"
    # Each setting reaches `mlflow server`: as an argument or through the option's envvar.
    from mlflow.cli import server

    envvars = {p.envvar: p.opts[0] for p in server.params if isinstance(p.envvar, str)}
    options = {a.split("=")[0] for a in container["args"]}
    assert envvars["MLFLOW_BACKEND_STORE_URI"] == "--backend-store-uri"
    assert {"--artifacts-destination", "--serve-artifacts", "--allowed-hosts"} <= options
    assert envvars["MLFLOW_WORKERS"] == "--workers" and "MLFLOW_WORKERS" in env
    resolved = container_env(docs, find(docs, "Deployment", "cladapter-mlflow"), container)
    assert resolved["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert container["image"] == MLFLOW_IMAGE  # the slim server image, not the CUDA one


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_has_probes_and_limits(rendered, overlay):
    container = mlflow_container(rendered[overlay])
    (http_port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "http"]
    assert f"--port={http_port}" in container["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get == {"path": "/health", "port": "http"}, (probe, get)
    limits = container["resources"]["limits"]
    assert limits["memory"] and limits["cpu"]
    service = find(rendered[overlay], "Service", "cladapter-mlflow")
    assert service["spec"]["ports"][0]["port"] == 5000


def test_prod_overlay_scales_the_server_and_keeps_no_database(rendered):
    prod = rendered["prod"]
    assert find(prod, "Deployment", "cladapter-mlflow")["spec"]["replicas"] == 2
    env = {e["name"]: e.get("value") for e in mlflow_container(prod)["env"]}
    assert env["MLFLOW_WORKERS"] == "4"
    assert not [d for d in prod if d["kind"] in {"StatefulSet", "PersistentVolumeClaim"}]
    assert find(prod, "PodDisruptionBudget", "cladapter-mlflow")["spec"]["minAvailable"] == 1


# ----------------------------------------------------------------------------- secrets

def test_secret_templates_hold_no_real_values():
    templates = sorted(K8S.rglob("*.env.example"))
    assert len(templates) >= 7, templates
    problems = [p for t in templates for p in template_problems(str(t.relative_to(REPO)),
                                                                   t.read_text())]
    assert not problems, "\n".join(problems)
    # The check itself catches real values, in plain and commented-out lines.
    leaky = ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENG\n"
             "# MLFLOW_TRACKING_PASSWORD=hunter2\n"
             "MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://mlflow:hunter2@db:5432/mlflow\n")
    assert len(template_problems("leaky.env", leaky)) == 3


def test_no_secret_values_anywhere_in_infra():
    credential_uri = re.compile(r"[a-z0-9+]+://[^/\s:@]+:([^@\s]+)@")
    aws_key = re.compile(r"\bAKIA[0-9A-Z]{16}\b")
    for path in INFRA.rglob("*"):
        if not path.is_file() or path.suffix == ".env":
            continue
        text = path.read_text()
        assert not aws_key.search(text), f"{path}: AWS access key id"
        for m in credential_uri.finditer(text):
            assert m.group(1) in (PLACEHOLDER, "PASSWORD") or m.group(1).startswith("$"), \
                f"{path}: a password in {m.group(0)!r}"
        if path.suffix in {".yaml", ".yml"}:
            for doc in yaml.safe_load_all(text):
                assert not (doc and doc.get("kind") == "Secret"), \
                    f"{path}: Secrets come from secretGenerator and git-ignored files"


def test_filled_in_secrets_are_git_ignored():
    for overlay in ALL_OVERLAYS:
        for template in (K8S / "overlays" / overlay / "secrets").glob("*.env.example"):
            filled = template.with_suffix("").relative_to(REPO)
            proc = run(["git", "check-ignore", "-q", str(filled)], cwd=REPO)
            assert proc.returncode == 0, f"{filled} is not git-ignored"
    tracked = run(["git", "ls-files", "infra"], cwd=REPO).stdout.split()
    assert not [t for t in tracked if t.endswith(".env")], tracked


@pytest.mark.parametrize("overlay", tuple(INSTALL_MODES))
def test_pipeline_secrets_have_the_keys_the_pipeline_reads(rendered, overlay):
    from pipelines import cladapter_pipeline as kp

    readme = (K8S / "README.md").read_text()
    assert {k: set(v) for k, v in kp.SECRET_KEYS.items()} == PIPELINE_SECRETS
    assert {k: set(v) for k, v in kp.CONFIG_MAP_KEYS.items()} == PIPELINE_CONFIG_MAPS
    for name, keys in PIPELINE_SECRETS.items():
        data = secret_data(rendered[overlay], name)
        assert keys <= data.keys(), f"{name} lacks {keys - data.keys()}"
        assert f"`{name}`" in readme
        for key in keys:
            assert f"`{key}`" in readme, f"infra/k8s/README.md does not document {key}"
    for name, keys in PIPELINE_CONFIG_MAPS.items():
        data = find(rendered[overlay], "ConfigMap", name)["data"]
        assert keys <= data.keys() and data["CLADAPTER_CHECKPOINT_ROOT"].startswith("s3://")
        assert f"`{name}`" in readme
    # the runs reach the services of the namespace cladapter by their full names
    assert urlsplit(secret_data(rendered[overlay], "cladapter-mlflow")["MLFLOW_TRACKING_URI"]).hostname \
        == f"cladapter-mlflow.{NAMESPACE}.svc.cluster.local"


def role_grants(role: dict) -> dict[tuple[str, str], list[tuple[set, set | None]]]:
    """(apiGroup, resource) -> [(verbs, resourceNames or None: every object)]."""
    out: dict = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                names = set(rule["resourceNames"]) if rule.get("resourceNames") else None
                out.setdefault((group, resource), []).append((set(rule["verbs"]), names))
    return out


@pytest.mark.parametrize("overlay", tuple(INSTALL_MODES))
def test_pipeline_runner_role_is_least_privilege(rendered, overlay):
    """What KFP 2.5+ on Argo 3.4+ needs of the runs' identity, and nothing else: named
    Secrets and ConfigMaps only; pods read, never created, changed or deleted (Argo's
    controller does that under its own identity); no PVCs (the scratch volumes are
    emptyDirs); no wildcard; no TrainJobs (the launcher's own ServiceAccount creates them)."""
    docs = rendered[overlay]
    role = find(docs, "Role", "cladapter-pipeline-runner")
    grants = role_grants(role)
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    assert grants[("", "secrets")] == [({"get"}, {"mlpipeline-minio-artifact"})]
    assert grants[("", "configmaps")] == [({"get", "list", "watch"}, {"kfp-launcher"})]
    assert grants[("", "pods")] == [({"get", "list", "watch"}, None)]
    assert grants[("argoproj.io", "workflowtaskresults")] == [({"create", "patch"}, None)]
    assert set(grants) == {("", "secrets"), ("", "configmaps"), ("", "pods"),
                           ("argoproj.io", "workflowtaskresults")}, sorted(grants)
    # the steps' own Secrets and settings reach them as env vars the kubelet resolves
    from pipelines import cladapter_pipeline as kp
    assert not set(kp.SECRET_KEYS) & {n for _, names in grants[("", "secrets")] for n in names}
    binding = find(docs, "RoleBinding", "cladapter-pipeline-runner")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cladapter-pipeline-runner",
                                    "namespace": INSTALL_MODES[overlay]}]
    assert binding["roleRef"]["name"] == "cladapter-pipeline-runner"
    # `submit` runs as it by default, in either install mode
    import inspect
    assert inspect.signature(kp.submit).parameters["service_account"].default == \
        kp.RUNNER_SERVICE_ACCOUNT == "cladapter-pipeline-runner"


def policy_allows(policy: dict, port: int, ns_labels: dict, pod_labels: dict, same_ns: bool) -> bool:
    """Does the NetworkPolicy's ingress let a pod (its labels, its namespace's labels)
    reach `port`? (matchLabels selectors, as these manifests use.)"""
    def matches(selector, labels):
        assert set(selector) <= {"matchLabels"}, selector
        return selector.get("matchLabels", {}).items() <= labels.items()

    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
            continue
        for peer in rule.get("from", []):
            ns_ok = matches(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer else same_ns
            pod_ok = matches(peer.get("podSelector", {}), pod_labels)
            if ns_ok and pod_ok:
                return True
    return False


def test_network_policies_admit_the_pipeline_and_the_server_only(rendered, compiled_labels):
    """The MLflow server: its namespace and the pipeline's steps (the labels the compiled
    pipeline sets) in the runs' namespaces; the dev database: the server and the tuning
    steps only."""
    dev = rendered["dev"]
    mlflow_policy = find(dev, "NetworkPolicy", "cladapter-mlflow")
    db_policy = find(dev, "NetworkPolicy", "cladapter-postgres")
    server_labels = find(dev, "Deployment", "cladapter-mlflow")["spec"]["template"]["metadata"]["labels"]
    db_labels = find(dev, "StatefulSet", "cladapter-postgres")["spec"]["template"]["metadata"]["labels"]
    assert mlflow_policy["spec"]["podSelector"]["matchLabels"].items() <= server_labels.items()
    assert db_policy["spec"]["podSelector"]["matchLabels"].items() <= db_labels.items()
    assert mlflow_policy["spec"]["policyTypes"] == db_policy["spec"]["policyTypes"] == ["Ingress"]
    standalone = {"kubernetes.io/metadata.name": "kubeflow"}
    profile = {"kubernetes.io/metadata.name": "kubeflow-user-example-com",
               "app.kubernetes.io/part-of": "kubeflow-profile"}
    elsewhere = {"kubernetes.io/metadata.name": "default"}
    train, tune = compiled_labels["exec-train-stage1"], compiled_labels["exec-tune-worker"]
    params_step = compiled_labels["exec-resolve-params"]
    for ns in (standalone, profile):
        assert policy_allows(mlflow_policy, 5000, ns, train, False)
        assert not policy_allows(mlflow_policy, 5000, ns, params_step, False)  # logs nothing
        assert not policy_allows(mlflow_policy, 5000, ns, {}, False)
        assert policy_allows(db_policy, 5432, ns, tune, False)
        assert not policy_allows(db_policy, 5432, ns, train, False)
    assert not policy_allows(mlflow_policy, 5000, elsewhere, train, False)
    assert not policy_allows(db_policy, 5432, elsewhere, tune, False)
    assert policy_allows(mlflow_policy, 5000, {}, {"app": "anything"}, True)  # same namespace
    assert not policy_allows(mlflow_policy, 5432, standalone, train, False)
    # the database: the server yes, other pods of its namespace (MinIO) no
    assert policy_allows(db_policy, 5432, {}, server_labels, True)
    minio = find(dev, "Deployment", "cladapter-minio")["spec"]["template"]["metadata"]["labels"]
    assert not policy_allows(db_policy, 5432, {}, minio, True)
    # prod keeps the server's policy (its database is outside the cluster)
    assert find(rendered["prod"], "NetworkPolicy", "cladapter-mlflow")["spec"] == mlflow_policy["spec"]


@pytest.fixture(scope="module")
def compiled_labels(tmp_path_factory) -> dict[str, dict]:
    """The pod labels of each step of the compiled pipeline."""
    platform = yaml.safe_load_all((REPO / "pipelines" / "cladapter_pipeline.yaml").read_text())
    executors = list(platform)[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {name: (ex.get("podMetadata") or {}).get("labels", {}) for name, ex in executors.items()}


def test_dev_services_are_wired_together(rendered):
    from mlflow.server.security_utils import is_allowed_host_header

    dev = rendered["dev"]

    def service_port(name: str) -> int:
        return find(dev, "Service", name)["spec"]["ports"][0]["port"]

    tracking = urlsplit(secret_data(dev, "cladapter-mlflow")["MLFLOW_TRACKING_URI"])
    assert (tracking.hostname, tracking.port) == ("cladapter-mlflow", service_port("cladapter-mlflow"))
    s3 = secret_data(dev, "cladapter-s3")
    for key in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        endpoint = urlsplit(s3[key])
        assert (endpoint.hostname, endpoint.port) == ("cladapter-minio", service_port("cladapter-minio"))
    db = urlsplit(secret_data(dev, "cladapter-mlflow-db")["MLFLOW_BACKEND_STORE_URI"])
    postgres = secret_data(dev, "cladapter-postgres")
    assert (db.hostname, db.port) == ("cladapter-postgres", service_port("cladapter-postgres"))
    # the server's own role (roles.psql makes it), not the admin: tests/test_least_privilege.py
    assert (db.username, db.password, db.path.lstrip("/")) == (
        "mlflow", postgres["MLFLOW_DB_PASSWORD"], "mlflow")
    assert postgres["POSTGRES_USER"] != db.username
    # The server answers the Host header its clients send, and not a stranger's.
    deployment = find(dev, "Deployment", "cladapter-mlflow")
    container = mlflow_container(dev)
    env = container_env(dev, deployment, container)
    (hosts_arg,) = [expand(a, env) for a in container["args"] if a.startswith("--allowed-hosts=")]
    allowed = [h.strip() for h in hosts_arg.split("=", 1)[1].split(",")]
    for host in (tracking.netloc, f"cladapter-mlflow.{NAMESPACE}.svc.cluster.local:5000",
                 "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example.com")
    assert not is_allowed_host_header(allowed, "cladapter-mlflow.attacker.example.com")


def test_mlflow_server_starts_from_the_rendered_manifest(rendered, tmp_path):
    """The dev Deployment's command, args and env, run here against a real PostgreSQL."""
    import psycopg2

    dev = rendered["dev"]
    deployment = find(dev, "Deployment", "cladapter-mlflow")
    container = mlflow_container(dev)
    env = container_env(dev, deployment, container)
    # Only the database address differs from the cluster: a throw-away database here,
    # reached with the driver scheme the template prescribes.
    template = urlsplit(env["MLFLOW_BACKEND_STORE_URI"])
    admin = urlsplit(POSTGRES_ADMIN_URI)
    database = f"cladapter_infra_{uuid.uuid4().hex[:12]}"
    try:
        conn = psycopg2.connect(host=admin.hostname, port=admin.port, user=admin.username,
                                password=admin.password, dbname=admin.path.lstrip("/"),
                                connect_timeout=10)
    except psycopg2.OperationalError as e:
        pytest.fail(f"no PostgreSQL at {admin.hostname}:{admin.port} ({e}); "
                    "set CLADAPTER_TEST_POSTGRES to an admin URI")
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{database}"')
    conn.cursor().execute(f'CREATE DATABASE "{database}_auth"')  # the auth app's users
    env["MLFLOW_BACKEND_STORE_URI"] = urlunsplit(
        (template.scheme, admin.netloc, f"/{database}", "", ""))
    env["CLADAPTER_AUTH_DATABASE_URI"] = urlunsplit(
        (urlsplit(env["CLADAPTER_AUTH_DATABASE_URI"]).scheme, admin.netloc, f"/{database}_auth", "", ""))
    admin_login = (env["MLFLOW_AUTH_ADMIN_USERNAME"], "infra-test-admin-pw")  # pragma: allowlist secret
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = admin_login[1]  # the template's REPLACE_ME is too short
    port = free_port()
    env.update(HOME=str(tmp_path), TMPDIR=str(tmp_path),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    args = [expand(a, env) for a in container["args"]]
    args = [f"--port={port}" if a.startswith("--port=") else
            "--host=127.0.0.1" if a.startswith("--host=") else a for a in args]
    command = [tool(container["command"][0]), *container["command"][1:], *args]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    probe_path = container["readinessProbe"]["httpGet"]["path"]
    tracking_host = urlsplit(secret_data(dev, "cladapter-mlflow")["MLFLOW_TRACKING_URI"]).netloc
    try:
        deadline = time.monotonic() + 240  # a guard against hanging, not a timing check
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited {server.returncode}:\n"
                            f"{(tmp_path / 'server.log').read_text()[-4000:]}")
            try:
                if http_get(port, probe_path, "kubelet.probe")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-4000:]
            time.sleep(1)
        api = "/api/2.0/mlflow/experiments/search?max_results=5"
        assert http_get(port, api, tracking_host)[0] == 401  # no login, no answer (cladapter-auth)
        status, body = http_get(port, api, tracking_host, admin_login)
        assert status == 200, body
        assert "Default" in body  # the schema was created in PostgreSQL
        assert http_get(port, api, "attacker.example.com", admin_login)[0] == 403
    finally:
        stop_process_group(server)
        log.close()
        for name in (database, f"{database}_auth"):
            conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


# ----------------------------------------------------------------------------- docs

def test_runbook_covers_the_path_to_a_promoted_model(rendered):
    readme = (INFRA / "README.md").read_text()
    for step in ("docker build -f infra/docker/Dockerfile", "docker push",
                 "kubectl apply -k infra/k8s/overlays/", "cladapter pipeline compile",
                 "pipelines/cladapter_pipeline.yaml", "cladapter pipeline submit",
                 "cladapter promote", "What is checked here and what is not",
                 "infra/scripts/install-tools.sh", IMAGE,
                 # both install modes, the minimum versions, the slim server image, the
                 # Role and the NetworkPolicies, the data and the retries
                 "kubectl apply -k infra/k8s/overlays/standalone",
                 "kubectl apply -k infra/k8s/overlays/multi-user", "--namespace kubeflow-user-example-com",
                 "KFP 2.5.0 or newer", "kfp-kubernetes 1.5.0", "Argo Workflows 3.4 or newer",
                 "docker build -f infra/docker/mlflow.Dockerfile", "least-privilege Role",
                 "NetworkPolicies", "service account `cladapter-pipeline-runner`",
                 "Data by reference", "CLADAPTER_CHECKPOINT_ROOT", "From promotion to serving"):
        assert step in readme, f"infra/README.md lacks {step!r}"
    assert f"-t {IMAGE}" in DOCKERFILE.read_text()
    assert f"-t {MLFLOW_IMAGE}" in MLFLOW_DOCKERFILE.read_text() and MLFLOW_IMAGE in readme
    for overlay in OVERLAYS:
        assert mlflow_container(rendered[overlay])["image"] == MLFLOW_IMAGE
    settings = REPO / "cladapter_core" / "settings.py"
    if settings.exists():  # the one place the Python side names the default image
        assert IMAGE in settings.read_text(), f"{settings} and infra/ disagree on the image"
