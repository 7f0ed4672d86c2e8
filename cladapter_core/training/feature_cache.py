"""Stage-1 feature cache: the frozen backbone's output, computed once per image and view.

In stage 1 (and in `linear` mode) the backbone is frozen: eval mode, no gradient. What it
gives for one image under one augmentation therefore never changes between epochs. The
cache stores `model.backbone_output(x)` (tokens in `cla` mode, the pooled feature
otherwise) for every image and view, and training runs `model.head_features` on it, so
20 epochs cost one backbone pass per view instead of twenty.

Views (`train.cache.views`):
- 0: no augmentation; one copy per image through the eval transform (resize, normalise).
- V > 0: V augmented copies. View v of image i is the train transform seeded by
  (seed, v, i), exactly as epoch v of the uncached trainer seeds it, and epoch e reads
  view e mod V. With V >= the number of epochs a cached run sees the same images as an
  uncached one.

Key: a hash of the backbone (name, options, every weight and buffer), what is stored (tokens,
their mean for `linear-mean`, the backbone's own pooling), the data (the
split's files by the sha256 that prepare recorded in manifest.csv, with their paths and
labels), the transform (size, normalisation, every augmentation setting), the views, the
seed, the storage dtype, the device type and the autocast dtype, plus torch/torchvision
versions. Any change gives a new key and a recomputation; the adapter and head are not in
it, so a search over K reuses one cache.

Default: off (`views: null`): final training draws fresh augmentation every epoch, as the
reference does. Turn it on with `views` >= the stage's epochs to see the same images as
uncached (a warning says when fewer views are reused across epochs). Before building, the
cache's size is estimated, and a cache that would not fit in memory (or on disk) is a
clear error instead of a crash.

Storage (`train.cache.storage`):
- `memory`: a CPU tensor, also kept in a small per-process store so that further
  training calls in the same process (tune trials, compare runs) reuse it.
- `disk`: `<train.cache.dir>/<key>/features.npy`, opened memory-mapped; any later process
  reuses it. Written to a temp dir and renamed, so a killed build leaves no half cache.
  Nothing is ever evicted: delete the folder to reclaim the space.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.seeding import SeededDataset  # the trainer's per-item seeding, so views match epochs
from ..errors import CacheError
from .cache_keys import cache_key, cache_keys, weights_digest  # noqa: F401 (cache_key, weights_digest: re-exported)
from ..outputs import default_mode

__all__ = ["FeatureCache", "CachedTrainLoader", "CachedEvalLoader", "cache_key", "check_fits", "get_features", "stage1_cache", "clear_memory",
           "weights_digest", "STATS"]

DTYPES = {"float16": torch.float16, "float32": torch.float32}
STORAGES = ("memory", "disk")
MEMORY_SHARE = 0.5  # a memory cache may take at most this share of the available memory
MEMORY_ENTRIES = 8  # per-process store: a train and a val cache of four configurations (compare: three outputs)

# Backbone passes and cache hits of this process (benchmarks and tests read them).
STATS = {"builds": 0, "hits": 0, "images_encoded": 0}
_MEMORY: "OrderedDict[str, FeatureCache]" = OrderedDict()


def clear_memory() -> None:
    """Drop every cache held by this process."""
    _MEMORY.clear()


# -- the cache -----------------------------------------------------------------------------
class FeatureCache:
    """Stored backbone outputs: `features` (stored views, images, *feature shape) as a
    tensor (memory) or a read-only memory-mapped array (disk), and `labels` (images,)."""

    def __init__(self, key: str, features, labels: torch.Tensor, views: int,
                 path: Path | None = None, built: bool = False, seconds: float = 0.0,
                 base: str = "", stored_views: int | None = None):
        self.key, self.features, self.labels, self.views = key, features, labels, views
        self.path, self.built, self.seconds = path, built, seconds  # seconds: the build of all stored views
        self.base = base  # the key without the views (views > 0): what a larger cache may serve
        self.stored_views = views if stored_views is None else stored_views

    def serving(self, key: str, views: int) -> "FeatureCache":
        """This stored cache, read as one of `views` <= its views (not built by this call)."""
        return FeatureCache(key, self.features[:max(views, 1)], self.labels, views, built=False,
                            seconds=self.seconds, base=self.base, stored_views=self.stored_views)

    def read_cost(self, epochs: int | None = None) -> float:
        """The build seconds of what a reader uses: the build time times the share of the
        stored views it reads (one per epoch, at most its `views`), whoever built them."""
        read = min(self.views, epochs) if epochs and self.views else self.views
        return self.seconds * max(read, 1) / max(self.stored_views, 1)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes)

    def view_of_epoch(self, epoch: int) -> int:
        return epoch % self.views if self.views else 0

    def batch(self, indices, view: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 features, labels) of the images `indices` in view `view`."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if isinstance(self.features, torch.Tensor):
            x = self.features[view][torch.from_numpy(idx)]
        else:  # memmap: fancy indexing reads just these rows into a fresh array
            x = torch.from_numpy(np.ascontiguousarray(self.features[view][idx]))
        return x.float(), self.labels[torch.from_numpy(idx)]


class CachedTrainLoader:
    """Batches of cached features in the order an EpochBatchSampler gives; set `epoch`
    (as the trainer does on its dataset) to pick the view."""

    def __init__(self, cache: FeatureCache, sampler):
        self.cache, self.sampler, self.epoch = cache, sampler, 0

    def __len__(self) -> int:
        return len(self.cache)

    def __iter__(self):
        view = self.cache.view_of_epoch(self.epoch)
        for batch in self.sampler:
            yield self.cache.batch(batch, view)


class CachedEvalLoader:
    """In-order batches of a cache (view 0), for validation."""

    def __init__(self, cache: FeatureCache, batch_size: int):
        self.cache, self.batch_size = cache, batch_size
        self.dataset = range(len(cache))

    def __len__(self) -> int:
        return math.ceil(len(self.cache) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.cache), self.batch_size):
            yield self.cache.batch(range(start, min(start + self.batch_size, len(self.cache))))


# -- building --------------------------------------------------------------------------------
class _OneThread(Dataset):
    """Loads items with one torch thread. In the training process (num_workers=0) torch
    would spread each small op of the transform over all its threads, and on a busy
    machine the affine augmentation then runs 10x slower while threads wait for cores
    (benchmarks/loader.py). Worker processes already use one thread."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        threads = torch.get_num_threads()
        if threads == 1:
            return self.dataset[index]
        torch.set_num_threads(1)
        try:
            return self.dataset[index]
        finally:
            torch.set_num_threads(threads)


