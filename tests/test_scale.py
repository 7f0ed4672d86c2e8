"""Scale: prepare's decoding processes and fast decoders, `train.num_workers: auto`, and the
loader's persistent workers. Real files, real processes, the real trainer."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import tree_digest
from safetensors.torch import load_file

from cladapter_core.data import decoding, files, images, prepare
from cladapter_core.data.workers import _cgroup_quota, available_cores, loader_workers, prepare_workers
from cladapter_core.errors import DataError
from cladapter_core.params import load_params
from cladapter_core.training import Preempted, train
from tiny import tiny_params


def image_variants(root: Path) -> dict[str, Path]:
    """JPEG and PNG files of every kind prepare meets: the fast decoder's and PIL's."""
    rng = np.random.RandomState(0)
    rgb = (rng.rand(21, 34, 3) * 255).astype(np.uint8)
    files = {}

    def save(name, img, **kw):
        files[name] = root / name
        img.save(files[name], **kw)

    root.mkdir(parents=True, exist_ok=True)
    save("rgb.jpg", Image.fromarray(rgb), quality=90)
    save("progressive.jpg", Image.fromarray(rgb), progressive=True)
    save("grey.jpg", Image.fromarray(rgb[..., 0]))
    save("cmyk.jpg", Image.fromarray(rgb).convert("CMYK"))
    for o in (3, 6, 8):  # EXIF orientation: rotated as PIL's exif_transpose does
        img = Image.fromarray(rgb)
        exif = img.getexif()
        exif[0x0112] = o
        save(f"orient{o}.jpg", img, exif=exif.tobytes())
        save(f"orient{o}.png", img, exif=exif.tobytes())
    save("rgb.png", Image.fromarray(rgb))
    save("rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))
    save("grey_alpha.png", Image.fromarray(rgb[..., 0]).convert("LA"))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    save("palette_transparent.png", Image.fromarray(rgb).convert("P"), transparency=3)
    save("one_bit.png", Image.fromarray(rgb[..., 0] > 128))
    save("grey16.png", Image.fromarray((rng.rand(9, 7) * 65535).astype(np.uint16)))
    save("rgb_transparent.png", Image.fromarray(rgb), transparency=(1, 2, 3))
    return files


FAST = {"rgb.jpg", "progressive.jpg", "grey.jpg", "orient3.jpg", "orient6.jpg", "orient8.jpg",
        "rgb.png", "rgba.png", "grey_alpha.png", "grey16.png"}


def test_fast_decoder_gives_pils_pixels_and_leaves_the_rest_to_pil(tmp_path):
    for name, path in image_variants(tmp_path).items():
        pil = images._channels_last_2d(images._decode_pil(path))
        fast = images._decode_fast(path)
        assert (fast is not None) == (name in FAST), name
        if fast is not None:
            assert fast.dtype == pil.dtype and np.array_equal(fast, pil), name
        got = decoding.decode(path)
        assert got.dtype == pil.dtype and np.array_equal(got, pil), name
    # corrupt and truncated files: PIL's error, as before
    good = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    assert images._decode_fast(tmp_path / "truncated.jpg") is None
    with pytest.raises(files.DecodeError, match="truncated"):
        decoding.decode(tmp_path / "truncated.jpg")


def test_pixel_hash_is_the_hash_of_the_bytes():
    arr = np.arange(24, dtype=np.uint16).reshape(2, 4, 3)
    want = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}|".encode() + arr.tobytes()).hexdigest()
    assert images.pixel_hash(arr) == want
    assert images.pixel_hash(arr[:, ::-1]) == images.pixel_hash(np.ascontiguousarray(arr[:, ::-1]))


def jpeg_tree(root: Path, n: int, broken: bool = False) -> Path:
    rng = np.random.RandomState(1)
    for i in range(n):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.rand(12, 10, 3) * 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg")
    if broken:
        (root / "c0" / "empty.jpg").write_bytes(b"")
        (root / "c1" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
        (root / "c2" / "truncated.jpg").write_bytes((root / "c2" / "0002.jpg").read_bytes()[:80])
    return root


def test_prepare_outputs_and_errors_do_not_depend_on_the_processes(tmp_path, caplog):
    src = jpeg_tree(tmp_path / "src", 90)
    for extra in ([], ["data.resize=8"]):
        params = load_params(None, extra)
        digests = set()
        for workers in (1, 2, 3):
            out = tmp_path / f"out{len(extra)}-{workers}"
            with caplog.at_level(logging.INFO, logger="cladapter_core.data.prepare"):
                prepare(src, out, params, workers=workers)
            digests.add(tree_digest(out))
        assert len(digests) == 1, extra
    assert "files/s, 3 processes" in caplog.text  # what the progress bar ends with, in the log

    jpeg_tree(tmp_path / "src", 0, broken=True)
    messages = set()
    for workers in (1, 2):
        with pytest.raises(DataError) as err:
            prepare(src, tmp_path / "bad", load_params(None, []), workers=workers)
        messages.add(str(err.value))
    assert len(messages) == 1
    msg = messages.pop()
    assert "3 unusable file(s)" in msg and "empty file (0 bytes)" in msg and "truncated" in msg
    assert not (tmp_path / "bad").exists()


def test_cores_and_worker_counts(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert _cgroup_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_quota(tmp_path) == 4.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_quota(tmp_path) is None

    cores = available_cores()
    assert 1 <= cores <= len(__import__("os").sched_getaffinity(0))
    assert loader_workers(3, "cuda") == 3 and loader_workers(0, "cpu") == 0
    gpu = loader_workers("auto", "cuda", local_world=1)
    assert gpu == max(1, min(8, cores - 1))
    assert loader_workers("auto", "cuda", local_world=cores * 2) == 1  # never 0 on a GPU
    assert loader_workers("auto", "cpu", local_world=1) == (0 if cores < 8 else min(4, cores // 4))
    assert prepare_workers(100) == 1 and prepare_workers(100, 3) == 3
    assert 1 <= prepare_workers(100_000) <= min(16, cores)


def test_num_workers_is_a_count_or_auto():
    assert load_params(None, [])["train"]["num_workers"] == "auto"
    assert load_params(None, ["train.num_workers=3"])["train"]["num_workers"] == 3
    from cladapter_core.errors import ParamsError
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(ParamsError, match=r'train.num_workers: must be "auto" or an integer >= 0'):
            load_params(None, [f"train.num_workers={bad}"])


def test_persistent_workers_train_and_resume_as_one_process(prepared, tmp_path):
    """Two persistent loader workers, augmentation on, stopped mid-epoch and resumed: the
    weights of the in-process loader, bit for bit (the epoch travels with each index)."""
    params = tiny_params("model.dropout=0.1", "train.num_workers=0")
    train(params, prepared, tmp_path / "ref", stage=1, progress=False)
    with_workers = tiny_params("model.dropout=0.1", "train.num_workers=2")
    with pytest.raises(Preempted):
        train(with_workers, prepared, tmp_path / "run", stage=1, progress=False, max_steps=11)
    train(with_workers, prepared, tmp_path / "run", stage=1, progress=False)
    ref, got = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    h_ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    h_got = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["val_loss"] for r in h_ref] == [r["val_loss"] for r in h_got]
    assert h_ref[0]["train_loss"] == h_got[0]["train_loss"]  # (epoch 2's counts the resumed part only)


def test_device_decoding_gives_the_workers_batches(tmp_path):
    """The train.gpu_decode path run on the CPU (libjpeg-turbo where a GPU would use
    nvjpeg): plain JPEGs decoded in the training process in batches, EXIF JPEGs and PNGs in
    the workers, every item augmented with its own seed: the batches of the usual loader,
    bit for bit, over two epochs, with and without workers."""
    from cladapter_core.data import ManifestDataset, build_transform, epoch_loader
    from cladapter_core.data.device_decode import DeviceDecodeLoader
    from cladapter_core.data.datasets import loader_options
    from cladapter_core.data.seeding import EpochBatchSampler, SeededDataset
    rng = np.random.RandomState(5)
    for i in range(24):
        folder = tmp_path / "src" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((rng.rand(20, 18, 3) * 255).astype(np.uint8))
        if i % 4 == 0:
            img.save(folder / f"{i}.png")
        elif i % 4 == 1:
            exif = img.getexif()
            exif[0x0112] = 6
            img.save(folder / f"{i}.jpg", exif=exif.tobytes())
        elif i % 4 == 2:
            img.convert("L").save(folder / f"{i}.jpg")
        else:
            img.save(folder / f"{i}.jpg", quality=85)
    params = load_params(None, ["data.val_fraction=0.1", "data.test_fraction=0.1"])
    prepare(tmp_path / "src", tmp_path / "prepared", params)
    config = {"input_size": [3, 16, 16], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    augment = {"hflip": True, "brightness": 0.1, "contrast": 0.1, "shift": 0.1, "scale": 0.1, "rotate": 15}

    def batches(device_path: bool, workers: int):
        seeded = SeededDataset(ManifestDataset(tmp_path / "prepared", "train", build_transform(config, True, augment)), 7)
        sampler = EpochBatchSampler(len(seeded), 5, 7)
        loader = (DeviceDecodeLoader(seeded, sampler, loader_options(workers, "cpu"), "cpu", 7) if device_path
                  else epoch_loader(seeded, sampler, workers, "cpu", 7))
        out = []
        for sampler.epoch in range(2):
            out += [(x.clone(), y.clone()) for x, y in loader]
        return out

    want = batches(False, 0)
    for workers in (0, 2):
        got = batches(True, workers)
        assert len(got) == len(want)
        for (xa, ya), (xb, yb) in zip(want, got):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    config["intensity"] = [10, 200]  # a dataset's range (data.intensity), mapped to [0, 1] alike
    for (xa, _), (xb, _) in zip(batches(False, 0), batches(True, 0)):
        assert torch.equal(xa, xb)
    del config["intensity"]
    assert not torch.equal(want[0][0], want[len(want) // 2][0])  # epoch 2 augments anew
    # the switch (CLADAPTER_GPU_DECODE=1) takes this path on a CUDA device only
    seeded = SeededDataset(ManifestDataset(tmp_path / "prepared", "train", build_transform(config, True, augment)), 7)
    sampler = EpochBatchSampler(len(seeded), 5, 7)
    assert isinstance(epoch_loader(seeded, sampler, 0, "cpu", 7, decode_on_device=True), torch.utils.data.DataLoader)


def test_intensity_percentiles_by_counts_are_numpys_bit_for_bit():
    """prepare's per-file intensity statistics take their order statistics from a histogram
    (a partition of every file's sample cost more than decoding it): the same numbers."""
    from cladapter_core.data.intensity import PERCENTILES, _percentiles_by_counts, file_stats
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 199, 200, 201, 1000, 65537):
        for dtype, top in ((np.uint8, 255), (np.uint8, 3), (np.uint16, 4095), (np.uint16, 65535)):
            x = rng.integers(0, top + 1, n).astype(dtype)
            for sample in (x, np.full_like(x, x[0])):
                want = np.percentile(sample, PERCENTILES)
                got = _percentiles_by_counts(sample, PERCENTILES)
                assert got.dtype == want.dtype and np.array_equal(got, want), (n, dtype, top)
    img = rng.integers(0, 4096, (64, 48)).astype(np.uint16)
    stats = file_stats(img)
    assert [stats["p_lo"], stats["p_hi"]] == np.percentile(img.reshape(-1), PERCENTILES).tolist()
    # min and max are of every pixel, also where the sample holds the type's extremes
    # (the full pass is skipped then) and where the one extreme pixel is outside the sample
    for dtype in (np.uint8, np.uint16):
        top = np.iinfo(dtype).max
        for low, high in ((0, top), (3, top), (0, 200), (7, 9)):
            big = rng.integers(low + 1, high, (300, 301)).astype(dtype)  # 4096-pixel sample: every 22nd
            big.reshape(-1)[1], big.reshape(-1)[-2] = low, high  # outside the sample
            stats = file_stats(big)
            assert (stats["min"], stats["max"]) == (low, high), (dtype, low, high)
            big.reshape(-1)[::22] = high  # now the sample holds the largest value
            big.reshape(-1)[0] = low
            stats = file_stats(big)
            assert (stats["min"], stats["max"]) == (low, high), (dtype, low, high)
    assert file_stats(np.array([[True, False]]))["max"] == 1.0
