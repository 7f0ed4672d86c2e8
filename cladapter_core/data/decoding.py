"""Decoding any item (`images` for 2D, `volumes` for 3D) with the checks every item gets, and
loading it as the float tensor a model takes (a clip: only the frames it takes).

`decode(path)` returns the pixels in one canonical layout, keeping the stored dtype:
2D images as (H, W, C), 3D volumes/clips as (T, H, W, C). `load_array` turns that into
a float tensor in [0, 1] with the channel count a model takes.
"""
from __future__ import annotations

import stat as statmod
from pathlib import Path

import numpy as np
import torch

from cladapter_core.errors import DataError
from cladapter_core.data.files import _MISSING, IMAGE_EXTS, VOLUME_EXTS, DecodeError, frame_files, kind_of_file
from cladapter_core.data.images import _to_tensor, decode_image
from cladapter_core.data.volumes import _channels_last_3d, check_voxels, decode_volume, voxels

# ---------------------------------------------------------------- checks and helpers


def decode(path: Path) -> np.ndarray:
    """Decode and check one item; raise DecodeError (message without the path) if unusable."""
    path = Path(path)
    try:
        st = path.stat()  # once: prepare calls this for every file
    except OSError as exc:
        if exc.errno in _MISSING:
            raise DecodeError("file does not exist") from None
        raise
    kind = "3d" if statmod.S_ISDIR(st.st_mode) else kind_of_file(path)
    if kind is None:
        raise DecodeError(f"unsupported file type '{path.suffix}' (supported: {', '.join(IMAGE_EXTS + VOLUME_EXTS)})")
    if statmod.S_ISREG(st.st_mode) and st.st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    arr = decode_image(path) if kind == "2d" else decode_volume(path)
    if arr.size == 0 or 0 in arr.shape:
        raise DecodeError(f"empty array, shape {tuple(arr.shape)}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DecodeError("contains NaN or infinite values")
    if arr.dtype.kind not in "biuf":
        raise DecodeError(f"pixel dtype {arr.dtype} is not numeric")
    return arr


def load_array(path, in_chans: int = 3, intensity=None) -> torch.Tensor:
    """Decode one file to a float tensor in [0, 1]: 2D -> (C, H, W), 3D -> (C, T, H, W);
    `intensity`: the dataset's (lo, hi), see `to_unit_float`."""
    path = Path(path)
    try:
        arr = decode(path)
    except DecodeError as exc:
        raise DataError(f"{path}: {exc}") from None
    return _to_tensor(arr, in_chans, str(path), intensity)


# ---------------------------------------------------------------- clips, lazily (the loader)
FIXED_SCALE = (np.uint8, np.uint16, np.bool_)  # scaled per value, not by the clip's range


def frame_indices(t: int, frames: int) -> list[int]:
    """The `frames` evenly spaced frames of a clip of `t` (repeats when the clip is short)."""
    return torch.linspace(0, t - 1, frames).round().long().tolist()


def _selected_frames(path: Path, frames: int) -> np.ndarray | None:
    """(frames, H, W, C) pixels read without the rest of the clip: a .npy file memory-mapped,
    a frame folder decoding only those frames; None where the whole clip must be read (a
    dtype scaled by the clip's own range, an .npz archive, a file that is not plain)."""
    if path.is_dir():
        files = frame_files(path)
        if not files:
            return None
        picked = [decode_image(files[i]) for i in frame_indices(len(files), frames)]
        check_voxels(sum(int(np.prod(a.shape[:2])) for a in picked), f"the {frames} frames taken")
        if picked[0].dtype.type not in FIXED_SCALE or any(a.shape != picked[0].shape for a in picked):
            return None
        return np.stack(picked)
    if path.suffix.lower() != ".npy":
        return None
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        clip = _channels_last_3d(mapped)
    except (OSError, ValueError, DecodeError):
        return None  # the full read words the error
    check_voxels(voxels(mapped.shape), f"array of shape {mapped.shape}")  # as `decode` would
    if clip.dtype.type not in FIXED_SCALE or 0 in clip.shape:
        return None
    return np.ascontiguousarray(clip[frame_indices(clip.shape[0], frames)])


def load_clip(path, in_chans: int = 3, frames: int | None = None, intensity=None) -> torch.Tensor:
    """`load_array` of a 3D clip with only the `frames` frames a model takes (the evenly
    spaced ones its transform would pick): (C, frames, H, W), the same numbers as
    `load_array` followed by that pick, without reading or converting the other frames."""
    path = Path(path)
    try:
        picked = _selected_frames(path, frames) if frames else None
    except DecodeError:
        picked = None  # load_array words the error
    if picked is None:
        full = load_array(path, in_chans, intensity)
        return full[:, frame_indices(full.shape[1], frames)] if frames and full.ndim == 4 else full
    return _to_tensor(picked, in_chans, str(path), intensity)