def _encode(model, dataset, views: int, seed: int, dtype: torch.dtype, device, batch_size: int,
            num_workers: int, amp_dtype, out_array=None) -> torch.Tensor | np.ndarray:
    """Backbone outputs of every image and view, into `out_array` (memmap) or a new tensor."""
    n, stored = len(dataset), max(views, 1)
    seeded = SeededDataset(dataset, seed)
    out = out_array
    backbone_was_training = model.backbone.training
    model.backbone.eval()
    try:
        for v in range(stored):
            seeded.epoch = v
            loader = DataLoader(_OneThread(seeded), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                pin_memory=torch.device(device).type == "cuda")
            pos = 0
            for x, _ in loader:
                with torch.no_grad(), (torch.autocast(torch.device(device).type, dtype=amp_dtype)
                                       if amp_dtype else nullcontext()):
                    f = model.backbone_output(x.to(device, non_blocking=True))
                f = f.detach().to("cpu", dtype)
                if not torch.isfinite(f).all():
                    raise CacheError(f"the backbone's outputs do not fit train.cache.dtype {dtype} "
                                     "(non-finite values); use float32")
                if out is None:
                    out = torch.empty((stored, n, *f.shape[1:]), dtype=dtype)
                if isinstance(out, torch.Tensor):
                    out[v, pos:pos + len(f)] = f
                else:
                    out[v, pos:pos + len(f)] = f.numpy()
                pos += len(f)
                STATS["images_encoded"] += len(f)
    finally:
        model.backbone.train(backbone_was_training)
    return out


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(model, dataset, views: int, dtype: str, storage: str, cache_dir, device, seed: int) -> int:
    """Estimate the cache's size before building it; a CacheError when it would not fit
    (memory: MEMORY_SHARE of the available memory; disk: the free space under cache_dir)."""
    shape = _feature_shape(model, SeededDataset(dataset, seed), device)  # own RNG: no side effect
    need = max(views, 1) * len(dataset) * math.prod(shape) * DTYPES[dtype].itemsize
    what = (f"{need / 2**30:.2f} GiB ({max(views, 1)} view(s) x {len(dataset)} images x "
            f"{'x'.join(map(str, shape))} x {dtype})")
    if storage == "memory":
        avail = available_memory()
        if avail is not None and need > MEMORY_SHARE * avail:
            raise CacheError(f"feature cache of {what} would not fit in memory ({avail / 2**30:.2f} GiB "
                             "available): set train.cache.storage: disk, fewer train.cache.views, "
                             "train.cache.dtype: float16, or train.cache.views: null (cache off)")
    else:
        free = shutil.disk_usage(Path(cache_dir)).free
        if need > free:
            raise CacheError(f"feature cache of {what} would not fit in {cache_dir} "
                             f"({free / 2**30:.2f} GiB free): set train.cache.dir elsewhere or turn the cache off")
    return need


