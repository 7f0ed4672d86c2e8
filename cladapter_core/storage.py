"""One storage layer, on fsspec: local paths, file:// and s3:// URIs (and any other fsspec
protocol, e.g. memory:// in tests) read, written, listed and mirrored with the same calls.

    open_file(uri, mode)      a file object             exists(uri)        is there a file
    info(uri)                 {"size", "etag"}          list_files(prefix) {name: {"size", "etag"}}
    download(uri, path)       object -> local file      upload(path, uri)  local file -> object
    copy_tree(src, dst)       a folder or prefix mirrored, either way
    remove(uri)               delete a file or object   local_path(uri), is_remote(uri), scheme(uri)

S3 honours the variables boto3 does (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION), the endpoint from AWS_ENDPOINT_URL or the MLflow-style
MLFLOW_S3_ENDPOINT_URL (MinIO and other S3-compatible stores), and botocore's standard
retry mode. A filesystem is built per call, never taken from fsspec's instance cache, so a
changed endpoint or credentials apply at once. Local files are written under a temporary
name and renamed: a reader never sees half a file.

Failures raise StorageError (NotFound: no such file or object; Changed: an object no
longer has the ETag it was expected to have), which names the URI (`.uri`) and what is
wrong (`.reason`), so callers can say it in their own words. Importing this module does
nothing else: fsspec, s3fs and boto3 are imported on first use.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from urllib.parse import urlparse

from .errors import CLAdapterError
from .settings import settings

S3_RETRIES = {"max_attempts": 5, "mode": "standard"}  # botocore: 5 retries, random exponential backoff
THREADS = 16  # files copied at once by copy_tree (S3 latency, not bandwidth, is the limit)
CHUNK = 1 << 20
# failures of the storage libraries themselves (a bug of ours, e.g. a TypeError, is not one)
_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3")


class StorageError(CLAdapterError):
    """`uri` cannot be read or written; `reason` says why."""

    def __init__(self, uri: str, reason: str, what: str = "cannot access"):
        super().__init__(f"{what} {uri}: {reason}")
        self.uri, self.reason = str(uri), reason


class NotFound(StorageError):
    """No file or object (or bucket) at `uri`."""


class Changed(StorageError):
    """The object at `uri` no longer has ETag `etag`."""

    def __init__(self, uri: str, etag: str, what: str = "cannot read"):
        super().__init__(uri, f"changed: it no longer has ETag {etag}", what)
        self.etag = etag


class _Mismatch(Exception):  # raised by _copy, which knows paths, not URIs; see _errors
    def __init__(self, etag: str):
        super().__init__(etag)
        self.etag = etag


# -- names ---------------------------------------------------------------------------------------
def scheme(uri) -> str:
    """The URI's scheme, lower case; "" for a plain path (a Windows drive, C:\\, included)."""
    found = urlparse(str(uri)).scheme
    return found.lower() if len(found) > 1 else ""


def is_remote(uri) -> bool:
    """Is `uri` anything but a local path or a file:// URI?"""
    return scheme(uri) not in ("", "file")


def local_path(uri) -> str:
    """A file:// URI's path; anything else as it is (a path, or a URI left to its reader)."""
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def s3_endpoint() -> str | None:
    """The S3 endpoint of an S3-compatible store (MinIO, ...); None: AWS itself."""
    return settings().s3_endpoint  # $AWS_ENDPOINT_URL, else $MLFLOW_S3_ENDPOINT_URL


def s3_client():
    """A boto3 S3 client with the same settings, for what fsspec does not cover."""
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=s3_endpoint(), config=Config(retries=dict(S3_RETRIES)))


def filesystem(uri):
    """(fsspec filesystem, path inside it) for `uri`, built now from the environment."""
    import fsspec
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(local_path(uri))
    options = {"skip_instance_cache": True}
    if scheme(uri) in ("s3", "s3a"):
        if not urlparse(str(uri)).netloc:
            raise StorageError(uri, "no bucket (expected s3://bucket/key)")
        options.update(client_kwargs={"endpoint_url": s3_endpoint()},
                       config_kwargs={"retries": dict(S3_RETRIES)})
    return fsspec.core.url_to_fs(str(uri), **options)


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if base.rstrip("/") else name


@contextlib.contextmanager
def _errors(uri, what: str):
    """The libraries' errors as StorageError naming `uri`."""
    try:
        yield
    except StorageError:
        raise
    except _Mismatch as e:
        raise Changed(uri, e.etag, what) from None
    except FileNotFoundError as e:
        reason = "no such bucket" if "bucket does not exist" in str(e) else "no such file or object"
        raise NotFound(uri, reason, what) from e
    except Exception as e:
        if isinstance(e, OSError) or type(e).__module__.split(".")[0] in _LIBRARIES:
            raise StorageError(uri, str(e) or type(e).__name__, what) from e
        raise


