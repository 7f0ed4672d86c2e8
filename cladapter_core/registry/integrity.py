"""The integrity of a registered model: every file of the logged MLflow model (its code
``code/cladapter_core/...`` and ``model_code.py``, ``MLmodel``, ``requirements.txt``, the
conda/python_env files, the input examples, the weights and ``config.json``) is hashed at
registration, and every load from the registry checks its download against that record
before any of the model's code runs.

At registration (``record``) the logged model is downloaded back from the artifact store
(what the registry will hand out, not what was meant to be uploaded), its model folder is
checked against the local one, and its manifest - one line ``<sha256>  <relative path>``
per file, sorted by path (the ``sha256sum`` format: ``sha256sum -c`` reads it) - is logged
as the run artifact ``integrity/<model id>.sha256``. The version is tagged with the
manifest's sha256 (``integrity.sha256``) and its artifact path (``integrity.manifest``).
The tags live in the tracking database, the files in the artifact store: write access to
the artifact store alone can no longer change what loads without being noticed.

At load (``verify``) the manifest of the downloaded copy is compared with the tag. When they
differ, the recorded manifest (itself checked against the tag) names each file changed,
added or removed, and nothing is loaded.
"""
from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from .. import identity, tracking
from ..errors import TrackingError

DIGEST_TAG = "integrity.sha256"      # sha256 of the manifest's text
MANIFEST_TAG = "integrity.manifest"  # the manifest's path in the artifacts of the version's run
# Written by the MLflow client into every download of a whole model (the name and version
# asked for): never stored, so never hashed.
CLIENT_FILES = frozenset({"registered_model_meta"})


def manifest(folder: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under `folder` (a downloaded MLflow model);
    a link or anything but a plain file is refused."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise TrackingError(f"{path}: not a plain file or folder (a link or special file in a "
                                "downloaded model is refused)")
        if path.is_file() and rel not in CLIENT_FILES:
            files[rel] = identity.content_hash(path)
    return files


def manifest_text(files: dict[str, str]) -> str:
    return "".join(f"{sha}  {rel}\n" for rel, sha in sorted(files.items()))


def digest(files: dict[str, str]) -> str:
    return hashlib.sha256(manifest_text(files).encode()).hexdigest()


def parse(text: str, where: str) -> dict[str, str]:
    files = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64})  (.+)", line)
        if not m:
            raise TrackingError(f"{where}: line {n} is not '<sha256>  <path>': {line[:120]!r}")
        files[m[2]] = m[1]
    return files


def record(client, run_id: str, model_uri: str, model_hash: str) -> dict[str, str]:
    """Download the logged model `model_uri` back, check that its model folder has the
    content hash `model_hash` (the folder that was logged), log its manifest into run
    `run_id`; returns the version tags that record it."""
    import mlflow

    from ..serving import pyfunc as serving
    with tempfile.TemporaryDirectory(prefix="cladapter-integrity-") as tmp:
        with tracking.errors(f"downloading {model_uri} back to record its files"):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        try:
            folder = serving.model_dir_in(local)
        except ValueError as e:
            raise TrackingError(f"{model_uri}: {e}") from None
        if identity.content_hash(folder) != model_hash:
            raise TrackingError(f"{model_uri}: the model folder in the artifact store is not the one "
                                "that was logged (changed during the upload); nothing is registered")
        files = manifest(local)
    text = manifest_text(files)
    path = f"integrity/{re.sub(r'[^A-Za-z0-9._-]+', '-', model_uri.rpartition('/')[2])}.sha256"
    with tracking.errors(f"logging the manifest of {model_uri}"):
        client.log_text(run_id, text, path)
    return {DIGEST_TAG: hashlib.sha256(text.encode()).hexdigest(), MANIFEST_TAG: path}


def verify(local: str | Path, mv, client=None) -> dict[str, str]:
    """Check the downloaded MLflow model `local` of registered version `mv` against its
    record (``integrity.sha256``); returns its manifest. A TrackingError naming every file
    changed, added or removed when it differs, or when the version has no record."""
    uri = f"models:/{mv.name}/{mv.version}"
    want = (mv.tags or {}).get(DIGEST_TAG)
    if not want:
        raise TrackingError(f"{uri}: no integrity record (version tag {DIGEST_TAG}): registered by an "
                            "older cladapter or by hand, so the files that would run cannot be checked; "
                            "not loaded. Register the model again (`cladapter register`) and use the "
                            "new version")
    files = manifest(local)
    if digest(files) == want:
        return files
    raise TrackingError(f"{uri}: not loaded: its files differ from those recorded at registration "
                        f"({DIGEST_TAG} {want[:16]}...): {_differences(files, mv, client)}. The artifact "
                        "store was written to after registration; find out by whom before using it, "
                        "and register the model again to replace this version")


def _differences(files: dict[str, str], mv, client) -> str:
    recorded = _recorded(mv, client)
    if recorded is None:
        return ("the recorded manifest is missing or was changed too, so the files cannot be named "
                f"(files now: {len(files)})")
    changed = sorted(p for p in files.keys() & recorded.keys() if files[p] != recorded[p])
    added, removed = sorted(files.keys() - recorded.keys()), sorted(recorded.keys() - files.keys())
    parts = [f"{what}: {', '.join(paths)}" for what, paths in
             (("changed", changed), ("added", added), ("removed", removed)) if paths]
    return "; ".join(parts) or "no file differs from the recorded manifest, yet the digests differ"


def _recorded(mv, client) -> dict[str, str] | None:
    """The manifest recorded at registration, or None when it is gone or not the one the
    version's tag names."""
    from mlflow import MlflowClient
    path = (mv.tags or {}).get(MANIFEST_TAG)
    if not path or not mv.run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="cladapter-manifest-") as tmp:
        try:
            local = Path((client or MlflowClient()).download_artifacts(mv.run_id, path, tmp))
            text = local.read_bytes().decode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001  (gone or unreadable: reported as such)
            return None
    if hashlib.sha256(text.encode()).hexdigest() != mv.tags.get(DIGEST_TAG):
        return None
    return parse(text, f"run {mv.run_id} artifact {path}")
