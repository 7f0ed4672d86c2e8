"""The stage-1 feature cache on the real demo data (digit scans) with a tiny backbone."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cladapter_core.training import feature_cache as cache
from cladapter_core.data import ManifestDataset, build_transform, make_demo_data, prepare
from cladapter_core.errors import ParamsError
from cladapter_core.model import build_model
from cladapter_core.params import load_params, model_kwargs
from cladapter_core.training import Preempted, train
from tiny import SMALL

TINY = SMALL + [
    "model.backbone=vit_tiny_patch16_224",
    "model.backbone_kwargs={img_size: 16, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.rank=8", "model.num_centers=4", "train.batch_size=16",
    "stage1.epochs=2", "stage2.epochs=1", "train.warmup_epochs=1",
    "train.cache.views=null",  # uncached unless a test turns the cache on
]
NO_AUG = "train.augment={hflip: false, vflip: false, brightness: 0, contrast: 0, shift: 0, scale: 0, rotate: 0}"


def tiny_params(*more):
    return load_params(None, TINY + list(more))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_demo")
    make_demo_data(root / "digits")
    params = tiny_params("data.shots_per_class=12", "data.val_fraction=0.05", "data.test_fraction=0.05")
    prepare(root / "digits", root / "prepared", params)
    return root / "prepared"


@pytest.fixture(autouse=True)
def fresh_memory():
    cache.clear_memory()
    yield
    cache.clear_memory()


def weights(model_dir):
    return load_file(str(Path(model_dir) / "model.safetensors"))


def train_losses(model_dir):
    """Per-epoch training loss: shows every epoch, where the saved weights are the best epoch's."""
    return [r["train_loss"] for r in json.loads((Path(model_dir) / "history.json").read_text())]


def assert_same_weights(a, b, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), (k, (a[k] - b[k]).abs().max().item())


def frozen_model(params, seed=0):
    torch.manual_seed(seed)
    model = build_model(num_classes=10, class_names=[str(i) for i in range(10)], **model_kwargs(params))
    return model.set_stage(1)


def train_set(prepared, model, augment=None):
    tf = build_transform(model.config_dict(), augment is not None, augment)
    return ManifestDataset(prepared, "train", tf, in_chans=1)


class CountPasses:
    """Counts the images that really go through the backbone."""

    def __init__(self, model):
        self.images, orig = 0, model.backbone.forward_tokens

        def counted(x):
            self.images += len(x)
            return orig(x)
        model.backbone.forward_tokens = counted


# -- the trainer with and without the cache ------------------------------------------------------
def test_no_views_reaches_the_uncached_weights(prepared, tmp_path):
    plain = train(tiny_params(NO_AUG), prepared, tmp_path / "plain", progress=False)
    cached = train(tiny_params(NO_AUG, "train.cache.views=0", "train.cache.dtype=float32"),
                   prepared, tmp_path / "cached", progress=False)
    assert plain["cache"] is None and cached["cache"]["built"] and cached["cache"]["views"] == 0
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "cached"))
    assert train_losses(tmp_path / "cached") == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-5)
    assert cached["best_value"] == pytest.approx(plain["best_value"], abs=1e-6)


def test_views_replay_the_trainers_augmentations(prepared, tmp_path):
    # View v of image i is seeded by (seed, v, i) as epoch v of the uncached trainer is: with
    # as many views as epochs the cached run sees exactly the same augmented images.
    plain = tiny_params()
    assert plain["train"]["augment"]["rotate"] > 0
    train(plain, prepared, tmp_path / "plain", progress=False)
    train(tiny_params("train.cache.views=2", "train.cache.dtype=float32"), prepared, tmp_path / "v2",
          progress=False)
    assert_same_weights(weights(tmp_path / "plain"), weights(tmp_path / "v2"))
    plain_losses = train_losses(tmp_path / "plain")
    assert train_losses(tmp_path / "v2") == pytest.approx(plain_losses, rel=1e-5)
    # One view: epoch 2 reads view 0 again, so only epoch 1 is the uncached run's.
    train(tiny_params("train.cache.views=1", "train.cache.dtype=float32"), prepared, tmp_path / "v1",
          progress=False)
    v1_losses = train_losses(tmp_path / "v1")
    assert v1_losses[0] == pytest.approx(plain_losses[0], rel=1e-5)
    assert v1_losses[1] != pytest.approx(plain_losses[1], rel=1e-3)


