"""Reading infra/ offline, for tests/test_least_privilege.py and tests/test_supply_chain.py:
overlays rendered by the real kustomize, objects and pod specs found in them, whom a
NetworkPolicy admits, Docker's ignore-file and instruction rules. The same rules as
tests/test_infra.py's own helpers (test modules do not import each other: test_tiers.py).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
INSTALL_MODES = {"standalone": "kubeflow", "multi-user": "kubeflow-user-example-com"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def script(name: str):
    """One of infra/scripts/ (not a package: file names with dashes) as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py").replace("-", "_"),
                                                  INFRA / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed: infra/scripts/install-tools.sh")
    return found


def render_overlay(overlay: str, workdir: Path) -> list[dict]:
    """`kubectl kustomize` on a copy of infra/k8s whose secrets are the templates."""
    tree = workdir / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("*.env"))  # never a filled-in secret
    for template in tree.rglob("*.env.example"):
        shutil.copyfile(template, template.with_suffix(""))
    proc = subprocess.run([kubectl(), "kustomize", str(tree / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"kustomize failed on overlays/{overlay}:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def generated(docs: list[dict], kind: str, prefix: str) -> dict:
    """The one object a generator made (its name carries a hash suffix)."""
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix + "-")]
    assert len(hits) == 1, f"expected one {kind}/{prefix}-<hash>, found {len(hits)}"
    return hits[0]


def pod_specs(docs: list[dict]):
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            yield doc, doc["spec"]["template"]["spec"]


def secret_data(docs: list[dict], name: str) -> dict[str, str]:
    secret = find(docs, "Secret", name)
    plain = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    plain.update(secret.get("stringData", {}))
    return plain


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
            if ns_ok and matches(peer.get("podSelector", {}), pod_labels):
                return True
    return False


def compiled_pod_labels() -> dict[str, dict]:
    """The pod labels of each step of the compiled pipeline."""
    platform = yaml.safe_load_all((REPO / "pipelines" / "cladapter_pipeline.yaml").read_text())
    executors = list(platform)[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {name: (ex.get("podMetadata") or {}).get("labels", {}) for name, ex in executors.items()}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if (not pending and not stripped) or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full, pending = pending + stripped, ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def ignore_patterns(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


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
