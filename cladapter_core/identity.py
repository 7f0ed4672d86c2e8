"""Identity: which data and which code a run used, each with one name and one algorithm.

- `data_hash(prepared_dir)`: THE data's identity, sha256 of the prepared folder's
  `manifest.csv`, which lists every file's pixel hash, label and split: it changes exactly
  when the data or the split does, wherever the files lie. Run tags (`dvc repro`, the
  `cladapter` command, tuning, Kubeflow), MLflow dataset digests, evaluation records, the
  registry and promotion all use it.
- `dataset_name(params, prepared_dir)`: the name experiments, runs and dataset inputs use,
  read from the prepared data that is used (prepare records it) and from `data.source`
  only when there is no prepared folder yet.
- `content_hash(path)`: sha256 of a file or of a folder's files (a model folder's identity).
- `source_hash(source)`: the raw source before prepare has run: DVC's recorded md5 when
  DVC tracks it, else its content hash. Only groups the stages of one `dvc repro`
  (`tracking.pipeline_id`); it is not the data's identity.
- `git_commit()`: the code's commit (the image's build argument where there is no .git).
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import yaml

from .errors import TrackingError
from .settings import settings

MANIFEST, SUMMARY = "manifest.csv", "summary.json"
_NAME_EXTS = (".csv", ".tsv", ".txt", ".json", ".dvc")


# -- the data ---------------------------------------------------------------------------------
def data_hash(prepared_dir: str | Path) -> str:
    """sha256 of `prepared_dir`'s manifest.csv: the data's one identity."""
    manifest = Path(prepared_dir) / MANIFEST
    if not manifest.is_file():
        raise TrackingError(f"{prepared_dir}: no {MANIFEST} (not a prepared folder); cannot hash the data")
    return _file_sha256(manifest)


def name_of(source: str | Path | None) -> str:
    """A dataset's name from where it lives: the last folder (the folder a CSV manifest or a
    `.dvc` file sits in), in the characters experiment and run names take; `dataset` when
    there is none. `data/cells` -> `cells`, `s3://lab/sets/cells/` -> `cells`,
    `data/cells/labels.csv` -> `cells`."""
    text = str(source or "")
    parsed = urlparse(text)
    path = parsed.path if parsed.scheme and len(parsed.scheme) > 1 else text  # not C:\
    parts = [p for p in re.split(r"[/\\]+", path) if p not in ("", ".", "..")]
    if len(parts) > 1 and Path(parts[-1]).suffix.lower() in _NAME_EXTS:
        parts = parts[:-1]
    if not parts and parsed.netloc:
        parts = [parsed.netloc]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", parts[-1]).strip("-.") if parts else ""
    return name or "dataset"


def dataset_name(params: dict | None, prepared_dir: str | Path | None = None) -> str:
    """The name of the data a run uses: the one prepare recorded in `prepared_dir`, else
    the name of the params' `data.source` (a stage that has no prepared folder yet)."""
    recorded = _summary(prepared_dir).get("dataset") if prepared_dir is not None else None
    return recorded or name_of(((params or {}).get("data") or {}).get("source"))


def _summary(prepared_dir) -> dict:
    try:
        return json.loads((Path(prepared_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}


# -- files and folders ------------------------------------------------------------------------
def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, file sha256) list: same
    files, same hash, wherever the folder lies."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        raise TrackingError(f"cannot hash {path}: no such file or folder")
    total = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        total.update(f"{f.relative_to(path).as_posix()}\0{_file_sha256(f)}\n".encode())
    return total.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_hash(source: str | Path | None) -> str | None:
    """DVC's md5 of a DVC-tracked source (from `<source>.dvc` or the nearest dvc.lock),
    else its content hash; None for no source, a remote one or one not made yet."""
    if not source:
        return None
    path = Path(str(source))
    try:
        return _dvc_md5(path) or (content_hash(path) if path.exists() else None)
    except TrackingError:
        return None  # an unreadable .dvc file: the pipeline id uses the source's name


def _dvc_out_md5(outs, rel: str) -> str | None:
    for out in outs or []:
        if isinstance(out, dict) and Path(str(out.get("path", ""))).as_posix().rstrip("/") == rel:
            return out.get("md5") or out.get("etag") or out.get("checksum")
    return None


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrackingError(f"{path}: not valid YAML ({e})") from e


def _dvc_md5(path: Path) -> str | None:
    """DVC's recorded md5 of path: from `<path>.dvc` or a `dvc.lock` above it."""
    dvc_file = path.with_name(path.name + ".dvc")
    if dvc_file.is_file():
        md5 = _dvc_out_md5(_read_yaml(dvc_file).get("outs"), path.name)
        if md5:
            return md5
    absolute = path.resolve()
    for folder in absolute.parents:
        lock = folder / "dvc.lock"
        if lock.is_file():
            rel = absolute.relative_to(folder).as_posix()
            for stage in (_read_yaml(lock).get("stages") or {}).values():
                md5 = _dvc_out_md5((stage or {}).get("outs"), rel)
                if md5:
                    return md5
            return None  # the nearest dvc.lock is the project's; don't look further up
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return None
    return None


# -- the code ---------------------------------------------------------------------------------
def git_commit(cwd: str | Path | None = None) -> tuple[str | None, bool]:
    """(commit hash, dirty) of the repository at cwd; outside git, the commit the image
    was built from (`$CLADAPTER_GIT_COMMIT`, not dirty), else (None, False)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=cwd, capture_output=True, text=True, timeout=30)
            return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    built = settings().git_commit.strip()  # set in the image (build arg GIT_COMMIT), which has no .git
    return (built, False) if built and built != "unknown" else (None, False)