def test_k_search_reuses_one_cache_and_stage2_does_not_use_it(prepared, tmp_path):
    s1 = train(tiny_params("train.cache.views=0"), prepared, tmp_path / "k4", progress=False)
    builds = cache.STATS["builds"]
    s2 = train(tiny_params("train.cache.views=0", "model.num_centers=2"), prepared, tmp_path / "k2",
               progress=False)
    assert s1["cache"]["built"] and not s2["cache"]["built"]
    assert s2["cache"]["train_key"] == s1["cache"]["train_key"] and cache.STATS["builds"] == builds
    st2 = train(tiny_params("train.cache.views=0"), prepared, tmp_path / "s2", stage=2,
                init_from=tmp_path / "k4", progress=False)
    assert st2["cache"] is None  # the backbone trains in stage 2: nothing to cache
    lin = train(tiny_params("train.cache.views=0"), prepared, tmp_path / "lin", mode="linear", progress=False)
    assert lin["cache"]["built"] and lin["cache"]["train_key"] != s1["cache"]["train_key"]  # pooled, not tokens


def test_resume_mid_epoch_with_the_cache(prepared, tmp_path):
    params = tiny_params("train.cache.views=2", "model.dropout=0.1", f"train.cache.dir={tmp_path / 'c'}",
                         "train.cache.storage=disk")
    train(params, prepared, tmp_path / "ref", progress=False)
    with pytest.raises(Preempted):
        train(params, prepared, tmp_path / "run", progress=False, max_steps=11)
    cache.clear_memory()
    s = train(params, prepared, tmp_path / "run", progress=False)
    assert not s["cache"]["built"]  # read back from disk
    ref, got = weights(tmp_path / "ref"), weights(tmp_path / "run")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# -- the key -------------------------------------------------------------------------------------
def test_key_follows_weights_data_and_transforms(prepared, tmp_path):
    params = tiny_params()
    model = frozen_model(params)
    passes = CountPasses(model)
    ds = train_set(prepared, model)
    n = len(ds)
    first = cache.get_features(model, ds)
    # n images, and one more that probes the feature shape for the size estimate
    assert first.built and passes.images == n + 1 and first.features.shape[:2] == (1, n)

    again = cache.get_features(model, train_set(prepared, model))
    assert not again.built and again.key == first.key and passes.images == n + 1
    assert torch.equal(again.features, first.features)

    # Another K: the adapter is not part of the key, the backbone is the same.
    other_k = frozen_model(tiny_params("model.num_centers=2"))
    assert cache.get_features(other_k, train_set(prepared, other_k)).key == first.key

    # Any backbone weight changes the key.
    with torch.no_grad():
        next(model.backbone.parameters()).view(-1)[0] += 1e-3
    changed = cache.get_features(model, ds)
    assert changed.built and changed.key != first.key and passes.images == 2 * (n + 1)

    # The data: one file rewritten with other pixels.
    src, label = ds.items[0]
    copy = tmp_path / "img.png"
    Image.open(src).save(copy)
    ds.items[0] = (copy, label)
    k_copy = cache.get_features(model, ds).key
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(copy)
    assert cache.get_features(model, ds).key != k_copy

    # Transforms: augmentation settings matter only when views are augmented.
    aug = dict(params["train"]["augment"])
    ds_a = train_set(prepared, model, aug)
    ds_b = train_set(prepared, model, {**aug, "rotate": 5})
    assert cache.cache_key(model, ds_a, 2, 0, "float16") != cache.cache_key(model, ds_b, 2, 0, "float16")
    assert cache.cache_key(model, ds_a, 2, 0, "float16") != cache.cache_key(model, ds_a, 2, 1, "float16")
    assert cache.cache_key(model, ds_a, 2, 0, "float16") != cache.cache_key(model, ds_a, 3, 0, "float16")
    plain = train_set(prepared, model)
    assert cache.cache_key(model, plain, 0, 0, "float16") == cache.cache_key(model, plain, 0, 5, "float16")


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_each_mode_reads_its_own_backbone_output(prepared, tmp_path, storage):
    """linear and linear-mean store different features of the same frozen backbone (its
    own pooling, the mean of its tokens): neither may be served the other's cache."""
    features = {}
    for mode in ("linear", "linear-mean", "cla"):
        model = frozen_model(tiny_params(f"train.mode={mode}"))
        got = cache.get_features(model, train_set(prepared, model), storage=storage, cache_dir=tmp_path)
        assert got.built, f"{mode} was served another mode's cache"
        x = torch.stack([train_set(prepared, model)[i][0] for i in range(4)])
        with torch.no_grad():
            want = model.backbone_output(x)
        assert torch.allclose(got.batch(range(4))[0], want.float(), atol=2e-2), mode
        features[mode] = got
    assert len({f.key for f in features.values()}) == 3


