"""Writing outputs atomically: every stage builds its output beside the target, then
renames it into place, so a reader (DVC, KFP, MLflow, a person) sees the old output or the
new one, never half of either.

The one helper for directories (`atomic_dir`) and one for files (`atomic_write`). Both
leave the permissions that `umask` gives: `mkdtemp`/`mkstemp` would keep 0700/0600, which
a shared DVC cache or MLflow artifact store cannot read.
"""
from __future__ import annotations

import contextlib
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
        os.chmod(tmp, default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj) -> None:
    """JSON as every output of this project writes it: indented, sorted keys."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    Path(path).write_text(text + "\n", encoding="utf-8")
