"""The key of a stage-1 feature cache: what identifies the stored backbone outputs (the
backbone's weights, what is stored, the data by content, the transform, views, seed,
dtype, device, autocast; feature_cache.py's docstring lists it). Any change gives another
key, so a cache is never read for inputs it was not built from."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

KEY_VERSION = 3  # 2: files by sha256, device and autocast dtype; 3: linear-mean apart from linear


def weights_digest(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in module.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _data_digest(dataset) -> str:
    """Files by content: the sha256 that prepare recorded in manifest.csv (with path and
    label, as order and labels matter); a file the manifest does not list, by size and mtime."""
    h = hashlib.blake2b(digest_size=20)
    shas = {}
    if getattr(dataset, "prepared_dir", None) is not None:
        from ..data.datasets import manifest_sha256
        shas = manifest_sha256(dataset.prepared_dir)
    for path, label in dataset.items:
        if shas.get(Path(path)):
            h.update(f"{path}|{label}|{shas[Path(path)]}\n".encode())
        else:
            st = os.stat(path)
            h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _transform_desc(transform) -> dict:
    """What the transform does, from its own settings (its repr lists every augmentation)."""
    return {"size": list(getattr(transform, "size", []) or []),
            "is_3d": getattr(transform, "is_3d", None), "frames": getattr(transform, "frames", None),
            "channels": getattr(transform, "channels", None),
            "interpolation": getattr(transform, "interpolation", None),
            "intensity": getattr(transform, "intensity", None),
            "normalize": repr(getattr(transform, "normalize", None)),
            "augment": repr(getattr(transform, "augment", None))}


def cache_keys(model, dataset, views: int, seed: int, dtype: str, device=None,
               amp_dtype=None) -> tuple[str, str]:
    """(key, base) of `model`'s backbone output over `dataset` (a ManifestDataset), computed
    on `device` under autocast `amp_dtype` (both change the stored numbers). `base`: the key
    without the number of views (augmented views only): view v of image i is the same in a
    cache of any size, so one of more views serves fewer. Hashes the weights and data once."""
    import torchvision
    parts = {
        "version": KEY_VERSION, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "backbone": model.backbone.name, "backbone_kwargs": model.backbone.kwargs,
        # what backbone_output stores: the tokens, their mean (linear-mean) or the backbone's pooling
        "output": "tokens" if model.adapter is not None else ("mean-tokens" if model.mode == "linear-mean"
                                                               else "pooled"),
        "weights": weights_digest(model.backbone), "data": _data_digest(dataset),
        "device": torch.device(device).type if device is not None else None,
        "autocast": str(amp_dtype) if amp_dtype else None,
        "in_chans": getattr(dataset, "in_chans", None),
        "transform": _transform_desc(dataset.transform),
        # Views and seed only change the stored numbers when there is augmentation.
        "views": views, "seed": seed if views else None, "dtype": dtype,
    }
    return _hash(parts), _hash({**parts, "views": "any" if views else 0})


def cache_key(model, dataset, views: int, seed: int, dtype: str, device=None, amp_dtype=None) -> str:
    """The key alone (`cache_keys`)."""
    return cache_keys(model, dataset, views, seed, dtype, device, amp_dtype)[0]


def _hash(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
