"""The data side: demo data, prepare (validation, splits, leaks, 3D), transforms, loaders.

Every test writes real image/array files to tmp_path and runs the real code on them.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from helpers import tree_digest
from PIL import Image

from cladapter_core.data import (
    ManifestDataset,
    build_transform,
    is_3d,
    load_array,
    load_classes,
    load_inputs,
    make_demo_data,
    make_loader,
    prepare,
    read_manifest,
)
from cladapter_core.errors import DataError, ParamsError

MODEL_2D = {"input_size": [3, 16, 16], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "is_3d": False}
MODEL_3D = {"input_size": [3, 4, 12, 12], "mean": [0.45], "std": [0.225], "is_3d": True}
AUGMENT = {"hflip": True, "vflip": True, "brightness": 0.1, "contrast": 0.1, "shift": 0.1, "scale": 0.1, "rotate": 15}


def make_params(**data) -> dict:
    params = {
        "seed": 0,
        "data": {"val_fraction": 0.2, "test_fraction": 0.2, "shots_per_class": None, "folds": 0,
                 "fold": 0, "skip_invalid": False, "resize": None},
        "train": {"batch_size": 8, "num_workers": 0, "augment": dict(AUGMENT)},
    }
    params["data"].update(data)
    return params


# ---------------------------------------------------------------- file writers


def rng_img(seed: int, shape, dtype=np.uint8) -> np.ndarray:
    rng = np.random.RandomState(seed)
    top = np.iinfo(dtype).max if np.dtype(dtype).kind == "u" else 1
    return rng.randint(0, top + 1, size=shape).astype(dtype)


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return path


def write_jpeg(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=95)
    return path


def write_tiff(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr)
    return path


def image_folder(root: Path, classes=("a", "b", "c"), per_class=10, size=12) -> Path:
    """A small ImageFolder tree of distinct random 8-bit grayscale PNGs."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_png(root / name / f"{i:03d}.png", rng_img(1000 * c + i, (size, size)))
    return root


