"""Hostile input (docs/security.md): files that declare more pixels than they hold.

A 177 KB PNG can declare 13,500 x 13,500 pixels and a 200 KB zlib TIFF the same; decoders
allocate what the header says. Every 2D image's size is read from its header and a 3D
item's shape from its .npy header (inside the zip for .npz) before anything is decoded,
and items over $CLADAPTER_MAX_IMAGE_PIXELS / $CLADAPTER_MAX_VOLUME_VOXELS are refused with
an error naming the file and its size:

- unit: every format and decoding path (the torchvision fast path, Pillow, tifffile, .npy,
  .npz, frame folders, the clip loader) refuses what is over a (small) limit and decodes
  what is within it;
- integration: the bombs themselves (written here in a streaming way, small on disk) are
  refused by `load_array`, `predict` and `prepare` (two decoding processes) in a child
  process whose peak memory (ru_maxrss, itself and its children) grows by less than 100 MB.
  Serving: tests/test_serving.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import BOMB_SIDE, BOMB_VOLUME, REPO, npz_bomb, png_bomb, tiff_bomb

MAX_GROWTH_KB = 100 * 1024


def test_the_bombs_are_small_on_disk_and_declare_what_they_say(tmp_path):
    import tifffile
    png, tif, npz = png_bomb(tmp_path / "b.png"), tiff_bomb(tmp_path / "b.tif"), npz_bomb(tmp_path / "b.npz")
    assert png.stat().st_size < 300_000 and tif.stat().st_size < 300_000 and npz.stat().st_size < 1_000_000
    from PIL import Image
    with pytest.raises(Image.DecompressionBombError):  # Pillow itself refuses to open it
        Image.open(png)
    with tifffile.TiffFile(tif) as t:
        assert t.series[0].shape == (BOMB_SIDE, BOMB_SIDE)
    with np.load(npz) as z, z.zip.open("data.npy") as fh:
        np.lib.format.read_magic(fh)
        assert np.lib.format.read_array_header_1_0(fh)[0] == BOMB_VOLUME


# ------------------------------------------------------------ unit: every path, small limits
def _images(folder: Path, w: int, h: int) -> dict[str, Path]:
    """One file per decoding path, w x h pixels."""
    import tifffile
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    grey = (np.arange(w * h) % 251).astype(np.uint8).reshape(h, w)
    out = {"plain.png": folder / "plain.png", "palette.png": folder / "palette.png",
           "plain.jpg": folder / "plain.jpg", "cmyk.jpg": folder / "cmyk.jpg",
           "grey.bmp": folder / "grey.bmp", "micro.tif": folder / "micro.tif",
           "stack.tif": folder / "stack.tif"}
    Image.fromarray(grey).save(out["plain.png"])                      # torchvision
    Image.fromarray(grey).convert("P").save(out["palette.png"])       # Pillow
    Image.fromarray(grey).save(out["plain.jpg"], quality=90)          # torchvision
    Image.fromarray(grey).convert("CMYK").save(out["cmyk.jpg"])       # Pillow
    Image.fromarray(grey).save(out["grey.bmp"])                       # Pillow
    tifffile.imwrite(out["micro.tif"], grey.astype(np.uint16), compression="zlib")  # tifffile
    tifffile.imwrite(out["stack.tif"], np.stack([grey[: h // 2]] * 2))  # 2 planes, half height
    return out


def test_images_over_the_pixel_limit_are_refused_by_every_decoder(tmp_path, monkeypatch):
    from cladapter_core.data.decoding import load_array
    from cladapter_core.errors import DataError
    files = _images(tmp_path / "big", 40, 30)            # 1,200 pixels
    monkeypatch.setenv("CLADAPTER_MAX_IMAGE_PIXELS", "1199")
    for name, path in files.items():
        with pytest.raises(DataError) as err:
            load_array(path)
        message = str(err.value)
        assert message.startswith(f"{path}: "), message
        assert "1,200 pixels, over the limit of 1,199 (CLADAPTER_MAX_IMAGE_PIXELS)" in message, message
        if name != "stack.tif":
            assert "40 x 30 = 1,200 pixels" in message, message
    assert "TIFF (2 planes) of 40 x 15 = 1,200 pixels" in str(
        pytest.raises(DataError, load_array, files["stack.tif"]).value)
    monkeypatch.setenv("CLADAPTER_MAX_IMAGE_PIXELS", "1200")  # at the limit: decoded
    for name, path in files.items():
        if name != "stack.tif":  # a stack is no 2D image (refused after decoding, as before)
            assert tuple(load_array(path).shape) == (3, 30, 40), name


def test_volumes_over_the_voxel_limit_are_refused_before_loading(tmp_path, monkeypatch):
    from PIL import Image

    from cladapter_core.data.decoding import load_array, load_clip
    from cladapter_core.errors import DataError
    vol = np.zeros((4, 20, 15, 3), np.uint8)               # 1,200 voxels, 3 channels
    np.save(tmp_path / "v.npy", vol)
    np.savez_compressed(tmp_path / "v.npz", volume=vol, other=np.zeros(3))
    frames = tmp_path / "clip"
    frames.mkdir()
    for t in range(4):
        Image.fromarray(vol[t]).save(frames / f"f{t}.png")
    monkeypatch.setenv("CLADAPTER_MAX_VOLUME_VOXELS", "1199")
    expected = {"v.npy": "array of shape (4, 20, 15, 3): 1,200 voxels",
                "v.npz": "array 'volume' of shape (4, 20, 15, 3): 1,200 voxels",
                "clip": "frame folder of 4 frames (read up to f3.png): 1,200 voxels"}
    for name, words in expected.items():
        for load in (load_array, lambda p: load_clip(p, frames=4)):
            with pytest.raises(DataError) as err:
                load(tmp_path / name)
            assert str(err.value).startswith(f"{tmp_path / name}: {words}, over the limit of 1,199 "
                                             "(CLADAPTER_MAX_VOLUME_VOXELS)"), str(err.value)
    monkeypatch.setenv("CLADAPTER_MAX_VOLUME_VOXELS", "1200")
    for name in expected:
        assert tuple(load_array(tmp_path / name).shape) == (3, 4, 20, 15), name
        assert tuple(load_clip(tmp_path / name, frames=2).shape) == (3, 2, 20, 15), name


def test_a_bad_limit_names_the_variable(monkeypatch):
    from pydantic import ValidationError

    from cladapter_core.settings import settings
    monkeypatch.setenv("CLADAPTER_MAX_IMAGE_PIXELS", "0")
    with pytest.raises(ValidationError, match="CLADAPTER_MAX_IMAGE_PIXELS"):
        settings()


# ------------------------------------------- integration: the bombs, in a measured child process
CHILD = """
import json, resource, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from cladapter_core.errors import DataError

