"""The dataset of a run, by reference: fetched from `demo`, an `s3://` prefix, a DVC repository
or a local folder, prepared, and read back by the steps that need its files (`components.dataref`)."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from cladapter_core import identity, storage
from cladapter_core.errors import DataError
from components import dataref


PREPARED, SOURCE, SOURCE_REF = dataref.PREPARED, dataref.SOURCE, dataref.SOURCE_REF
# -- the dataset ---------------------------------------------------------------------------
def _is_dvc_repo_url(uri: str) -> bool:
    return uri.startswith(("git@", "git://", "ssh://", "http://", "https://")) or uri.endswith(".git")


def fetch_source(dataset_uri: str, dataset_path: str, dataset_rev: str, dest: Path) -> Path:
    """Copy the dataset into `dest` and return the folder or CSV to prepare.

    `dataset_uri`: `demo` (the bundled digit scans), `s3://bucket/prefix` (every object
    under the prefix; `dataset_path` picks a file or folder inside it, e.g. a CSV
    manifest), a DVC repository (git URL or local repository; `dataset_path` is the path
    in it, `dataset_rev` a branch, tag or commit), or a local folder.
    """
    return _fetch(dataset_uri, dataset_path, dataset_rev, dest)[1]


def _fetch(dataset_uri: str, dataset_path: str, dataset_rev: str, dest: Path,
           copy_folder: bool = True) -> tuple[Path, Path, dict]:
    """`fetch_source`, returning (base, what to prepare, S3 ETags): `base` is the folder
    the source's files are named under in the artifact (the S3 prefix's or the DVC
    repository's root, or the local folder itself when `copy_folder` is false)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    uri = (dataset_uri or "").strip()
    path = (dataset_path or "").strip().strip("/")
    rev = (dataset_rev or "").strip()
    if not uri:
        raise DataError("dataset_uri is empty: give `demo`, an s3:// prefix, a DVC repository or a folder")
    if uri == "demo":
        from cladapter_core.data import make_demo_data
        return dest, make_demo_data(dest), {}
    if storage.scheme(uri) == "s3":
        etags = _download_prefix(uri, dest)
        return dest, _inside(dest, path, uri), etags
    local = Path(storage.local_path(uri))
    if _is_dvc_repo_url(uri) or rev or (local.is_dir() and (local / ".dvc").is_dir()):
        if not path:
            raise DataError(f"dataset_uri {uri} is a DVC repository: set dataset_path to the "
                            "data's path in it (e.g. data/images)")
        return dest, _dvc_get(uri, path, resolve_rev(uri, rev), dest), {}
    if not local.is_dir():
        raise DataError(f"dataset_uri {uri}: not `demo`, an s3:// prefix, a DVC repository "
                        "or an existing folder")
    if not copy_folder:
        return local, _inside(local, path, uri), {}
    try:
        storage.copy_tree(local, dest)
    except storage.StorageError as e:
        raise DataError(f"dataset_uri {uri}: {e}") from e
    return dest, _inside(dest, path, uri), {}


def _inside(root: Path, path: str, uri: str) -> Path:
    target = root / path if path else root
    if not target.exists():
        raise DataError(f"dataset_path {path!r}: not found in {uri}")
    return target


def _download_prefix(uri: str, dest: Path) -> dict[str, str]:
    """Every object under the prefix into `dest`; returns {path under the prefix: ETag}."""
    if not urlparse(uri).netloc:
        raise DataError(f"dataset_uri {uri}: no bucket (expected s3://bucket/prefix)")
    try:
        listing = storage.list_files(uri)
        for rel in listing:
            if ".." in PurePosixPath(rel).parts:
                raise DataError(f"{uri}: object key {rel!r} escapes the prefix")
        if listing:
            storage.copy_tree(uri, dest, files=listing)
    except storage.StorageError as e:
        raise DataError(f"cannot download {e.uri}: {e.reason} (check the cladapter-s3 credentials "
                        "and AWS_ENDPOINT_URL)") from e
    if not listing:
        raise DataError(f"no objects under {uri} (looked for {uri.rstrip('/')}/*)")
    return {rel: entry["etag"] for rel, entry in listing.items()}


