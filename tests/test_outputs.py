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


# -- fsync around the renames --------------------------------------------------------------
def _record(monkeypatch) -> list:
    """Record, in order, what is fsynced (the path its descriptor names) and each rename."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name descriptors")
def test_atomic_write_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = _record(monkeypatch)
    path = outputs.atomic_write(tmp_path / "summary.json", '{"n": 1}\n')
    assert path.read_text() == '{"n": 1}\n'
    (rename,) = [e for e in events if e[0] == "rename"]
    tmp = rename[1]
    assert rename[2] == str(path) and os.path.dirname(tmp) == str(tmp_path)
    assert events == [("fsync", tmp), rename, ("fsync", str(tmp_path))]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name descriptors")
def test_atomic_dir_fsyncs_every_file_and_folder_before_the_swap(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "manifest.csv").write_text("old")
    events = _record(monkeypatch)
    with outputs.atomic_dir(out) as tmp:
        (tmp / "manifest.csv").write_text("path,label\n")
        (tmp / "images" / "0").mkdir(parents=True)
        (tmp / "images" / "0" / "a.png").write_bytes(b"png")
    assert (out / "manifest.csv").read_text() == "path,label\n" and (out / "images/0/a.png").read_bytes() == b"png"
    swap = events.index(("rename", str(tmp), str(out)))
    synced = [e[1] for e in events[:swap] if e[0] == "fsync"]
    assert {f"{tmp}/manifest.csv", f"{tmp}/images/0/a.png", f"{tmp}/images/0", f"{tmp}/images", str(tmp)} <= set(synced)
    assert ("fsync", str(tmp_path)) in events[swap:]  # the rename reached the folder
    assert not list(tmp_path.glob(".prepared.*"))      # the old output is gone


def test_a_failed_fsync_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    """A disk error while flushing (EIO) fails the write: the old output stays whole."""
    import errno
    path = tmp_path / "best_params.yaml"
    outputs.atomic_write(path, "old: 1\n")

    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output error"):
        outputs.atomic_write(path, "new: 2\n")
    out = tmp_path / "eval"
    with pytest.raises(OSError, match="Input/output error"):
        with outputs.atomic_dir(out) as tmp:
            (tmp / "metrics.json").write_text("{}")
    assert path.read_text() == "old: 1\n" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_params.yaml"]


def test_the_training_checkpoint_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    import torch
    from cladapter_core.training.resume import load_checkpoint, save_checkpoint
    path = tmp_path / "stage1.ckpt" / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, path)
    events = _record(monkeypatch) if os.path.isdir("/proc/self/fd") else None
    save_checkpoint({"epoch": 2, "w": torch.zeros(2)}, path)
    assert load_checkpoint(path)["epoch"] == 2 and sorted(os.listdir(path.parent)) == ["last.pt"]
    if events is not None:
        (rename,) = [e for e in events if e[0] == "rename"]
        assert events == [("fsync", rename[1]), rename, ("fsync", str(path.parent))]
    # a disk error at the flush: the previous checkpoint stays, no temp file
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 3, "w": torch.zeros(2)}, path)
    assert load_checkpoint(path)["epoch"] == 2 and sorted(os.listdir(path.parent)) == ["last.pt"]


def test_csv_cells_that_would_run_as_formulas_are_neutralised():
    assert [outputs.csv_cell(v) for v in ("=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx")] == \
        ["'=cmd|' /C calc'!A0", "'+1+1", "'-2+3", "'@SUM(A1)", "'\tx", "'\rx"]
    assert [outputs.csv_cell(v) for v in ("cat", "-0.5", "+3", 7, None, "a=b")] == ["cat", "-0.5", "+3", 7, None, "a=b"]
    assert outputs.csv_path_cell("=cmd|x.png") == "./=cmd|x.png" and outputs.csv_path_cell("-1/a.png") == "./-1/a.png"
    assert outputs.csv_path_cell("cat/a.png") == "cat/a.png"