def test_disk_and_memory_agree_float16_stores_close_values(prepared, tmp_path):
    model = frozen_model(tiny_params())
    ds = train_set(prepared, model)
    mem = cache.get_features(model, ds, dtype="float32")
    disk = cache.get_features(model, ds, dtype="float32", storage="disk", cache_dir=tmp_path)
    assert isinstance(disk.features, np.memmap) and (disk.path / "meta.json").is_file()
    assert np.array_equal(disk.features, mem.features.numpy())
    idx = [5, 0, 17, 3]
    xm, ym = mem.batch(idx)
    xd, yd = disk.batch(idx)
    assert torch.equal(xm, xd) and torch.equal(ym, yd)
    assert ym.tolist() == [ds.targets[i] for i in idx]
    # No half-written folders left; a new process (here: a cleared memory store) reuses it.
    assert [p.name for p in tmp_path.iterdir()] == [disk.key]
    cache.clear_memory()
    passes = CountPasses(model)
    again = cache.get_features(model, ds, dtype="float32", storage="disk", cache_dir=tmp_path)
    assert not again.built and passes.images == 0

    half = cache.get_features(model, ds, dtype="float16")
    assert half.features.dtype == torch.float16 and half.key != mem.key
    assert half.nbytes * 2 == mem.nbytes
    x16, _ = half.batch(idx)
    assert x16.dtype == torch.float32
    assert torch.allclose(x16, xm, rtol=2e-3, atol=2e-3)


def test_views_are_deterministic_and_distinct(prepared, tmp_path):
    params = tiny_params()
    model = frozen_model(params)
    ds = train_set(prepared, model, params["train"]["augment"])
    a = cache.get_features(model, ds, views=3, seed=7, dtype="float32")
    cache.clear_memory()
    b = cache.get_features(model, ds, views=3, seed=7, dtype="float32")
    assert b.built and torch.equal(a.features, b.features) and a.features.shape[0] == 3
    assert not torch.allclose(a.features[0], a.features[1])
    loader = cache.CachedTrainLoader(a, sampler=[[0, 1], [2]])
    loader.epoch = 4  # epoch 4 reads view 4 mod 3 = 1
    (x, _), (x2, _) = list(loader)
    assert torch.equal(x, a.features[1][[0, 1]]) and torch.equal(x2, a.features[1][[2]])
    # A cache of 3 views serves a request for 2 (view v is the same in both, as a 2-view
    # cache built alone shows): no pass, a read cost of 2/3 of its build; another seed is
    # another cache.
    two = cache.get_features(model, ds, views=2, seed=7, dtype="float32")
    assert not two.built and two.views == 2 and two.stored_views == 3
    assert torch.equal(two.features, b.features[:2])
    fresh = cache.get_features(model, ds, views=2, seed=7, dtype="float32", storage="disk",
                               cache_dir=tmp_path)
    assert fresh.built and torch.equal(torch.from_numpy(fresh.features[:].copy()), two.features)  # built alone
    assert two.read_cost() == pytest.approx(b.seconds * 2 / 3)
    assert cache.get_features(model, ds, views=2, seed=8, dtype="float32").built


def test_refuses_an_unfrozen_backbone_and_bad_settings(prepared):
    model = frozen_model(tiny_params()).set_stage(2)
    with pytest.raises(cache.CacheError, match="frozen backbone"):
        cache.get_features(model, train_set(prepared, model))
    big = frozen_model(tiny_params())
    with torch.no_grad():
        big.backbone.model.norm.weight.mul_(1e6)  # tokens far beyond float16's 65504
    with pytest.raises(cache.CacheError, match="use float32"):
        cache.get_features(big, train_set(prepared, big), dtype="float16")
    assert cache.get_features(big, train_set(prepared, big), dtype="float32").built
    with pytest.raises(ParamsError, match="train.cache.views"):
        load_params(None, ["train.cache.views=-1"])
    with pytest.raises(ParamsError, match="train.cache.storage"):
        load_params(None, ["train.cache.storage=s3"])
    with pytest.raises(ParamsError, match="train.cache.dtype"):
        load_params(None, ["train.cache.dtype=bfloat16"])
