"""Your own data: scientific intensities reach the model normalised by their real range, and
a backbone's input size follows its pretrained configuration."""
import warnings

import numpy as np
import pytest
import tifffile
import torch
from helpers import BIN, REPO

from cladapter_core import build_model
from cladapter_core.data import ManifestDataset, build_transform, intensity_range, prepare
from cladapter_core.errors import ModelError
from cladapter_core.params import load_params


def _tiffs(root, dtype, values, n=6):
    rng = np.random.default_rng(0)
    for c, (lo, hi) in zip(("a", "b", "c"), values):
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.uniform(lo, hi, (16, 16)).astype(dtype)
            tifffile.imwrite(root / c / f"{i}.tif", arr)


@pytest.mark.parametrize("dtype,values,mode,expect", [
    (np.uint16, [(0, 1000), (1000, 3000), (3000, 4095)], "auto", [0.0, 4095.0]),   # 12-bit camera
    (np.uint16, [(0, 5000), (5000, 9000), (9000, 16383)], "auto", [0.0, 16383.0]),  # 14-bit
    (np.float32, [(-3, 0), (0, 40), (40, 120)], "auto", None),                      # floats: range
    (np.uint16, [(0, 1000), (1000, 3000), (3000, 4095)], "type", None),             # the old way
])
def test_intensities_are_normalised_by_the_real_range(tmp_path, dtype, values, mode, expect):
    _tiffs(tmp_path / "src", dtype, values)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = prepare(tmp_path / "src", tmp_path / "prep", load_params(None, [f"data.intensity={mode}"]))
    info = summary["intensity"]
    rng = intensity_range(tmp_path / "prep")
    if dtype == np.float32:
        assert rng == [pytest.approx(info["min"]), pytest.approx(info["max"])] and info["min"] < -2
    else:
        assert rng == expect
        assert info["bits"] == (12 if values[-1][1] == 4095 else 14)
        assert any("of their uint16 range" in str(w.message) for w in caught)  # says so
    # the tensors a model gets: [0, 1] over the real range (not ~6 % of it), also after decode
    model = build_model("test_vit", 3, backbone_kwargs={"img_size": 16}, input_size=16, pretrained=False)
    model.intensity = rng
    ds = ManifestDataset(tmp_path / "prep", None, build_transform(model.config_dict(), False), in_chans=3)
    raw = torch.stack([ds[i][0] for i in range(len(ds))])
    std = torch.tensor(model.config_dict()["std"]).view(1, 3, 1, 1)
    mean = torch.tensor(model.config_dict()["mean"]).view(1, 3, 1, 1)
    unit = raw * std + mean  # undo the normalisation: what the decoder gave
    if mode == "type":
        assert unit.max() < 0.07  # 12-bit data divided by 65535: nearly black
    else:
        assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5 and unit.max() > 0.95 and unit.min() < 0.05


def test_a_leftover_input_size_is_refused_with_pretrained_weights(tmp_path):
    from safetensors.torch import save_file
    import timm
    ckpt = tmp_path / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), str(ckpt))
    # the demo's 32 px left in backbone_kwargs after changing only model.backbone
    with pytest.raises(ModelError, match=r"32x32 images.*pretrained configuration is 224x224.*model.input_size"):
        build_model("vit_tiny_patch16_224", 3, weights=str(ckpt), backbone_kwargs={"img_size": 32}, pretrained=False)
    # a random backbone at another size is allowed, and said out loud
    with pytest.warns(UserWarning, match="32x32 images.*224x224"):
        build_model("vit_tiny_patch16_224", 3, backbone_kwargs={"img_size": 32}, pretrained=False)
    # native size: fine, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_model("vit_tiny_patch16_224", 3, weights=str(ckpt), pretrained=False).config_dict()["input_size"] == [3, 224, 224]