def _dvc_get(repo: str, path: str, rev: str, dest: Path) -> Path:
    if shutil.which("git") is None:
        raise DataError(f"reading {path} from the DVC repository {repo} needs `git`, which "
                        "is not installed here")
    out = dest / path  # under the repository's own layout: files.csv names them as DVC does
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dvc", "get", repo, path, "-o", str(out)]
    if rev:
        cmd += ["--rev", rev]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})  # a pod does not phone home
    if proc.returncode != 0:
        raise DataError(f"dvc get {repo} {path}{' --rev ' + rev if rev else ''} failed: "
                        f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return out


def resolve_rev(repo: str, rev: str) -> str:
    """A DVC repository's revision (branch, tag, empty: the default branch) as the commit
    SHA it points to now, so every later step and the run's tags name the same data."""
    rev = (rev or "").strip()
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev.lower()):
        return rev
    if shutil.which("git") is None:
        raise DataError(f"resolving revision {rev or 'HEAD'} of {repo} needs `git`, which is not installed here")
    proc = subprocess.run(["git", "ls-remote", repo, rev or "HEAD"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise DataError(f"revision {rev or 'HEAD'} of the DVC repository {repo}: not found "
                        f"({(proc.stderr or '').strip()[-500:] or 'no such branch or tag'})")
    # a tag may be listed twice (`v1` and the commit it points to, `v1^{}`): take the commit
    peeled = [sha for sha, ref in lines if ref.endswith("^{}")]
    return peeled[0] if peeled else lines[0][0]


def source_ref(dataset_uri: str, dataset_path: str, dataset_rev: str) -> dict:
    """Where a dataset's files are: kind (demo, s3, dvc, folder), uri, path, and for a
    DVC repository the revision as a commit SHA."""
    uri, path = (dataset_uri or "").strip(), (dataset_path or "").strip().strip("/")
    local = Path(storage.local_path(uri))
    if uri == "demo":
        kind = "demo"
    elif storage.scheme(uri) == "s3":
        kind = "s3"
    elif _is_dvc_repo_url(uri) or dataset_rev.strip() or (local.is_dir() and (local / ".dvc").is_dir()):
        kind = "dvc"
    else:
        kind = "folder"
    ref = {"kind": kind, "uri": uri, "path": path, "rev": ""}
    if kind == "dvc":
        ref["rev"] = resolve_rev(uri, dataset_rev)
    return ref


def _listing_version(kind: str, entries: dict) -> str:
    """`<kind>:sha256:<hex>` of a listing {name: what changes with the content}."""
    import hashlib
    digest = hashlib.sha256("".join(f"{n}\t{entries[n]}\n" for n in sorted(entries)).encode())
    return f"{kind}:sha256:{digest.hexdigest()}"


def _folder_entries(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in sorted(folder.rglob("*")) if p.is_file()}


def data_version(dataset_uri: str, dataset_path: str, dataset_rev: str) -> str:
    """What names the data a run reads, known before reading it, for prepare's cache key:
    a DVC revision's commit SHA (`git:<sha>`), the hash of an S3 prefix's listing (every
    object's name and ETag) or of a local folder's (names, sizes, mtimes), `demo`. A
    changed dataset gives another version, so prepare is not served from an old cache entry."""
    ref = source_ref(dataset_uri, dataset_path, dataset_rev)
    if ref["kind"] == "demo":
        return "demo"
    if ref["kind"] == "dvc":
        return f"git:{ref['rev']}"
    if ref["kind"] == "s3":
        try:
            listing = storage.list_files(ref["uri"])
        except storage.StorageError as e:
            raise DataError(f"cannot list {e.uri}: {e.reason} (check the cladapter-s3 credentials "
                            "and AWS_ENDPOINT_URL)") from e
        if not listing:
            raise DataError(f"no objects under {ref['uri']} (looked for {ref['uri'].rstrip('/')}/*)")
        return _listing_version("s3", {n: e["etag"] for n, e in listing.items()})
    folder = Path(storage.local_path(ref["uri"]))
    if not folder.is_dir():
        raise DataError(f"dataset_uri {ref['uri']}: not `demo`, an s3:// prefix, a DVC repository "
                        "or an existing folder")
    return _listing_version("folder", _folder_entries(folder))


def _check_version(expected: str, ref: dict, etags: dict) -> None:
    """Prepare read the data `expected` names, or stops: it changed after the version step."""
    if not expected:
        return
    seen = {"demo": lambda: "demo", "dvc": lambda: f"git:{ref['rev']}",
            "s3": lambda: _listing_version("s3", etags),
            "folder": lambda: _listing_version("folder", _folder_entries(Path(storage.local_path(ref["uri"]))))}
    got = seen[ref["kind"]]()
    if got != expected:
        raise DataError(f"dataset {ref['uri']} changed while the run started (version {expected}, "
                        f"prepare read {got}): start the run again")


def read_source_ref(dataset_dir) -> dict | None:
    return dataref.read_ref(dataset_dir)


def dataset_metadata(dataset_dir, summary: dict) -> dict:
    """What the KFP UI shows on the Dataset artifact."""
    ref = read_source_ref(dataset_dir) or {}
    return {"source": ref.get("uri"), "dataset_path": ref.get("path"), "dataset_rev": ref.get("rev"),
            "num_classes": summary["num_classes"], "classes": summary["classes"], **summary["totals"],
            "leaks": summary["num_leaks"], "skipped": len(summary["skipped"]),
            "files": ref.get("files"), "bytes": ref.get("bytes"), "data_hash": identity.data_hash(artifact_prepared(dataset_dir))}


def prepare_task(dataset_uri: str, dataset_path: str, dataset_rev: str, params: dict,
                 out_dir, data_version: str = "") -> dict:
    """Prepare the dataset into the Dataset artifact `out_dir` by reference
    (`components.dataref`): the files are fetched onto this step's scratch volume (a
    local folder is read where it is), prepared there, and only the manifest, classes,
    summary, the list of files and where they are (`source.json`: URI, path, a DVC
    revision as its SHA) go into the artifact. `data_version` (`data_version()`, the
    cache key's): a DVC repository is read at that commit, and data that no longer
    matches it is refused."""
    from cladapter_core.data import prepare
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if data_version.startswith("git:"):
        dataset_rev = data_version[len("git:"):]
    ref = source_ref(dataset_uri, dataset_path, dataset_rev)
    with tempfile.TemporaryDirectory(prefix="cladapter-prepare-") as tmp:
        work = Path(tmp)
        base, source, etags = _fetch(dataset_uri, dataset_path, ref["rev"] or dataset_rev, work / SOURCE,
                                     copy_folder=False)
        _check_version(data_version, ref, etags)
        summary = prepare(source, work / PREPARED, params,
                          name=identity.dataset_name(params))  # the run's dataset_uri, as every step names it
        ref = dataref.write(work / PREPARED, base, out_dir, ref, etags)
    print(f"prepared by reference: {ref.get('files')} files ({ref.get('bytes')} bytes) stay at "
          f"{ref['uri']}{'/' + ref['path'] if ref.get('path') else ''}; the artifact holds the manifest")
    return summary


def artifact_prepared(dataset_dir) -> Path:
    """The artifact's own prepared folder (manifest, classes, summary; maybe no files)."""
    path = Path(dataset_dir) / PREPARED
    if not (path / "manifest.csv").is_file():
        raise DataError(f"{dataset_dir}: not a prepared Dataset artifact (no {PREPARED}/manifest.csv)")
    return path


@contextlib.contextmanager
def local_data(dataset_dir, splits=None):
    """A prepared folder with the files of `splits` (None: all) fetched onto this step's
    scratch volume (`dataref.fetch`), removed on the way out."""
    artifact_prepared(dataset_dir)
    if not dataref.by_reference(dataset_dir):
        yield Path(dataset_dir) / PREPARED
        return
    tmp = Path(tempfile.mkdtemp(prefix="cladapter-data-"))
    try:
        prepared, got = dataref.fetch(dataset_dir, splits, tmp)
        print(f"data: {got['files']} files, {got['bytes']} bytes of split(s) "
              f"{', '.join(splits) if splits else 'all'} ({got['how']})")
        yield prepared
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepared_dir(dataset_dir) -> Path:
    """A prepared folder with every split's files at hand: the artifact's own when it
    carries them, else fetched once (all splits) into a temporary folder removed when
    this process exits. Steps that read some splits use `local_data` instead."""
    path = artifact_prepared(dataset_dir)
    if not dataref.by_reference(dataset_dir):
        return path
    stack = contextlib.ExitStack()
    atexit.register(stack.close)
    return stack.enter_context(local_data(dataset_dir))