def manifest_rows(prepared: Path) -> list[dict]:
    with open(prepared / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def leftovers(parent: Path) -> list[str]:
    """Temp/backup dirs that an atomic write may have left behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- demo data


def test_demo_data_is_the_digits_and_deterministic(tmp_path):
    from sklearn.datasets import load_digits

    a = make_demo_data(tmp_path / "a")
    b = make_demo_data(tmp_path / "b")
    files = sorted(a.rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in a.iterdir()) == [str(d) for d in range(10)]
    digits = load_digits()
    img = Image.open(a / str(digits.target[5]) / "0005.png")
    assert img.mode == "L" and img.size == (8, 8)
    # real scan values 0..16 scaled to 0..255
    assert np.array_equal(np.array(img), np.rint(digits.images[5] * 255 / 16).astype(np.uint8))
    assert tree_digest(a) == tree_digest(b)
    assert leftovers(tmp_path) == []

    # a complete tree is left alone; an incomplete one is rebuilt
    marker = a / "0" / "0000.png"
    mtime = marker.stat().st_mtime_ns
    make_demo_data(a)
    assert marker.stat().st_mtime_ns == mtime
    (a / "3" / sorted(p.name for p in (a / "3").iterdir())[0]).unlink()
    make_demo_data(a)
    assert tree_digest(a) == tree_digest(b)


def test_demo_data_prepares_and_loads(tmp_path):
    demo = make_demo_data(tmp_path / "demo")
    params = make_params(val_fraction=0.15, test_fraction=0.15)
    summary = prepare(demo, tmp_path / "prepared", params)
    assert summary["classes"] == [str(d) for d in range(10)]
    assert sum(summary["totals"].values()) == 1797
    assert summary["num_leaks"] == 0 and summary["is_3d"] is False
    # stratified: every class in every split, in proportion (+-1 from rounding)
    for name in summary["classes"]:
        n = sum(summary["counts"][s][name] for s in ("train", "val", "test"))
        assert abs(summary["counts"]["test"][name] - 0.15 * n) <= 1
        assert abs(summary["counts"]["val"][name] - 0.15 * n) <= 1


# ---------------------------------------------------------------- prepare: formats


def test_prepare_mixed_formats_and_load_array(tmp_path):
    src = tmp_path / "src"
    gray8 = rng_img(1, (10, 12))
    rgb8 = rng_img(2, (10, 12, 3))
    rgba8 = rng_img(3, (10, 12, 4))
    gray16 = rng_img(4, (10, 12), np.uint16)
    gray16[0, 0], gray16[0, 1] = 65535, 0
    rgb16 = rng_img(5, (10, 12, 3), np.uint16)
    write_png(src / "cells" / "gray8.png", gray8)
    write_png(src / "cells" / "rgba.png", rgba8)
    write_tiff(src / "cells" / "micro16.tif", gray16)
    write_png(src / "cells" / "png16.png", gray16[::-1].copy())
    write_jpeg(src / "tissue" / "photo.jpg", rgb8)
    write_tiff(src / "tissue" / "rgb16.tiff", rgb16)
    write_png(src / "tissue" / "rgb.png", rgb8[::-1].copy())
    (src / "tissue" / "notes.txt").write_text("not an image")
    for i in range(4):  # enough items for all three splits
        write_png(src / "cells" / f"extra{i}.png", rng_img(10 + i, (10, 12)))
        write_png(src / "tissue" / f"extra{i}.png", rng_img(20 + i, (10, 12, 3)))

    summary = prepare(src, tmp_path / "out", make_params())
    assert summary["classes"] == ["cells", "tissue"]
    assert summary["totals"] == {"train": 9, "val": 3, "test": 3}
    assert summary["dtypes"] == {"uint16": 3, "uint8": 12}
    assert summary["ignored"] == ["tissue/notes.txt"]
    rows = manifest_rows(tmp_path / "out")
    assert len(rows) == 15 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert all(len(r["sha256"]) == 64 for r in rows)
    assert load_classes(tmp_path / "out") == ["cells", "tissue"]
    paths = {p.name: (p, label) for p, label in read_manifest(tmp_path / "out")}
    assert paths["rgba.png"][1] == 0 and paths["photo.jpg"][1] == 1
    assert all(p.is_absolute() and p.exists() for p, _ in paths.values())

    # decoding to float [0, 1]
    t16 = load_array(src / "cells" / "micro16.tif")
    assert t16.shape == (3, 10, 12) and t16.dtype == torch.float32
    assert t16[0, 0, 0] == 1.0 and t16[0, 0, 1] == 0.0
    assert torch.allclose(t16[0], torch.from_numpy(gray16.astype(np.float32) / 65535))
    assert torch.equal(t16[0], t16[2])  # grayscale repeated to 3 channels
    assert torch.allclose(load_array(src / "cells" / "png16.png")[0], t16[0].flip(0))
    rgba = load_array(src / "cells" / "rgba.png")
    assert rgba.shape == (3, 10, 12)  # alpha dropped
    assert torch.allclose(rgba, torch.from_numpy(rgba8[..., :3].astype(np.float32) / 255).permute(2, 0, 1))
    one = load_array(src / "tissue" / "rgb.png", in_chans=1)
    assert one.shape == (1, 10, 12)
    assert torch.allclose(one[0], torch.from_numpy(rgb8[::-1].astype(np.float32).mean(-1) / 255), atol=1e-6)
    rgb16_t = load_array(src / "tissue" / "rgb16.tiff")
    assert torch.allclose(rgb16_t, torch.from_numpy(rgb16.astype(np.float32) / 65535).permute(2, 0, 1))
    assert 0.0 <= float(load_array(src / "tissue" / "photo.jpg").min()) <= float(load_array(src / "tissue" / "photo.jpg").max()) <= 1.0


def test_prepare_is_deterministic_and_seeded(tmp_path):
    src = image_folder(tmp_path / "src", per_class=20)
    prepare(src, tmp_path / "p1", make_params())
    prepare(src, tmp_path / "p2", make_params())
    for name in ("manifest.csv", "classes.json", "summary.json"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()
    other = make_params()
    other["seed"] = 1
    prepare(src, tmp_path / "p3", other)
    assert manifest_rows(tmp_path / "p1") != manifest_rows(tmp_path / "p3")
    counts = json.loads((tmp_path / "p1" / "summary.json").read_text())["counts"]
    assert counts == {s: {c: n for c in "abc"} for s, n in (("train", 12), ("val", 4), ("test", 4))}
    assert leftovers(tmp_path) == []


def test_prepare_replaces_previous_output_atomically(tmp_path):
    src = image_folder(tmp_path / "src")
    out = tmp_path / "out"
    prepare(src, out, make_params())
    before = (out / "manifest.csv").read_bytes()
    (out / "stale.txt").write_text("from an older run")
    prepare(src, out, make_params())
    assert not (out / "stale.txt").exists() and (out / "manifest.csv").read_bytes() == before
    # a failing run leaves the previous complete output as it was
    (src / "a" / "000.png").write_bytes(b"")
    with pytest.raises(DataError):
        prepare(src, out, make_params())
    assert (out / "manifest.csv").read_bytes() == before
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- prepare: CSV manifests


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_split_column_is_respected(tmp_path):
    src = image_folder(tmp_path / "imgs", classes=("x", "y"), per_class=6)
    rows = []
    for name in ("x", "y"):
        for i in range(6):
            rows.append([f"imgs/{name}/{i:03d}.png", name, "train" if i < 3 else "val" if i < 5 else "test"])
    csv_path = write_csv(tmp_path / "list.csv", ["path", "label", "split"], rows)
    summary = prepare(csv_path, tmp_path / "out", make_params())
    assert summary["split"]["method"] == "split column"
    got = {r["path"]: r["split"] for r in manifest_rows(tmp_path / "out")}
    assert got == {p: s for p, _, s in rows}
    assert summary["source_kind"] == "csv"
    assert len(read_manifest(tmp_path / "out", "val")) == 4
    assert all(p.exists() for p, _ in read_manifest(tmp_path / "out"))
    assert src.exists()


def test_csv_without_val_rows_carves_val_from_train(tmp_path):
    image_folder(tmp_path / "imgs", classes=("x", "y"), per_class=10)
    rows = [[f"imgs/{n}/{i:03d}.png", n, "test" if i >= 8 else "train"] for n in ("x", "y") for i in range(10)]
    csv_path = write_csv(tmp_path / "list.csv", ["path", "label", "split"], rows)
    summary = prepare(csv_path, tmp_path / "out", make_params(val_fraction=0.25))
    assert summary["split"]["carved_from_train"] == ["val"]
    assert summary["totals"] == {"train": 12, "val": 4, "test": 4}
    test_paths = {r["path"] for r in manifest_rows(tmp_path / "out") if r["split"] == "test"}
    assert test_paths == {p for p, _, s in rows if s == "test"}


def test_csv_fold_column(tmp_path):
    image_folder(tmp_path / "imgs", classes=("x", "y"), per_class=9)
    rows = [[f"imgs/{n}/{i:03d}.png", n, "test" if i == 8 else str(i % 4)] for n in ("x", "y") for i in range(9)]
    csv_path = write_csv(tmp_path / "list.csv", ["path", "label", "fold"], rows)
    summary = prepare(csv_path, tmp_path / "out", make_params(folds=4, fold=2))
    assert summary["split"]["method"] == "fold column"
    got = {r["path"]: r["split"] for r in manifest_rows(tmp_path / "out")}
    for path, _, fold in rows:
        assert got[path] == ("test" if fold == "test" else "val" if fold == "2" else "train")


@pytest.mark.parametrize("case", ["no_label_col", "unknown_label", "missing_file", "bad_split", "empty"])
def test_csv_errors_name_the_problem(tmp_path, case):
    image_folder(tmp_path / "imgs", classes=("x", "y"), per_class=4)
    rows = [[f"imgs/{n}/{i:03d}.png", n, "train" if i < 2 else "val"] for n in ("x", "y") for i in range(4)]
    header = ["path", "label", "split"]
    expect = []
    if case == "no_label_col":
        header = ["path", "class", "split"]
        expect = ["label", "class"]
    elif case == "unknown_label":  # a label only in the test rows
        rows = [r for r in rows if r[0] != "imgs/y/003.png"] + [["imgs/y/003.png", "zebra", "test"]]
        expect = ["zebra", "line"]
    elif case == "missing_file":
        rows.append(["imgs/x/ghost.png", "x", "train"])
        expect = ["ghost.png", "missing"]
    elif case == "bad_split":
        rows[0][2] = "holdout"
        expect = ["holdout", "line 2"]
    elif case == "empty":
        rows = []
        expect = ["no rows"]
    csv_path = write_csv(tmp_path / "list.csv", header, rows)
    with pytest.raises(DataError) as err:
        prepare(csv_path, tmp_path / "out", make_params())
    for word in expect:
        assert word in str(err.value)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- prepare: splits


def test_few_shot_keeps_val_and_test(tmp_path):
    src = image_folder(tmp_path / "src", per_class=20)
    prepare(src, tmp_path / "full", make_params())
    few = prepare(src, tmp_path / "few", make_params(shots_per_class=3))
    assert few["counts"]["train"] == {"a": 3, "b": 3, "c": 3}
    assert few["few_shot_dropped"] == 3 * (12 - 3)
    for split in ("val", "test"):
        assert read_manifest(tmp_path / "few", split) == read_manifest(tmp_path / "full", split)
    full_train = set(read_manifest(tmp_path / "full", "train"))
    assert set(read_manifest(tmp_path / "few", "train")) <= full_train


def test_kfold_partitions_train_val_and_keeps_test(tmp_path):
    src = image_folder(tmp_path / "src", per_class=12)
    folds = 3
    vals, tests, pools = [], [], []
    for fold in range(folds):
        out = tmp_path / f"fold{fold}"
        summary = prepare(src, out, make_params(folds=folds, fold=fold))
        assert summary["split"]["folds"] == folds
        vals.append({p for p, _ in read_manifest(out, "val")})
        tests.append({p for p, _ in read_manifest(out, "test")})
        pools.append({p for p, _ in read_manifest(out, "train")} | vals[-1])
        # stratified: each class in each validation fold
        assert all(n >= 1 for n in summary["counts"]["val"].values())
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) > 0
    assert pools[0] == pools[1] == pools[2]
    assert set().union(*vals) == pools[0]
    assert sum(len(v) for v in vals) == len(pools[0])  # disjoint
    with pytest.raises(ParamsError, match="data.fold"):
        prepare(src, tmp_path / "bad", make_params(folds=3, fold=3))


def test_leaks_are_detected_by_pixels(tmp_path):
    image_folder(tmp_path / "imgs", classes=("x", "y"), per_class=4)
    same = rng_img(99, (12, 12))
    write_png(tmp_path / "imgs" / "x" / "dup.png", same)
    write_tiff(tmp_path / "imgs" / "y" / "dup_copy.tif", same)  # other format, same pixels
    rows = [[f"imgs/{n}/{i:03d}.png", n, "train" if i < 2 else "val" if i < 3 else "test"]
            for n in ("x", "y") for i in range(4)]
    rows += [["imgs/x/dup.png", "x", "train"], ["imgs/y/dup_copy.tif", "y", "test"]]
    csv_path = write_csv(tmp_path / "list.csv", ["path", "label", "split"], rows)
    with pytest.warns(UserWarning, match="more than one split"):
        summary = prepare(csv_path, tmp_path / "out", make_params())
    assert summary["num_leaks"] == 1
    leak = summary["leaks"][0]
    assert {(i["path"], i["split"]) for i in leak["items"]} == {("imgs/x/dup.png", "train"), ("imgs/y/dup_copy.tif", "test")}
    shas = {r["path"]: r["sha256"] for r in manifest_rows(tmp_path / "out")}
    assert shas["imgs/x/dup.png"] == shas["imgs/y/dup_copy.tif"] == leak["sha256"]


# ---------------------------------------------------------------- prepare: bad inputs


def bad_tree(root: Path) -> dict[str, str]:
    """A tree with three kinds of unusable files; returns {file name: expected reason word}."""
    image_folder(root, per_class=6)
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    good = root / "c" / "000.png"
    (root / "c" / "truncated.png").write_bytes(good.read_bytes()[:60])
    return {"empty.png": "empty", "corrupt.jpg": "decode", "truncated.png": "decode"}


def test_bad_files_are_reported_together(tmp_path):
    expected = bad_tree(tmp_path / "src")
    with pytest.raises(DataError) as err:
        prepare(tmp_path / "src", tmp_path / "out", make_params())
    msg = str(err.value)
    assert "3 unusable file(s)" in msg
    for name, word in expected.items():
        line = next(line for line in msg.splitlines() if name in line)
        assert word in line
    assert "skip_invalid" in msg
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_skip_invalid_leaves_bad_files_out(tmp_path):
    expected = bad_tree(tmp_path / "src")
    with pytest.warns(UserWarning, match="left out 3"):
        summary = prepare(tmp_path / "src", tmp_path / "out", make_params(skip_invalid=True))
    assert sorted(Path(s["path"]).name for s in summary["skipped"]) == sorted(expected)
    listed = [r["path"] for r in manifest_rows(tmp_path / "out")]
    assert not {Path(p).name for p in listed} & set(expected) and len(listed) == 18


@pytest.mark.parametrize("case", ["missing_source", "empty_class", "single_class", "no_class_folders", "mixed_2d_3d"])
def test_an_unusable_source_is_refused_with_what_is_wrong(tmp_path, case):
    src = tmp_path / "src"
    if case == "missing_source":
        expect = "does not exist"
    elif case == "empty_class":
        image_folder(src, classes=("a", "b"))
        (src / "hollow").mkdir()
        (src / "hollow" / "readme.txt").write_text("no images here")
        expect = "hollow"
    elif case == "single_class":
        image_folder(src, classes=("only",))
        expect = "only one class (only)"
    elif case == "no_class_folders":
        write_png(src / "loose.png", rng_img(0, (8, 8)))
        expect = "no class folders"
    else:
        image_folder(src, classes=("a", "b"))
        np.save(src / "b" / "vol.npy", np.zeros((3, 8, 8), np.uint8))
        expect = "mixes 2D images"
    with pytest.raises(DataError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        prepare(src, tmp_path / "out", make_params())
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_output_may_not_overlap_the_source(tmp_path):
    src = image_folder(tmp_path / "src")
    for out in (src / "prepared", src, tmp_path):
        with pytest.raises(DataError, match="overlap"):
            prepare(src, out, make_params())
    assert sorted(p.name for p in src.iterdir()) == ["a", "b", "c"]


def test_bad_params_are_params_errors(tmp_path):
    src = image_folder(tmp_path / "src")
    with pytest.raises(ParamsError) as err:
        prepare(src, tmp_path / "out", make_params(val_fraction=0.6, test_fraction=0.5, resize=-1))
    assert "leaves nothing to train on" in str(err.value) and "data.resize" in str(err.value)


# ---------------------------------------------------------------- 3D data


def three_d_tree(root: Path) -> Path:
    (root / "still").mkdir(parents=True)
    (root / "moving").mkdir(parents=True)
    for i in range(5):
        np.save(root / "still" / f"v{i}.npy", rng_img(i, (6, 10, 10)))  # (T,H,W)
        np.savez(root / "moving" / f"c{i}.npz", data=rng_img(50 + i, (3, 5, 10, 10), np.uint16))  # (C,T,H,W)
    for i in range(5):  # clips as folders of frames (natural order: f2 before f10)
        for t in (1, 2, 10):
            write_png(root / "frames" / f"clip{i}" / f"f{t}.png", rng_img(100 * i + t, (10, 10, 3)))
    return root


def test_3d_volumes_npz_and_frame_folders(tmp_path):
    src = three_d_tree(tmp_path / "src")
    summary = prepare(src, tmp_path / "out", make_params())
    assert summary["is_3d"] is True and is_3d(tmp_path / "out")
    assert summary["classes"] == ["frames", "moving", "still"]
    assert sum(summary["totals"].values()) == 15
    vol = load_array(src / "still" / "v0.npy")
    assert vol.shape == (3, 6, 10, 10)
    npz = load_array(src / "moving" / "c0.npz", in_chans=1)
    assert npz.shape == (1, 5, 10, 10)  # (C,T,H,W) stored channels-first, 3 channels -> mean
    clip = load_array(src / "frames" / "clip0")
    assert clip.shape == (3, 3, 10, 10)
    f10 = torch.from_numpy(rng_img(10, (10, 10, 3)).astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.allclose(clip[:, 2], f10)  # f10 is the last frame

    loader = make_loader(tmp_path / "out", "train", MODEL_3D, train=True, params=make_params(), batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 4, 12, 12) and y.shape == (4,)
    with pytest.raises(DataError, match="3D"):
        make_loader(tmp_path / "out", "train", MODEL_2D, train=False, params=make_params())


def test_wrong_rank_arrays_and_bad_frames(tmp_path):
    src = three_d_tree(tmp_path / "src")
    np.save(src / "still" / "flat.npy", np.zeros((10, 10), np.uint8))
    np.save(src / "still" / "five.npy", np.zeros((2, 2, 3, 10, 10), np.uint8))
    np.savez(src / "moving" / "two.npz", a=np.zeros((2, 8, 8)), b=np.zeros((2, 8, 8)))
    write_png(src / "frames" / "clip0" / "f3.png", rng_img(0, (12, 12, 3)))  # other size
    with pytest.raises(DataError) as err:
        prepare(src, tmp_path / "out", make_params())
    msg = str(err.value)
    assert "4 unusable" in msg
    assert "flat.npy" in msg and "rank 2" in msg
    assert "five.npy" in msg and "rank 5" in msg
    assert "two.npz" in msg and "several arrays" in msg
    assert "clip0" in msg and "frames differ" in msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- resize copies, paths


def test_resize_copies_keep_16_bit_and_move_with_the_dir(tmp_path):
    src = tmp_path / "src"
    for c in ("a", "b"):
        for i in range(5):
            write_tiff(src / c / f"{i}.tif", rng_img(7 * i + ord(c), (40, 30), np.uint16))
            write_png(src / c / f"{i}.png", rng_img(9 * i + ord(c), (40, 30, 3)))
    summary = prepare(src, tmp_path / "out", make_params(resize=16))
    assert summary["copied"] is True and summary["root"] == "."
    rows = manifest_rows(tmp_path / "out")
    assert all(r["path"].startswith("images/") for r in rows)
    a_png = next(r["path"] for r in rows if r["path"].startswith("images/0/") and r["path"].endswith(".png")
                 and Image.open(tmp_path / "out" / r["path"]).mode == "I;16")
    assert Image.open(tmp_path / "out" / a_png).size == (16, 16)
    rgb = [r["path"] for r in rows if Image.open(tmp_path / "out" / r["path"]).mode == "RGB"]
    assert len(rgb) == 10  # every 8-bit RGB image stored once, as 8-bit RGB
    # the prepared dir works on its own once the source is gone
    moved = tmp_path / "elsewhere" / "prep"
    shutil.copytree(tmp_path / "out", moved)
    shutil.rmtree(src)
    items = read_manifest(moved, "train")
    assert items and all(p.exists() and moved in p.parents for p, _ in items)
    x = load_array(items[0][0])
    assert x.shape == (3, 16, 16)


def test_manifest_paths_work_from_other_working_dirs(tmp_path, monkeypatch):
    image_folder(tmp_path / "repo" / "data" / "src")
    monkeypatch.chdir(tmp_path / "repo")
    summary = prepare("data/src", "outputs/prepared", make_params())
    assert summary["root"] == "../../data/src" and summary["source_root"] == "data/src"
    here = read_manifest("outputs/prepared")
    monkeypatch.chdir(tmp_path)
    there = read_manifest("repo/outputs/prepared")
    assert here == there and all(p.exists() for p, _ in there)


# ---------------------------------------------------------------- transforms and loaders


def test_eval_loader_yields_normalised_tensors(tmp_path):
    src = image_folder(tmp_path / "src", per_class=10, size=12)
    prepare(src, tmp_path / "out", make_params())
    loader = make_loader(tmp_path / "out", "test", MODEL_2D, train=False, params=make_params())
    batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [label for _, label in read_manifest(tmp_path / "out", "test")]
    mean = torch.tensor(MODEL_2D["mean"]).view(3, 1, 1)
    std = torch.tensor(MODEL_2D["std"]).view(3, 1, 1)
    first_path = read_manifest(tmp_path / "out", "test")[0][0]
    raw = torch.nn.functional.interpolate(load_array(first_path)[None], size=(16, 16), mode="bilinear",
                                          antialias=True, align_corners=False)[0]
    assert torch.allclose(x[0], (raw - mean) / std, atol=1e-4)
    unnorm = x * std + mean
    assert unnorm.min() >= -1e-4 and unnorm.max() <= 1 + 1e-4


def test_train_transform_augments_and_eval_is_deterministic(tmp_path):
    path = write_png(tmp_path / "img.png", rng_img(3, (20, 20, 3)))
    x = load_array(path)
    eval_t = build_transform(MODEL_2D, train=False, augment=AUGMENT)
    assert torch.equal(eval_t(x), eval_t(x))
    train_t = build_transform(MODEL_2D, train=True, augment=AUGMENT)
    torch.manual_seed(0)
    outs = [train_t(x) for _ in range(4)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    assert not torch.allclose(outs[0], eval_t(x)) and not torch.allclose(outs[0], outs[1])
    torch.manual_seed(0)
    assert torch.equal(train_t(x), outs[0])  # the global seed fixes the augmentations
    with pytest.raises(ParamsError, match="train.augment.rotation"):
        build_transform(MODEL_2D, train=True, augment={"rotation": 5})

    # a clip: every frame gets the same random flip/affine
    clip = x[:, None].repeat(1, 3, 1, 1)  # (C, T=3, H, W), identical frames
    model = dict(MODEL_3D, input_size=[3, 3, 16, 16])
    out = build_transform(model, train=True, augment=dict(AUGMENT, brightness=0, contrast=0))(clip)
    assert out.shape == (3, 3, 16, 16)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 0], out[:, 2])


def test_train_loader_shuffles_with_the_seed(tmp_path):
    src = image_folder(tmp_path / "src", per_class=10)
    prepare(src, tmp_path / "out", make_params())

    def order(seed):
        params = make_params()
        params["seed"] = seed
        params["train"]["augment"] = dict(AUGMENT, hflip=False, vflip=False, brightness=0, contrast=0,
                                          shift=0, scale=0, rotate=0)  # none: the order is the point
        loader = make_loader(tmp_path / "out", "train", MODEL_2D, train=True, params=params, batch_size=5)
        assert loader.drop_last is False
        return [t for _, y in loader for t in y.tolist()], torch.cat([x for x, _ in loader])

    (la, xa), (lb, xb) = order(0), order(0)
    assert la == lb and torch.equal(xa, xb)
    lc, _ = order(1)
    # an empty split is an empty loader (the trainer then skips validation)
    prepare(src, tmp_path / "noval", make_params(val_fraction=0))
    assert len(make_loader(tmp_path / "noval", "val", MODEL_2D, train=False, params=make_params()).dataset) == 0
    assert sorted(lc) == sorted(la) and lc != la
    ds = ManifestDataset(tmp_path / "out", "train", transform=None, in_chans=1)
    assert len(ds) == 18 and ds[0][0].shape == (1, 12, 12)


def test_load_inputs_for_predict(tmp_path):
    write_png(tmp_path / "in" / "a.png", rng_img(1, (9, 9)))
    write_tiff(tmp_path / "in" / "sub" / "b.tif", rng_img(2, (9, 9), np.uint16))
    (tmp_path / "in" / "sub" / "skip.txt").write_text("ignored")
    single = write_jpeg(tmp_path / "c.jpg", rng_img(3, (9, 9, 3)))
    batch, paths = load_inputs([tmp_path / "in", single], MODEL_2D)
    assert batch.shape == (3, 3, 16, 16)
    assert [p.name for p in paths] == ["a.png", "b.tif", "c.jpg"]
    eval_t = build_transform(MODEL_2D, train=False)
    assert torch.equal(batch[2], eval_t(load_array(single)))
    with pytest.raises(DataError, match="nowhere"):
        load_inputs([tmp_path / "nowhere.png"], MODEL_2D)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.png"):
        load_inputs([tmp_path / "bad.png"], MODEL_2D)


def test_a_listings_kind_by_name_is_the_kind_by_path():
    """The folder listing takes each file's kind from its name alone (no Path per file):
    the same answer as for the path, whatever the case or the dots."""
    from pathlib import Path

    from cladapter_core.data.files import kind_of_file, kind_of_name
    names = ["a.png", "b.JPG", "c.jpeg", "d.TIFF", "e.tif", "f.bmp", "g.npy", "h.NPZ", "i.txt",
             "noext", ".hidden", "x.tar.gz", "y.png.bak", "z.", "v.1.tif"]
    assert [kind_of_name(n) for n in names] == [kind_of_file(Path(n)) for n in names]