# -- the whole story, as a scientist runs it ---------------------------------------------------
def test_from_a_folder_of_12_bit_tiffs_to_a_served_champion(tmp_path_factory):
    """init -> dvc repro -> promote -> predict from models:/...@champion, on 3 classes of
    12-bit microscope-like TIFFs; their intensities reach the model over [0, 1]."""
    import csv
    import json
    import os
    import shutil
    import subprocess

    repo, binp = REPO, BIN
    root = tmp_path_factory.mktemp("story") / "repo"
    for f in filter(None, subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True,
                                         check=True).stdout.decode().split("\0")):
        if (repo / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, root / f)
    env = {**os.environ, "PATH": f"{binp}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root.parent / 'mlflow.db'}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e.org"}
    env.pop("CLADAPTER_PIPELINE_ID", None)

    def run(*cmd):
        proc = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{(proc.stdout + proc.stderr)[-5000:]}"
        return proc.stdout + proc.stderr

    run("git", "init", "-q", "-b", "main")
    rng = np.random.default_rng(1)
    for c, level in (("healthy", 600), ("inflamed", 2000), ("necrotic", 3600)):  # 12-bit signal
        (root / "data" / "cells" / c).mkdir(parents=True)
        for i in range(12):
            img = np.clip(rng.normal(level, 300, (24, 24)), 0, 4095).astype(np.uint16)
            tifffile.imwrite(root / "data" / "cells" / c / f"{i:02d}.tif", img)
    out = run("cladapter", "init", "--source", "data/cells", "--backbone", "test_vit", "--no-pretrained",
              "--stage-epochs", "2", "1", "--force")
    assert "12-bit" in out and "3 classes" in out
    run("git", "add", "-A")
    run("git", "commit", "-qm", "my data")
    run("dvc", "repro")
    run("cladapter", "promote", "--prepared", "outputs/prepared")
    shown = subprocess.run(["dvc", "plots", "show", "--json"], cwd=root, env=env, capture_output=True,
                           text=True, check=True)
    plots = json.loads(shown.stdout)
    assert not [e for e in plots.get("errors", []) if e["name"] == "confusion matrix"]
    assert plots["data"]["confusion matrix"][0]["type"] == "vega"  # drawn from plots/confusion.csv
    summary = json.loads((root / "outputs" / "prepared" / "summary.json").read_text())
    assert summary["intensity"]["bits"] == 12 and summary["intensity"]["range"] == [0.0, 4095.0]

    files = sorted(str(p.relative_to(root)) for p in (root / "data" / "cells").rglob("*.tif"))[:6]
    run("cladapter", "predict", "--model", "models:/cells-cladapter@champion", *files, "--out", "reg.csv")
    run("cladapter", "predict", "--model", "outputs/stage2", *files, "--out", "dir.csv")
    reg, local = (list(csv.DictReader(open(root / n))) for n in ("reg.csv", "dir.csv"))
    assert [r["predicted"] for r in reg] == [r["predicted"] for r in local]
    for a, b in zip(reg, local):
        for k in a:
            if k.startswith("prob_"):
                assert abs(float(a[k]) - float(b[k])) < 1e-5

    # the model got the images over [0, 1] of their real 12-bit range, not 6 % of 16 bits
    from cladapter_core import load_model
    model = load_model(root / "outputs" / "stage2")
    cfg = model.config_dict()
    assert cfg["intensity"] == [0.0, 4095.0]
    ds = ManifestDataset(root / "outputs" / "prepared", "train", build_transform(cfg, False), in_chans=3)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    unit = x * torch.tensor(cfg["std"]).view(1, 3, 1, 1) + torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    per_class = {ds.classes[label]: unit[[i for i, t in enumerate(ds.targets) if t == label]].mean().item()
                 for label in set(ds.targets)}
    assert per_class["healthy"] == pytest.approx(600 / 4095, abs=0.03)
    assert per_class["necrotic"] == pytest.approx(3600 / 4095, abs=0.03)