def _feature_shape(model, dataset, device) -> tuple[int, ...]:
    """Shape of one image's backbone output, from a forward of the first image."""
    x, _ = dataset[0]
    with torch.no_grad():
        was = model.backbone.training
        model.backbone.eval()
        try:
            return tuple(model.backbone_output(x.unsqueeze(0).to(device)).shape[1:])
        finally:
            model.backbone.train(was)


def _load_disk(folder: Path, key: str):
    """(features memmap, labels, meta) of a complete cache folder, or None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        feats = np.load(folder / "features.npy", mmap_mode="r")
        labels = torch.from_numpy(np.load(folder / "labels.npy"))
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or list(feats.shape) != meta.get("shape"):
        return None
    return feats, labels, meta


def get_features(model, dataset, *, views: int = 0, seed: int = 0, dtype: str = "float16",
                 storage: str = "memory", cache_dir: str | Path = ".cladapter_cache",
                 device=None, batch_size: int = 32, num_workers: int = 0,
                 amp_dtype=None) -> FeatureCache:
    """The cache of `model.backbone_output` over `dataset` (a ManifestDataset with the
    transform to cache: eval transform for views=0, train transform otherwise): found
    under its key, or computed now."""
    if any(p.requires_grad for p in model.backbone.parameters()):
        raise CacheError("the feature cache needs a frozen backbone (stage 1 of cla/lp-ft, or linear mode); "
                         "call model.set_stage(1) first")
    if dtype not in DTYPES:
        raise CacheError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if storage not in STORAGES:
        raise CacheError(f"cache storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if len(dataset) == 0:
        raise CacheError("nothing to cache: the dataset is empty")
    device = device or next(model.parameters()).device
    key, base = cache_keys(model, dataset, views, seed, dtype, device, amp_dtype)
    labels = torch.as_tensor(list(dataset.targets), dtype=torch.long)
    encode = dict(views=views, seed=seed, dtype=DTYPES[dtype], device=device, batch_size=batch_size,
                  num_workers=num_workers, amp_dtype=amp_dtype)

    if storage == "memory":
        hit = _memory_hit(key, base, views)
        if hit is not None:
            return hit
        check_fits(model, dataset, views, dtype, storage, cache_dir, device, seed)
        t0 = time.time()
        feats = _encode(model, dataset, **encode)
        cache = FeatureCache(key, feats, labels, views, built=True, seconds=time.time() - t0, base=base)
        STATS["builds"] += 1
        _MEMORY[key] = cache
        while len(_MEMORY) > MEMORY_ENTRIES:
            _MEMORY.popitem(last=False)
        return cache

    folder = Path(cache_dir) / key
    found = _load_disk(folder, key)
    if found is not None:
        STATS["hits"] += 1
        return FeatureCache(key, found[0], found[1], views, path=folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    check_fits(model, dataset, views, dtype, storage, cache_dir, device, seed)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=folder.parent))
    os.chmod(tmp, default_mode(directory=True))  # a shared cache folder: readable by the group
    try:
        shape = (max(views, 1), len(dataset), *_feature_shape(model, SeededDataset(dataset, seed), device))
        arr = np.lib.format.open_memmap(tmp / "features.npy", mode="w+", dtype=np.dtype(dtype), shape=shape)
        _encode(model, dataset, out_array=arr, **encode)
        arr.flush()
        del arr
        np.save(tmp / "labels.npy", labels.numpy())
        (tmp / "meta.json").write_text(json.dumps({"key": key, "shape": list(shape), "dtype": dtype,
                                                   "views": views, "images": len(dataset),
                                                   "backbone": model.backbone.name}, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    STATS["builds"] += 1
    found = _load_disk(folder, key)
    if found is None:
        raise CacheError(f"feature cache {folder}: written but cannot be read back")
    return FeatureCache(key, found[0], found[1], views, path=folder, built=True, seconds=time.time() - t0)


def _memory_hit(key: str, base: str, views: int) -> FeatureCache | None:
    """The stored cache under `key`, else one of more augmented views of the same base (its
    first `views` views are this cache's, image for image); None if there is none."""
    found = _MEMORY.get(key)
    if found is None and views:
        found = next((c for c in _MEMORY.values() if c.base == base and c.stored_views >= views), None)
    if found is None:
        return None
    _MEMORY.move_to_end(found.key)
    STATS["hits"] += 1
    return found.serving(key, views)


# -- the trainer's entry point ---------------------------------------------------------------
def stage1_cache(model, params: dict, prepared_dir, config: dict, seed: int, sampler, device,
                 amp_dtype=None, has_val: bool = True, epochs: int | None = None) -> dict:
    """Cached train and val loaders for a frozen-backbone stage of `epochs` epochs.

    Returns {"train": CachedTrainLoader (also the trainer's dataset: it has `epoch`),
    "val": CachedEvalLoader or None, "info": what the summary records}. Settings come
    from `train.cache` of the validated params (their defaults live in params.py alone).
    """
    from .. import data
    t = params["train"]
    c = t["cache"]
    views = int(c["views"])
    if epochs and 0 < views < epochs:
        warnings.warn(f"feature cache: {views} augmented views for {epochs} epochs, so epoch e reuses "
                      f"view e mod {views}: less augmentation than fresh draws each epoch. Set "
                      f"train.cache.views >= {epochs} (same images as uncached) or null (cache off).",
                      stacklevel=2)
    in_chans = int(config["input_size"][0])
    common = dict(seed=seed, dtype=c["dtype"], storage=c["storage"], cache_dir=c["dir"], device=device,
                  batch_size=int(t["batch_size"]), amp_dtype=amp_dtype,
                  num_workers=data.loader_workers(t["num_workers"], torch.device(device).type))
    train_tf = data.build_transform(config, views > 0, t.get("augment"))
    train_ds = data.ManifestDataset(prepared_dir, "train", train_tf, in_chans=in_chans)
    t0 = time.time()
    train_cache = get_features(model, train_ds, views=views, **common)
    val = None
    val_cache = None
    if has_val:
        val_ds = data.ManifestDataset(prepared_dir, "val", data.build_transform(config, False), in_chans=in_chans)
        if len(val_ds):
            val_cache = get_features(model, val_ds, views=0, **common)
            val = CachedEvalLoader(val_cache, int(t["batch_size"]))
    caches = [x for x in (train_cache, val_cache) if x is not None]
    info = {"views": views, "dtype": c["dtype"], "storage": c["storage"],
            "train_key": train_cache.key, "val_key": val_cache.key if val_cache else None,
            "built": any(x.built for x in caches), "seconds": round(time.time() - t0, 3),
            "bytes": sum(x.nbytes for x in caches),
            # what building the caches this stage reads costs, whoever built them (compare)
            "built_seconds": round(sum(x.seconds for x in caches if x.built), 3),
            "reads": {x.base or x.key: round(x.read_cost(epochs if x is train_cache else None), 3)
                      for x in caches}}
    return {"train": CachedTrainLoader(train_cache, sampler), "val": val, "info": info}
