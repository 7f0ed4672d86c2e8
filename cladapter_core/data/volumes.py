"""Decoding 3D items into numpy arrays (T, H, W, C): .npy/.npz volumes and clips, and
folders of frames."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cladapter_core.data.files import IMAGE_EXTS, NPZ_KEYS, DecodeError, frame_files
from cladapter_core.data.images import decode_image

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
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(f"cannot read numpy file: {exc}") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.files)
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
                arr = loaded[key]
            except Exception as exc:  # noqa: BLE001
                raise DecodeError(f"cannot read array '{key}' from npz: {exc}") from exc
    else:
        arr = loaded
    if arr.dtype.kind not in "biuf":
        raise DecodeError(f"array dtype {arr.dtype} is not numeric")
    return arr


def _decode_frame_folder(folder: Path) -> np.ndarray:
    frames = frame_files(folder)
    if not frames:
        raise DecodeError(f"frame folder holds no image files ({', '.join(IMAGE_EXTS)})")
    arrays = []
    for frame in frames:
        if frame.stat().st_size == 0:
            raise DecodeError(f"frame {frame.name} is an empty file")
        try:
            arrays.append(decode_image(frame))
        except DecodeError as exc:
            raise DecodeError(f"frame {frame.name}: {exc}") from exc
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
