"""The one atomic-output helper every stage writes through."""
from __future__ import annotations

import os
import stat

import pytest

from cladapter_core import outputs


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_dir_replaces_and_leaves_umask_permissions(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "old.txt").write_text("old")
    old_mask = os.umask(0o022)
    try:
        with outputs.atomic_dir(out) as tmp:
            assert tmp.parent == out.parent and tmp != out
            (tmp / "new.txt").write_text("new")
            assert (out / "old.txt").exists()  # readers see the old output until the end
        outputs.atomic_write(tmp_path / "f.json", "{}")
    finally:
        os.umask(old_mask)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _mode(out) == 0o755  # not mkdtemp's 0700
    assert _mode(tmp_path / "f.json") == 0o644  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_dir_keeps_the_old_output_on_error(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with outputs.atomic_dir(out) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed midway")
    assert (out / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_puts_the_old_output_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "manifest.csv").write_text("v1")
    real_replace = os.replace

    def replace(src, dst):
        if str(src).startswith(str(tmp_path / ".prepared.tmp-")):
            raise OSError("disk full")  # the new output cannot move into place
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        with outputs.atomic_dir(out) as tmp:
            (tmp / "manifest.csv").write_text("v2")
    assert (out / "manifest.csv").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
