"""3D at scale: 1,000 clips through prepare, both training stages and evaluation with a
small video backbone (torchvision mc3_18 on 4 frames of 16 px), the loader reading only the
frames the model takes from each clip."""
from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cladapter_core.data import ManifestDataset, build_transform, load_array, prepare
from cladapter_core.data.decoding import frame_indices, load_clip
from cladapter_core.evaluation.evaluate import evaluate
from cladapter_core.params import load_params
from cladapter_core.training import train
from tiny import SMALL

CLIPS, CLASSES, FRAMES, SIZE = 1000, 4, 6, 16
MODEL_3D = {"input_size": [3, 4, 16, 16], "mean": [0.45], "std": [0.225], "is_3d": True}


def moving_bars(root: Path) -> Path:
    """CLIPS grey clips (T, H, W) uint8: a bar moving left, right, up or down (the class)."""
    rng = np.random.RandomState(0)
    for i in range(CLIPS):
        c = i % CLASSES
        clip = rng.randint(0, 40, size=(FRAMES, SIZE, SIZE)).astype(np.uint8)
        start = rng.randint(0, SIZE - FRAMES)
        for t in range(FRAMES):
            pos = start + t if c in (0, 2) else start + FRAMES - 1 - t
            if c < 2:
                clip[t, :, pos] = 255
            else:
                clip[t, pos, :] = 255
        folder = root / f"dir{c}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"clip{i:04d}.npy", clip)
    return root


def test_a_thousand_clips_prepare_train_both_stages_and_evaluate(tmp_path):
    t0 = time.time()
    params = load_params(None, SMALL + [
        "model.backbone=mc3_18", "model.backbone_kwargs={}", "model.input_size=[4, 16, 16]",
        "model.rank=8", "model.num_centers=4", "train.batch_size=64", "train.lr=0.001",
        "stage1.epochs=1", "stage2.epochs=1", "train.warmup_epochs=0", "train.cache.views=null",
        "train.augment={hflip: false, vflip: false, brightness: 0, contrast: 0, shift: 0, scale: 0, rotate: 0}"])
    summary = prepare(moving_bars(tmp_path / "clips"), tmp_path / "prepared", params)
    assert summary["is_3d"] and sum(summary["totals"].values()) == CLIPS
    assert summary["size_min"] == summary["size_max"] == [FRAMES, SIZE, SIZE]
    s1 = train(params, tmp_path / "prepared", tmp_path / "s1", stage=1, progress=False)
    s2 = train(params, tmp_path / "prepared", tmp_path / "s2", stage=2, init_from=tmp_path / "s1", progress=False)
    assert (s1["epochs_run"], s2["epochs_run"]) == (1, 1)
    metrics = evaluate(tmp_path / "s2", tmp_path / "prepared", tmp_path / "eval", params)
    report = json.loads((tmp_path / "eval" / "classification_report.json").read_text())
    assert report["macro avg"]["support"] == summary["totals"]["test"] > 0  # every test clip scored
    assert metrics["accuracy"] == pytest.approx(report["accuracy"])
    assert metrics["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    cfg = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert cfg["is_3d"] and cfg["input_size"] == [3, 4, 16, 16]
    print(f"1,000 clips: prepare, stage 1, stage 2, evaluate in {time.time() - t0:.0f} s")


def test_clips_are_read_lazily_and_give_the_same_numbers(tmp_path):
    rng = np.random.RandomState(3)
    long = rng.randint(0, 256, size=(300, 64, 64, 3)).astype(np.uint8)  # 3.7 MB, 14.7 MB as float
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "long.npy", long)
    np.save(tmp_path / "a" / "planar.npy", np.moveaxis(long[:20], -1, 0))  # (C, T, H, W)
    np.save(tmp_path / "a" / "float.npy", long[:20].astype(np.float32) * 3.0)  # scaled by its range
    for t in range(7):
        (tmp_path / "a" / "frames").mkdir(exist_ok=True)
        Image.fromarray(long[t]).save(tmp_path / "a" / "frames" / f"f{t}.png")
    transform = build_transform(MODEL_3D, train=False)
    for name in ("long.npy", "planar.npy", "float.npy", "frames"):
        path = tmp_path / "a" / name
        full = load_array(path)
        lazy = load_clip(path, 3, frames=4)
        assert lazy.shape[1] == 4
        assert torch.equal(lazy, full[:, frame_indices(full.shape[1], 4)]), name
        assert torch.equal(transform(lazy), transform(full)), name

    tracemalloc.start()
    load_clip(tmp_path / "a" / "long.npy", 3, frames=4)
    lazy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    load_array(tmp_path / "a" / "long.npy")
    full_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert lazy_peak < 1 << 20 < 10 << 20 < full_peak  # 4 frames read, not 300

    # the dataset the trainer and the evaluation use reads clips this way
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / "x.npy", long)
    ds = ManifestDataset.__new__(ManifestDataset)
    ds.items, ds.transform, ds.in_chans = [(tmp_path / "b" / "x.npy", 0)], transform, 3
    tracemalloc.start()
    x, _ = ds[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert x.shape == (3, 4, 16, 16) and peak < 1 << 20