# -- reading and writing --------------------------------------------------------------------------
def open_file(uri, mode: str = "rb"):
    """A file object for `uri` (writing: local parent folders are made; an S3 object
    appears when the file is closed). Errors of later reads and writes are fsspec's own."""
    fs, path = filesystem(uri)
    with _errors(uri, "cannot open"):
        if _is_local(fs) and any(c in mode for c in "wax"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return fs.open(path, mode)


def exists(uri) -> bool:
    """Is there a file or object (or folder) at `uri`?"""
    fs, path = filesystem(uri)
    with _errors(uri, "cannot check"):
        return fs.exists(path)


def _entry(details: dict) -> dict:
    return {"size": int(details.get("size") or 0), "etag": details.get("ETag") or ""}


def info(uri) -> dict:
    """{"size": bytes, "etag": S3's ETag, quotes included ("" elsewhere)} of a file."""
    fs, path = filesystem(uri)
    with _errors(uri, "cannot read"):
        return _entry(fs.info(path))


def list_files(uri_prefix) -> dict[str, dict]:
    """Every file under the folder or prefix `uri_prefix`, by its POSIX name relative to
    it, sorted: {name: {"size", "etag"}}. Nothing there: {}. S3 folder markers (keys
    ending in /) are left out; `s3://b/data` does not list `s3://b/data-old/...`. On disk,
    symbolic links are followed, as shutil.copytree does (fsspec's find skips them)."""
    fs, path = filesystem(uri_prefix)
    if _is_local(fs):
        return dict(sorted(_list_local(path).items()))
    base = path.rstrip("/") + "/"
    with _errors(uri_prefix, "cannot list"):
        found = fs.find(base, detail=True)
    out = {}
    for name, details in sorted(found.items()):
        rel = name[len(base):] if name.startswith(base) else ""
        if rel and not rel.endswith("/") and details.get("type", "file") == "file":
            out[rel] = _entry(details)
    return out


def _list_local(root: str) -> dict[str, dict]:
    out = {}
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) or os.path.islink(path):  # a dangling link too: copying it fails loudly
                size = os.path.getsize(path) if os.path.exists(path) else 0
                out[os.path.relpath(path, root).replace(os.sep, "/")] = {"size": size, "etag": ""}
    return out


def _copy(src_fs, src: str, dst_fs, dst: str, etag: str = "") -> None:
    """One file; a local destination is written under a temporary name, then renamed."""
    tmp = f"{dst}.part-{os.getpid()}-{threading.get_ident()}"
    try:
        if _is_local(src_fs) and _is_local(dst_fs) and not etag:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, tmp)  # kernel copy; keeps the modification time
            os.replace(tmp, dst)
            return
        with src_fs.open(src, "rb") as fin:  # one handle: a file renamed over meanwhile is read whole
            seen = (getattr(fin, "details", None) or {}).get("ETag", "")
            if etag and seen != etag:  # (a store with no ETags, e.g. a disk, never matches)
                raise _Mismatch(etag)
            try:
                if _is_local(dst_fs):
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    with open(tmp, "wb") as out:
                        shutil.copyfileobj(fin, out, CHUNK)
                    os.replace(tmp, dst)
                else:
                    with dst_fs.open(dst, "wb") as out:
                        shutil.copyfileobj(fin, out, CHUNK)
            except OSError as e:  # s3fs reads with If-Match on the ETag it opened: changed since
                if type(e).__name__ == "FileExpired":
                    raise _Mismatch(etag or seen) from e
                raise
    finally:
        if _is_local(dst_fs) and os.path.lexists(tmp):
            os.unlink(tmp)


def download(uri, path, etag: str = "") -> None:
    """The file at `uri` copied to the local `path` (parent folders made). `etag`: the
    S3 ETag the object must still have (Changed otherwise)."""
    fs, src = filesystem(uri)
    local_fs, dst = filesystem(path)
    with _errors(uri, "cannot download"):
        _copy(fs, src, local_fs, dst, etag)


def upload(path, uri) -> None:
    """The local file `path` copied to `uri` (read through one open handle)."""
    local_fs, src = filesystem(path)
    fs, dst = filesystem(uri)
    with _errors(uri, "cannot upload to"):
        _copy(local_fs, src, fs, dst)


def remove(uri) -> None:
    """Delete the file or object at `uri`; none there is no error."""
    fs, path = filesystem(uri)
    with _errors(uri, "cannot remove"), contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def copy_tree(src_uri, dst_uri, files=None, etags: dict | None = None) -> list[str]:
    """Mirror the folder or prefix `src_uri` under `dst_uri` (each a path, file:// or
    s3://; files there already are overwritten, others kept). `files`: only these names
    relative to `src_uri` (default: all that list_files finds; none is NotFound);
    `etags`: {name: ETag} the objects must still have. Returns the names copied."""
    names = sorted(files) if files is not None else list(list_files(src_uri))
    if files is None and not names:
        raise NotFound(src_uri, "no files under it", "cannot copy")
    for name in names:
        if not name or name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise StorageError(_join(str(src_uri), name), "the name escapes the folder", "cannot copy")
    src_fs, src = filesystem(src_uri)
    dst_fs, dst = filesystem(dst_uri)

    def one(name):
        remote = src_uri if is_remote(src_uri) or not is_remote(dst_uri) else dst_uri
        with _errors(_join(str(remote), name), "cannot copy"):
            _copy(src_fs, _join(src, name), dst_fs, _join(dst, name), (etags or {}).get(name, ""))

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        list(pool.map(one, names))
    return names
