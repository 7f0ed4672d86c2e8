"""`models:/` URIs: the version they name, and its model folder in a local cache."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .. import identity, tracking
from ..errors import TrackingError
from ..settings import settings, var
from . import integrity
from .versions import _alias, _client, _code, _describe

log = logging.getLogger(__name__)


# -- models:/ URIs and the local model cache ---------------------------------------------
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
MODEL_CACHE_ENV = var("model_cache")  # CLADAPTER_MODEL_CACHE


def is_model_uri(text) -> bool:
    """Does `text` name a registered model (``models:/...``) rather than a folder?"""
    return str(text).startswith("models:/")


def model_version(model_uri: str, client=None):
    """The registered version behind ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
    in the configured store; a TrackingError naming the store when the model, alias or
    version is not there (and which models or aliases are)."""
    from mlflow.exceptions import MlflowException
    m = _URI.match(model_uri or "")
    if not m:
        raise TrackingError(f"model URI {model_uri!r}: expected models:/<name>@<alias> "
                            "or models:/<name>/<version>")
    name, client = m["name"], client or _client()
    store = tracking._redact(tracking.tracking_uri())
    with tracking.errors(f"looking up {model_uri}"):
        try:
            model = client.get_registered_model(name)
        except MlflowException as e:
            if _code(e) not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
            names = sorted(r.name for r in client.search_registered_models(max_results=50))
            raise TrackingError(f"{model_uri}: no registered model {name!r} in the store {store} "
                                f"(registered there: {', '.join(names) or 'none'})") from None
        if m["alias"]:
            mv = _alias(client, name, m["alias"])
            if mv is None:
                aliases = ", ".join(f"{a} (v{v})" for a, v in sorted((model.aliases or {}).items()))
                raise TrackingError(f"{model_uri}: registered model {name!r} in the store {store} has "
                                    f"no alias {m['alias']!r} (its aliases: {aliases or 'none'})")
            return mv
        try:
            return client.get_model_version(name, m["version"])
        except MlflowException as e:
            if _code(e) not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
                raise
            raise TrackingError(f"{model_uri}: registered model {name!r} in the store {store} has no "
                                f"version {m['version']}") from None


def model_cache_dir() -> Path:
    """Where registered models are downloaded: ``$CLADAPTER_MODEL_CACHE``, else
    ``$XDG_CACHE_HOME/cladapter/models`` (``~/.cache/cladapter/models``)."""
    s = settings()
    if s.model_cache:
        return s.model_cache
    base = s.xdg_cache_home or Path.home() / ".cache"
    return Path(base) / "cladapter" / "models"


def resolve_model(model: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, dict | None]:
    """A model folder for `model`, and the registered version it came from (None for a folder).

    A folder is returned as given. ``models:/<name>@<alias>`` or ``models:/<name>/<version>``
    gives the model folder (the pyfunc artifact ``model_dir``, ``serving.model_dir_in``) of
    the version's verified copy (``verified_model``).
    """
    from ..serving import pyfunc as serving

    if not is_model_uri(model):
        return Path(model), None
    local, info = verified_model(model, cache_dir)
    try:
        return serving.model_dir_in(local), info
    except ValueError as e:
        raise TrackingError(f"{model}: {e}") from None


def verified_model(model: str, cache_dir: str | Path | None = None) -> tuple[Path, dict]:
    """The whole MLflow model of registered version `model` (``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``) as a local folder, checked against the version's integrity
    record (``registry/integrity.py``) before anything loads it; and the version
    (``_describe``).

    It is looked up in the configured store (``tracking.tracking_uri()``; call
    ``tracking.check_tracking(existing=True)`` first so a missing store is not created) and
    downloaded once into `cache_dir` (default ``model_cache_dir()``), keyed by store, name,
    version and source: into a temporary folder, verified there, then renamed into place, so
    the cache holds only verified copies. A cached copy is verified again at every call; one
    that was changed is replaced by a new download. A download that differs from the record
    is refused with a TrackingError naming each file changed, added or removed.
    """
    mv = model_version(str(model))
    info = _describe(mv)
    store = tracking.tracking_uri()
    key = hashlib.sha256("\0".join([tracking._redact(store), mv.name, str(mv.version), str(mv.source),
                                     str(mv.creation_timestamp)]).encode()).hexdigest()[:16]
    folder = Path(cache_dir or model_cache_dir()) / f"{_safe_name(mv.name)}-v{mv.version}-{key}"
    if (folder / "MLmodel").is_file():
        # Bytecode written by local loads of the copy (a server imports its code/): gone
        # before the check, so neither it nor any planted .pyc is ever used unchecked.
        for cache in list(folder.rglob("__pycache__")):
            shutil.rmtree(cache, ignore_errors=True)
        try:
            integrity.verify(folder, mv)
            return folder, info
        except TrackingError as e:
            log.warning("the cached copy %s no longer matches its record, downloading it again: %s", folder, e)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)  # a copy of an older layout, or a changed one
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
        local = Path(tmp) / "model"
        local.mkdir()
        with tracking.errors(f"downloading {model} ({mv.name} v{mv.version})"):
            _download(f"models:/{mv.name}/{mv.version}", local)
        integrity.verify(local, mv)
        try:
            os.replace(local, folder)       # atomic: a reader never sees half a folder
        except OSError as e:
            if not (folder / "MLmodel").is_file():  # not another process's copy: a real error
                raise TrackingError(f"cannot place the model in {folder}: {e}") from e
    return folder, info


def _download(uri: str, dst: Path) -> Path:
    import mlflow
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:80] or "model"


def pyfunc_of_folder(folder) -> Path:
    """The self-contained MLflow model of a model folder (as `register` logs it), saved once
    under the model cache, keyed by the folder's content: what `cladapter serve` serves when
    given a folder rather than a registered version."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise TrackingError(f"{folder}: neither models:/<name>@<alias>, models:/<name>/<version> "
                            "nor a model folder (config.json + model.safetensors)")
    path = model_cache_dir() / f"folder-{identity.content_hash(folder)[:16]}"
    if not (path / "MLmodel").is_file():
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tracking.save_pyfunc(folder, path)
    return path
