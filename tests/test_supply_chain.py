"""Supply chain: what the images pull and install is pinned by content, not by name.

- Every third-party image of infra/ (Dockerfile FROM lines, the BuildKit frontend, every
  manifest `image:`) is `name:tag@sha256:<64 hex>` (infra/scripts/pin-images.py finds them;
  the same code is used here). The images this repository builds are pinned at release.
- The platform image installs its Python packages from infra/docker/requirements.lock with
  `pip install --require-hashes`: the lock must cover everything pyproject.toml pulls in
  on Linux, at the versions of constraints.txt, and its hashes are those of real files.
- No build context carries `.dvc/config.local` (where `dvc remote modify --local` keeps
  S3 keys).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from helpers import REPO
from infra_helpers import DOCKERFILE, dockerfile_instructions, dockerignore_excludes, ignore_patterns, script

INFRA = REPO / "infra"
LOCK = INFRA / "docker" / "requirements.lock"
BUILD_TOOLS = {"setuptools", "wheel"}  # in the lock for --no-build-isolation, not in constraints.txt


def _pin_images():
    return script("pin-images.py")


norm = script("light-lock.py").norm  # PEP 503 names, as the light lock's script writes them


def lock_entries() -> dict[str, tuple[str, set[str]]]:
    """name -> (version, sha256 hashes) of the lock."""
    text = LOCK.read_text()
    out = {}
    for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)((?:[ \t]*\\\n[ \t]+--hash=sha256:[0-9a-f]{64})*)",
                         text, re.M):
        out[norm(m.group(1))] = (m.group(2), set(re.findall(r"[0-9a-f]{64}", m.group(3))))
    requirement_lines = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert len(out) == len(requirement_lines), "a lock line that is not name==version with hashes"
    return out


def constraints() -> dict[str, str]:
    return {norm(a): b for a, b in (ln.split("==", 1) for ln in
                                   (REPO / "constraints.txt").read_text().splitlines() if "==" in ln)}


# ----------------------------------------------------------------------------- images

def test_every_third_party_image_is_pinned_by_digest():
    pin = _pin_images()
    refs = {f"{p.relative_to(REPO)}:{line}": ref for p in pin.files() for line, ref in pin.references(p)}
    unpinned = {where: ref for where, ref in refs.items() if not pin.is_pinned(ref)}
    assert not unpinned, f"pin these by digest (infra/scripts/pin-images.py): {unpinned}"
    # the scanner sees what it must: both Dockerfiles' bases and frontend, the dev services
    names = {ref.split(":")[0] for ref in refs.values()}
    assert {"docker/dockerfile", "ghcr.io/astral-sh/uv", "nvidia/cuda", "python",
            "quay.io/minio/minio", "quay.io/minio/mc", "docker.io/library/postgres"} <= names, names
    # the same base twice is the same digest
    by_tag: dict[str, set[str]] = {}
    for ref in refs.values():
        by_tag.setdefault(ref.split("@")[0], set()).add(ref)
    assert all(len(v) == 1 for v in by_tag.values()), by_tag


def test_the_pin_rule_refuses_tags_and_placeholders(tmp_path):
    pin = _pin_images()
    real = "python:3.11.14-slim-bookworm@sha256:" + "65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d"
    assert pin.is_pinned(real)
    assert pin.is_pinned("registry.local:5000/team/img:1.2@sha256:" + "ab" * 32)
    for bad in ("python:3.11.14-slim-bookworm", "python:latest", "python",
                "python@sha256:" + "ab" * 32,                      # no tag for the reader
                "python:3.11@sha256:abc",                           # not 64 hex
                "python:3.11@sha256:" + "0" * 64,                   # a placeholder
                "python:3.11@sha256:" + "AB" * 32,                  # not lower-case hex
                real + " trailing"):
        assert not pin.is_pinned(bad), bad
    dockerfile = tmp_path / "infra" / "docker" / "Dockerfile"
    dockerfile.parent.mkdir(parents=True)
    dockerfile.write_text("# syntax=docker/dockerfile:1\nFROM python:3.11 AS build\n"
                          "RUN python -c \"import sys; \\\nfrom os import sep\"\n"  # a continuation, not FROM
                          "\nFROM build AS final\n"
                          "FROM --platform=linux/amd64 ghcr.io/cladapter/cladapter:0.1.0\n"
                          "COPY --from=build /x /x\n")
    manifest = tmp_path / "infra" / "k8s" / "x.yaml"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("spec:\n  containers:\n    - image: \"postgres:16\"\n    - name: y\n      image: redis\n")
    assert pin.references(dockerfile) == [(1, "docker/dockerfile:1"), (2, "python:3.11")]
    assert pin.references(manifest) == [(3, "postgres:16"), (5, "redis")]
    assert [p.name for p in pin.files(tmp_path / "infra")] == ["Dockerfile", "x.yaml"]


def test_pin_images_list_reports_the_state_offline():
    proc = subprocess.run(["python3", str(INFRA / "scripts" / "pin-images.py"), "--list"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NOT PINNED" not in proc.stdout and "nvidia/cuda:" in proc.stdout


# ----------------------------------------------------------------------------- Python packages

def test_the_image_installs_only_hashed_packages():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    installs = [a for kw, a in instructions if kw == "RUN" and "pip install" in a]
    assert installs, "the Dockerfile installs nothing?"
    for command in installs:
        for part in re.split(r"&&|;", command):
            if "pip install" not in part:
                continue
            part = " ".join(part.split())
            # a lock by hash (the full image's, the light image's), or the project itself
            # without fetching anything
            assert ("--require-hashes" in part and re.search(r"-r requirements(-light)?\.lock$", part)) or \
                   part.endswith("pip install --no-cache-dir --no-deps --no-build-isolation ."), part
    assert any(kw == "COPY" and "infra/docker/requirements.lock" in a for kw, a in instructions)
    patterns = ignore_patterns(INFRA / "docker" / "Dockerfile.dockerignore")
    for lock in ("requirements.lock", "requirements-light.lock"):
        assert not dockerignore_excludes(f"infra/docker/{lock}", patterns), lock
    assert any("pip check" in a for kw, a in instructions if kw == "RUN")


def test_the_lock_covers_the_project_at_the_constraints_versions():
    lock, pins = lock_entries(), constraints()
    assert all(hashes for _, hashes in lock.values())
    assert set(lock) - set(pins) <= BUILD_TOOLS, \
        f"in the lock but not in constraints.txt: {set(lock) - set(pins) - BUILD_TOOLS}"
    stale = {n: (v, pins[n]) for n, (v, _) in lock.items() if n in pins and v != pins[n]}
    assert not stale, f"the lock disagrees with constraints.txt (run infra/scripts/lock-image.sh): {stale}"
    assert BUILD_TOOLS <= set(lock)
    # every package pyproject.toml pulls in on the image's platform, from the installed
    # packages' own metadata (the same versions: constraints.txt)
    from packaging.requirements import Requirement
    linux = script("light-lock.py").LINUX  # the image's platform, as the light lock reads it
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, closure = [Requirement(r) for r in project], set()
    while todo:
        req = todo.pop()
        name = norm(req.name)
        if name in closure or (req.marker is not None and not req.marker.evaluate(linux)):
            continue
        closure.add(name)
        assert name in lock, f"{name} (needed on Linux) is not in the lock: run infra/scripts/lock-image.sh"
        if req.specifier and not req.specifier.contains(lock[name][0], prereleases=True):
            pytest.fail(f"the lock's {name}=={lock[name][0]} does not satisfy {req}")
        try:
            todo += [Requirement(r) for r in importlib.metadata.requires(name) or []]
        except importlib.metadata.PackageNotFoundError:
            pass  # Linux-only (CUDA libraries): in the lock, not installed on this machine
    assert {"torch", "mlflow", "kfp", "dvc-s3", "psycopg2-binary"} <= closure


def local_distributions() -> list[Path]:
    """Distribution files this machine has (pip's find-links and file:// indexes)."""
    roots = [Path("/opt/pypi/files"), Path("/opt/pypi-more/files"), Path("/opt/wheels")]
    return [p for r in roots if r.is_dir() for p in r.iterdir() if p.suffix in {".whl", ".gz"}]


def test_the_lock_hashes_are_those_of_the_real_files():
    """Files of the locked versions found on this machine hash to a value the lock lists,
    as pip's --require-hashes will check them."""
    lock, checked = lock_entries(), []
    for path in local_distributions():
        name, _, rest = path.name.partition("-")
        version = rest.split("-")[0].removesuffix(".tar.gz")
        entry = lock.get(norm(name))
        if entry is None or entry[0] != version or path.stat().st_size > 20_000_000:
            continue  # not locked, or too big to hash in a unit test (torch: 900 MB)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest in entry[1], f"{path.name}: sha256 {digest} is not in the lock"
        checked.append(path.name)
    if not checked:
        pytest.skip("no file of a locked version on this machine to hash")


# ----------------------------------------------------------------------------- build contexts

def test_dvc_local_config_stays_out_of_every_build_context():
    ignores = sorted(p for p in (REPO / "infra").rglob("*.dockerignore"))
    ignores += sorted(REPO.glob("*.dockerignore")) + ([REPO / ".dockerignore"] if (REPO / ".dockerignore").exists() else [])
    assert {p.name for p in ignores} >= {"Dockerfile.dockerignore", "mlflow.Dockerfile.dockerignore"}
    for path in ignores:
        patterns = ignore_patterns(path)
        for secret in (".dvc/config.local", "infra/k8s/overlays/dev/secrets/minio-root.env"):
            assert dockerignore_excludes(secret, patterns), f"{path.relative_to(REPO)} lets {secret} in"
    # every Dockerfile has its own ignore file (BuildKit reads <Dockerfile>.dockerignore)
    for dockerfile in (INFRA / "docker").glob("*Dockerfile"):
        assert dockerfile.with_name(dockerfile.name + ".dockerignore").is_file(), dockerfile


def test_the_runbook_says_how_to_pin_and_mirror():
    readme = (INFRA / "README.md").read_text()
    for needle in ("## Supply chain", "infra/scripts/pin-images.py --check", "infra/scripts/lock-image.sh",
                   "--require-hashes", "kustomize edit set image", "hf_hub_download", "revision=",
                   "weights_uri=s3://", ".dvc/config.local",
                   "### S3: one identity per job", "minio-policies/", "aws iam create-policy",
                   "### PostgreSQL: one role per service", "postgres-init/roles.psql"):
        assert needle in readme, f"infra/README.md lacks {needle!r}"
    from components.pipeline_params import PIPELINE_PARAMS
    assert "weights_uri" in {p.name for p in PIPELINE_PARAMS}  # the run parameter the runbook names