def peak_kb():
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)

def refused(call):
    before = peak_kb()
    try:
        call()
    except DataError as e:
        return {"error": str(e), "grew_kb": peak_kb() - before}
    return {"error": None, "grew_kb": peak_kb() - before}

args = json.loads(sys.argv[1])
out = {}
"""


def _run_child(body: str, args: dict) -> dict:
    code = CHILD + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(out))\n"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
           "CLADAPTER_TRACKING": "0"}
    run = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                         text=True, timeout=600, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bombs")
    return {"png": png_bomb(root / "bomb.png"), "tif": tiff_bomb(root / "bomb.tif"),
            "npz": npz_bomb(root / "bomb.npz")}


def _assert_refused(result: dict, path: Path, words: str) -> None:
    assert result["error"] is not None, f"{path} was not refused"
    assert str(path) in result["error"] and words in result["error"], result["error"]
    assert result["grew_kb"] < MAX_GROWTH_KB, f"{path}: peak memory grew {result['grew_kb'] / 1024:.0f} MB"


PIXELS = f"{BOMB_SIDE:,} x {BOMB_SIDE:,} = {BOMB_SIDE ** 2:,} pixels, over the limit of 89,478,485"


def test_load_array_and_predict_refuse_the_bombs_without_their_memory(bombs, tiny_model_dirs, tmp_path):
    from PIL import Image
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(good)
    out = _run_child("""
        from cladapter_core.data.decoding import load_array
        from cladapter_core.evaluation.evaluate import predict
        model, good = args["model"], args["good"]
        load_array(good)  # decoders and the model loaded: what a process holds before a file
        predict(model, [good], Path(args["tmp"]) / "warm.csv")
        for kind, bomb in args["bombs"].items():
            out[f"load_array {kind}"] = refused(lambda: load_array(bomb))
            if kind != "npz":  # the model is 2D
                out[f"predict {kind}"] = refused(lambda: predict(model, [good, bomb], Path(args["tmp"]) / "p.csv"))
    """, {"model": str(tiny_model_dirs[0]), "good": str(good), "tmp": str(tmp_path),
          "bombs": {k: str(v) for k, v in bombs.items()}})
    for call in ("load_array", "predict"):
        _assert_refused(out[f"{call} png"], bombs["png"], f"image of {PIXELS}")
        _assert_refused(out[f"{call} tif"], bombs["tif"], f"TIFF of {PIXELS}")
    _assert_refused(out["load_array npz"], bombs["npz"], "array 'data' of shape (400, 1000, 1000): "
                    "400,000,000 voxels, over the limit of 357,913,940 (CLADAPTER_MAX_VOLUME_VOXELS)")
    assert not (tmp_path / "p.csv").exists()  # a refused batch writes nothing


def test_prepare_refuses_a_bomb_in_the_folder_without_its_memory(bombs, tmp_path):
    from PIL import Image
    source = tmp_path / "source"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (source / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(source / label / f"{i}.png")
    out = _run_child("""
        import shutil
        from cladapter_core.data import prepare
        from cladapter_core.params import load_params
        params = load_params(None)
        src, tmp = Path(args["source"]), Path(args["tmp"])
        prepare(src, tmp / "warm", params, workers=2)  # the same folder without the bomb
        shutil.copy(args["bomb"], src / "a" / "bomb.png")
        out["prepare"] = refused(lambda: prepare(src, tmp / "prepared", params, workers=2))
        out["left_behind"] = (tmp / "prepared").exists()
    """, {"source": str(source), "tmp": str(tmp_path), "bomb": str(bombs["png"])})
    _assert_refused(out["prepare"], source / "a" / "bomb.png", f"image of {PIXELS}")
    assert "1 unusable file(s)" in out["prepare"]["error"] and out["left_behind"] is False
