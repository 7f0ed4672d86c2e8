"""Decoding 3D items into numpy arrays (T, H, W, C): .npy/.npz volumes and clips, and
folders of frames.

An array's shape is read from its .npy header (inside the zip for .npz) before it is
loaded, and a frame folder's frames are counted as they are decoded: an item of more
voxels than `settings().max_volume_voxels` ($CLADAPTER_MAX_VOLUME_VOXELS) is refused, as
2D images over their pixel limit are (images.py)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from cladapter_core.data.files import IMAGE_EXTS, NPZ_KEYS, DecodeError, frame_files
from cladapter_core.data.images import decode_image
from cladapter_core.settings import settings, var

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # as np.load tells an .npz


def voxels(shape: tuple) -> int:
    """Frames x height x width of an array as `_channels_last_3d` reads it (channels apart)."""
    dims = [int(n) for n in shape]
    if len(dims) == 4 and (dims[-1] <= 4 or dims[0] <= 4):
        dims = dims[:-1] if dims[-1] <= 4 else dims[1:]
    return int(np.prod(dims, dtype=object)) if dims else 0  # Python ints: no overflow


def check_voxels(count: int, what: str) -> None:
    """Refuse a 3D item of more voxels than the deployment allows, before it is loaded."""
    limit = settings().max_volume_voxels
    if count > limit:
        raise DecodeError(f"{what}: {count:,} voxels, over the limit of {limit:,} "
                          f"({var('max_volume_voxels')}); refused before loading")


def _npy_shape(fh) -> tuple:
    """The shape an .npy stream's header declares; the stream is left at its start."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape = read(fh)[0]
    fh.seek(0)
    return tuple(shape)


def _read_npy(fh, what: str) -> np.ndarray:
    shape = _npy_shape(fh)
    check_voxels(voxels(shape), f"{what} of shape {shape}")
    return np.lib.format.read_array(fh, allow_pickle=False)


def _read_npz(path: Path) -> np.ndarray:
    """The volume of an .npz archive: its only array, or the one named like NPZ_KEYS."""
    with zipfile.ZipFile(path) as zf:
        members = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
        keys = list(members)
        if not keys:
            raise DecodeError("npz archive holds no arrays")
        if len(keys) == 1:
            key = keys[0]
        else:
            key = next((k for k in NPZ_KEYS if k in keys), None)
            if key is None:
                raise DecodeError(
                    f"npz archive holds several arrays ({', '.join(sorted(keys))}); "
                    f"name the volume one of: {', '.join(NPZ_KEYS)}"
                )
        try:
            with zf.open(members[key]) as fh:
                return _read_npy(fh, f"array '{key}'")
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(f"cannot read array '{key}' from npz: {exc}") from exc

# ---------------------------------------------------------------- 3D decoding


def _channels_last_3d(arr: np.ndarray) -> np.ndarray:
    """(T,H,W) / (T,H,W,C) / (C,T,H,W) -> (T,H,W,C); anything else is refused."""
    if arr.ndim == 3:
        return arr[..., None]
    if arr.ndim == 4:
        if arr.shape[-1] <= 4:
            return arr
        if arr.shape[0] <= 4:
            return np.moveaxis(arr, 0, -1)
        raise DecodeError(
            f"4D array of shape {tuple(arr.shape)} has no channel axis of size 1-4 "
            "at the start or the end; expected (T,H,W,C) or (C,T,H,W)"
        )
    raise DecodeError(
        f"expected a 3D volume/clip of rank 3 (T,H,W) or 4 (T,H,W,C), "
        f"got rank {arr.ndim}, shape {tuple(arr.shape)}"
    )


def _decode_volume_file(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(_NPY_MAGIC))
            fh.seek(0)
            if magic.startswith(_ZIP_MAGIC):
                arr = _read_npz(path)
            elif magic == _NPY_MAGIC:
                arr = _read_npy(fh, "array")
            else:  # neither: np.load words what it is not
                arr = np.load(fh, allow_pickle=False)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"cannot read numpy file: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise DecodeError(f"array dtype {arr.dtype} is not numeric")
    return arr


def _decode_frame_folder(folder: Path) -> np.ndarray:
    frames = frame_files(folder)
    if not frames:
        raise DecodeError(f"frame folder holds no image files ({', '.join(IMAGE_EXTS)})")
    arrays, count = [], 0
    for frame in frames:
        if frame.stat().st_size == 0:
            raise DecodeError(f"frame {frame.name} is an empty file")
        try:
            arrays.append(decode_image(frame))
        except DecodeError as exc:
            raise DecodeError(f"frame {frame.name}: {exc}") from exc
        count += int(np.prod(arrays[-1].shape[:2]))
        # Each frame is within the pixel limit; the folder stops at the voxel limit.
        check_voxels(count, f"frame folder of {len(frames)} frames (read up to {frame.name})")
    first = arrays[0]
    for frame, arr in zip(frames, arrays):
        if arr.shape != first.shape or arr.dtype != first.dtype:
            raise DecodeError(
                f"frames differ: {frames[0].name} is {first.shape} {first.dtype}, "
                f"{frame.name} is {arr.shape} {arr.dtype}"
            )
    return np.stack(arrays)


def decode_volume(path: Path) -> np.ndarray:
    """A .npy/.npz file or a folder of frames -> (T, H, W, C) array in its stored dtype."""
    if path.is_dir():
        return _decode_frame_folder(path)
    return _channels_last_3d(_decode_volume_file(path))
