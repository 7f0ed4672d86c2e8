"""Containment: prepare reads only files inside the data root (CSV `../` and absolute
paths, symlinks out of the folder are refused unless `data.allow_outside_root`), the
pipeline's Dataset artifact applies the same rule whether or not the files are copied,
and no CSV cell the platform writes runs as a spreadsheet formula."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cladapter_core.data import prepare, read_manifest
from cladapter_core.errors import DataError
from cladapter_core.params import load_params


def png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (12, 12)).astype(np.uint8)).save(path)
    return path


def params(*more):
    return load_params(None, ["data.val_fraction=0.2", "data.test_fraction=0.2", *more])


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


@pytest.fixture
def layout(tmp_path):
    """data/ (the root: a CSV and its images) and odd/outside/ beside it; returns tmp_path."""
    data = tmp_path / "data"
    for i in range(4):
        png(data / "a" / f"{i}.png", i)
        png(data / "b" / f"{i}.png", 100 + i)
    png(tmp_path / "odd" / "outside" / "x.png", 500)
    png(tmp_path / "odd" / "outside" / "y.png", 501)
    os.symlink(tmp_path / "odd" / "outside" / "y.png", data / "a" / "link.png")
    return tmp_path


def inside_rows():
    return [(f"{c}/{i}.png", c, s) for c in "ab" for i, s in enumerate(["train", "train", "val", "test"])]


def test_csv_rows_outside_the_root_are_refused_naming_row_and_root_then_allowed_by_the_flag(layout):
    data, out = layout / "data", layout / "prepared"
    absolute = str(layout / "odd" / "outside" / "x.png")
    source = write_csv(data / "train.csv", inside_rows() + [
        ("../odd/outside/x.png", "a", "train"),   # line 10
        (absolute, "b", "train"),                  # line 11 (the same file: listed twice)
        ("a/link.png", "a", "train")])             # line 12: a symlink out of the folder
    with pytest.raises(DataError) as e:
        prepare(source, out, params())
    msg = str(e.value)
    assert f"lead outside the data root {data.resolve()}" in msg
    assert f"line 10: ../odd/outside/x.png -> {layout.resolve()}/odd/outside/x.png" in msg
    assert f"line 11: {absolute} ->" in msg
    assert f"line 12: a/link.png -> {layout.resolve()}/odd/outside/y.png" in msg
    assert "data.allow_outside_root: true" in msg
    assert not out.exists() and [p.name for p in layout.iterdir() if p.name.startswith(".")] == []

    summary = prepare(source, out, params("data.allow_outside_root=true", "data.skip_invalid=true"))
    assert summary["outside_root"] == sorted({f"{layout.resolve()}/odd/outside/x.png",
                                              f"{layout.resolve()}/odd/outside/y.png"})
    paths = {p for p, _ in read_manifest(out)}
    assert layout / "odd" / "outside" / "x.png" in paths and data / "a" / "link.png" in paths


def test_a_csv_inside_the_root_is_untouched_and_records_nothing_outside(layout):
    source = write_csv(layout / "data" / "train.csv", inside_rows())
    os.symlink(layout / "data" / "b" / "0.png", layout / "data" / "b" / "same.png")  # a link that stays inside
    write_csv(source, inside_rows() + [("b/same.png", "b", "val")])
    summary = prepare(source, layout / "prepared", params("data.skip_invalid=true"))
    assert summary["outside_root"] == [] and summary["totals"]["train"] == 4


def test_symlinks_out_of_an_image_folder_are_refused_unless_allowed(layout):
    data = layout / "data"
    os.symlink(layout / "odd" / "outside", data / "c")  # a whole class folder elsewhere
    with pytest.raises(DataError) as e:
        prepare(data, layout / "prepared", params())
    msg = str(e.value)
    assert f"symlink a/link.png -> {layout.resolve()}/odd/outside/y.png" in msg
    assert f"symlink c -> {layout.resolve()}/odd/outside" in msg and "2 path(s)" in msg
    summary = prepare(data, layout / "prepared", params("data.allow_outside_root=true"))
    assert summary["classes"] == ["a", "b", "c"] and len(summary["outside_root"]) == 2


def test_frames_of_a_3d_clip_may_not_link_out_of_the_root(tmp_path):
    from cladapter_core.data.sources import list_source
    data = tmp_path / "clips"
    for c in "ab":
        for k in range(2):
            for t in range(3):
                png(data / c / f"clip{k}" / f"{t:02d}.png", 10 * k + t)
    png(tmp_path / "elsewhere" / "f.png", 9)
    os.symlink(tmp_path / "elsewhere" / "f.png", data / "a" / "clip1" / "03.png")
    with pytest.raises(DataError, match=r"symlink a/clip1/03.png -> .*elsewhere/f.png"):
        list_source(data)
    assert list_source(data, allow_outside_root=True).outside == [str((tmp_path / "elsewhere" / "f.png").resolve())]


def test_a_formula_cell_is_neutralised_in_the_manifest_and_still_read(layout):
    data = layout / "data"
    evil = "=cmd|' -C calc'!A0.png"
    png(data / evil, 77)
    source = write_csv(data / "train.csv", inside_rows() + [(evil, "a", "train"), ("-1.png", "b", "train")])
    png(data / "-1.png", 78)
    prepare(source, layout / "prepared", params())
    text = (layout / "prepared" / "manifest.csv").read_text()
    cells = [row[0] for row in csv.reader(text.splitlines())]
    assert "./=cmd|' -C calc'!A0.png" in cells and "./-1.png" in cells
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    paths = {p for p, _ in read_manifest(layout / "prepared")}   # the reader finds the same files
    assert data / evil in paths and data / "-1.png" in paths


def test_predictions_csv_cells_are_neutralised(tmp_path):
    from cladapter_core.evaluation.evaluate import _write_predictions
    classes = ["=HYPERLINK(\"http://x\")", "cat"]
    path = tmp_path / "predictions.csv"
    _write_predictions(path, [tmp_path / "a.png", Path("-2+3.png")], [0, 1],
                       np.array([[0.9, 0.1], [0.2, 0.8]]), classes)
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows[1][:3] == [str(tmp_path / "a.png"), "'=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"]
    assert rows[2][:3] == ["./-2+3.png", "cat", "cat"]


# -- the pipeline's Dataset artifact: the same rule, copied or not --------------------------------
def test_the_dataset_artifact_refuses_files_outside_the_dataset_copied_or_not(layout):
    from components import dataref
    data = layout / "data"
    ref = {"kind": "folder", "uri": str(data), "path": "", "rev": ""}
    source = write_csv(data / "train.csv", inside_rows() + [("../odd/outside/x.png", "a", "train")])
    for resize in ("null", "16"):   # by reference, and with data.resize (the pixels copied in)
        prepared = layout / f"prepared-{resize}"
        prepare(source, prepared, params("data.allow_outside_root=true", f"data.resize={resize}"))
        out = layout / f"artifact-{resize}"
        with pytest.raises(DataError, match=r"file .*odd/outside/x.png lies outside the dataset"):
            dataref.write(prepared, data, out, ref)
        assert not (out / "prepared").exists() and not (out / "files.csv").exists()
    # inside the dataset: written; a formula cell in files.csv is inert and still found
    evil = "=1+2.png"
    png(data / evil, 90)
    write_csv(source, inside_rows() + [(evil, "a", "train")])
    prepare(source, layout / "ok", params())
    written = dataref.write(layout / "ok", data, layout / "artifact-ok", ref)
    assert written["files"] == 9 and written["by_reference"]
    files = (layout / "artifact-ok" / "files.csv").read_text()
    assert "./=1+2.png,./=1+2.png" in files
    assert {r["file"] for r in dataref.needed(layout / "artifact-ok")} >= {"=1+2.png", "a/0.png"}
    summary = json.loads((layout / "artifact-ok" / "prepared" / "summary.json").read_text())
    assert summary["outside_root"] == []


def test_the_artifact_follows_symlinks_when_it_indexes_files(layout):
    """A link inside the dataset that leads out of it, in a prepared folder that does not
    say so (made before `outside_root` existed): the artifact's own index refuses it."""
    from components import dataref
    data = layout / "data"
    source = write_csv(data / "train.csv", inside_rows() + [("a/link.png", "a", "train")])
    prepare(source, layout / "prepared", params("data.allow_outside_root=true"))
    summary = json.loads((layout / "prepared" / "summary.json").read_text())
    del summary["outside_root"]
    (layout / "prepared" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match=r"file .*odd/outside/y.png lies outside the dataset"):
        dataref.write(layout / "prepared", data, layout / "artifact",
                      {"kind": "folder", "uri": str(data), "path": "", "rev": ""})


def test_the_tuning_table_writes_text_cells_inert_and_numbers_as_numbers():
    from cladapter_core.tune.results import _table_csv
    text = _table_csv([{"number": 0, "state": "COMPLETE", "value": -0.5, "worker": "=1+1", "param:train.lr": 1e-3}])
    assert list(csv.reader(text.splitlines()))[1] == ["0", "COMPLETE", "-0.5", "'=1+1", "0.001"]
