"""Writing outputs atomically: every stage builds its output beside the target, then
renames it into place, so a reader (DVC, KFP, MLflow, a person) sees the old output or the
new one, never half of either.

The one helper for directories (`atomic_dir`) and one for files (`atomic_write`). Both
leave the permissions that `umask` gives: `mkdtemp`/`mkstemp` would keep 0700/0600, which
a shared DVC cache or MLflow artifact store cannot read. Both fsync what they wrote before
the rename and the folder after it: a rename reaches the disk before the data it names
unless told otherwise, and a node or power loss then leaves zero-length files.

CSV files a person may open in a spreadsheet go through `csv_cell` / `csv_path_cell`, so
that no cell runs as a formula.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool) -> int:
    """The mode a plain `mkdir`/`open` would give under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


# -- durability ---------------------------------------------------------------------------
def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk (an error here is data lost: it propagates)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it, a new file) to the disk. A filesystem that
    cannot fsync a folder (EINVAL) has nothing to flush."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under `root`, then every folder, deepest first (links left alone)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(folder)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path):
    """Yield a fresh temp dir beside `out_dir`; on success it replaces `out_dir`.

    On any exception the temp dir is removed and a previous `out_dir` stays as it was;
    if the final rename fails, the previous output is put back. The temp dir sits in the
    same parent so the rename never crosses filesystems.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        yield tmp
        fsync_tree(tmp)  # the files are on the disk before the rename names them
        _swap_in(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)  # put the previous output back
        raise
    fsync_dir(out_dir.parent)  # the rename itself
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write a file through a temp file beside it and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())  # the data on the disk before the rename names it
        os.chmod(tmp, default_mode(directory=False))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj) -> None:
    """JSON as every output of this project writes it: indented, sorted keys."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    Path(path).write_text(text + "\n", encoding="utf-8")


# -- CSV a spreadsheet may open ----------------------------------------------------------------
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what Excel, LibreOffice and Sheets evaluate


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def csv_cell(value):
    """A text cell that a spreadsheet would run as a formula (``=cmd|...``, ``+``, ``-``,
    ``@``, a tab or CR first), prefixed with a single quote as OWASP recommends; numbers
    (``-0.5``) and anything not a string are returned as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _number(value):
        return "'" + value
    return value


def csv_path_cell(path: str) -> str:
    """A relative path cell made safe the same way, but as the same path: ``./`` first
    (``=x.png`` -> ``./=x.png``), so every reader of the file still finds it."""
    return "./" + path if path.startswith(FORMULA_START) else path
