"""Your own data: scientific intensities reach the model normalised by their real range, and
a backbone's input size follows its pretrained configuration."""
import warnings

import numpy as np
import pytest
import tifffile
import torch

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
    model = build_model("test_vit", 3, backbone_kwargs={"img_size": 16}, input_size=16)
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
        build_model("vit_tiny_patch16_224", 3, checkpoint=str(ckpt), backbone_kwargs={"img_size": 32})
    # a random backbone at another size is allowed, and said out loud
    with pytest.warns(UserWarning, match="32x32 images.*224x224"):
        build_model("vit_tiny_patch16_224", 3, backbone_kwargs={"img_size": 32})
    # native size: fine, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_model("vit_tiny_patch16_224", 3, checkpoint=str(ckpt)).config_dict()["input_size"] == [3, 224, 224]
