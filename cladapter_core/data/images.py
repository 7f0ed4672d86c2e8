"""Decoding image files, 3D volumes/clips and frame folders into numpy arrays.

`decode(path)` returns the pixels in one canonical layout, keeping the stored dtype:
2D images as (H, W, C), 3D volumes/clips as (T, H, W, C). `load_array` turns that into
a float tensor in [0, 1] with the channel count a model takes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat as statmod
from pathlib import Path

import numpy as np
import torch

from cladapter_core.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTS = (".npy", ".npz")
TIFF_EXTS = (".tif", ".tiff")
# npz members tried, in order, when an archive holds more than one array.
NPZ_KEYS = ("data", "volume", "clip", "arr_0")
# What pathlib's exists() reads as "not there".
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


class DecodeError(Exception):
    """A file cannot be used; the message says why (the caller adds the path)."""


def natural_key(name: str):
    """Sort key that puts frame_2 before frame_10."""
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", name) if tok]


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS


def is_volume_file(path: Path) -> bool:
    return path.suffix.lower() in VOLUME_EXTS


def frame_files(folder: Path) -> list[Path]:
    """Image files directly in a frame folder, in natural name order."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not is_hidden(p) and is_image_file(p)),
        key=lambda p: natural_key(p.name),
    )


def kind_of(path: Path) -> str | None:
    """'2d' for an image file, '3d' for a .npy/.npz file or a folder (of frames), else None."""
    return "3d" if path.is_dir() else kind_of_file(path)


def kind_of_file(path: Path) -> str | None:
    """`kind_of` for a path known not to be a folder: by its extension alone."""
    if is_image_file(path):
        return "2d"
    if is_volume_file(path):
        return "3d"
    return None


def kind_of_name(name: str) -> str | None:
    """`kind_of_file` of a file name (a listing's, without building a Path per file)."""
    ext = os.path.splitext(name)[1].lower()
    return "2d" if ext in IMAGE_EXTS else "3d" if ext in VOLUME_EXTS else None


# ---------------------------------------------------------------- 2D decoding


def _channels_last_2d(arr: np.ndarray) -> np.ndarray:
    """(H,W) / (H,W,C) / (C,H,W) -> (H,W,C); anything else is refused."""
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 3:
        if arr.shape[-1] <= 4:
            return arr
        if arr.shape[0] <= 4:  # planar TIFF: channels first
            return np.moveaxis(arr, 0, -1)
        raise DecodeError(
            f"array of shape {tuple(arr.shape)} is a stack, not a 2D image "
            "(save stacks as .npy or as a folder of frames)"
        )
    raise DecodeError(f"expected a 2D image (H,W) or (H,W,C), got an array of rank {arr.ndim}, shape {tuple(arr.shape)}")


def _decode_pil(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()  # force the decode so truncated files fail here
        img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            arr = np.array(img).astype(np.uint16)
        elif mode == "I":
            arr = np.array(img)
            # 16-bit PNGs may open as 32-bit "I"; keep them 16-bit when they fit.
            if arr.size and arr.min() >= 0 and arr.max() <= 65535:
                arr = arr.astype(np.uint16)
        elif mode == "F":
            arr = np.array(img, dtype=np.float32)
        elif mode in ("L", "RGB", "RGBA", "LA"):
            arr = np.array(img)
        elif mode == "1":
            arr = np.array(img.convert("L"))
        elif mode in ("P", "PA"):
            arr = np.array(img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB"))
        else:  # CMYK, YCbCr, LAB, HSV ...
            arr = np.array(img.convert("RGB"))
    return arr


def _decode_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        return np.asarray(tifffile.imread(path))
    except Exception as tiff_exc:  # noqa: BLE001 - fall back to PIL, report both if both fail
        try:
            return _decode_pil(path)
        except Exception:  # noqa: BLE001
            raise DecodeError(f"cannot decode TIFF: {tiff_exc}") from tiff_exc


# JPEG and PNG through torchvision.io (libjpeg-turbo, libpng): the pixels PIL gives, for
# 15 to 20 % less CPU and one copy fewer (benchmarks/prepare_scale.py). Only files both
# decode alike take this path; the rest (CMYK or 12-bit JPEG, palette, 1-bit, 16-bit colour
# or transparent PNG, orientation in XMP or text chunks), and any file torchvision refuses,
# go to PIL, so results and error messages stay PIL's.
FAST_EXTS = (".jpg", ".jpeg", ".png")
_JPEG_SOF = (0xC0, 0xC1, 0xC2)  # Huffman baseline, extended, progressive
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_PIL_ONLY = (b"tRNS", b"eXIf", b"acTL", b"Raw profile type exif", b"XML:com.adobe.xmp")


def _read_bytes(path: Path) -> bytearray:
    with open(path, "rb") as fh:
        buf = bytearray(os.fstat(fh.fileno()).st_size)
        n = fh.readinto(buf)
    return buf if n == len(buf) else buf[:n]


def _plain_jpeg(data: bytearray) -> bool:
    """8-bit, 1 or 3 components, Huffman-coded, no orientation in XMP."""
    if data[:2] != b"\xff\xd8":
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in _JPEG_SOF:
            return (i + 10 <= n and data[i + 4] == 8 and data[i + 9] in (1, 3)
                    and data.find(b"tiff:Orientation", 0, i) < 0)
        if marker == 0xDA or 0xC3 <= marker <= 0xCF:  # scan before a frame, other codings
            return False
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def _plain_png(data: bytearray) -> bool:
    """8-bit grey/RGB/grey-alpha/RGBA or 16-bit grey, no transparency chunk, no EXIF/XMP."""
    if data[:8] != _PNG_SIG or data[12:16] != b"IHDR" or len(data) < 29:
        return False
    depth, colour = data[24], data[25]
    if not ((depth == 8 and colour in (0, 2, 4, 6)) or (depth == 16 and colour == 0)):
        return False
    head_end = data.find(b"IDAT")
    return head_end > 0 and not any(data.find(tag, 0, head_end) >= 0 for tag in _PNG_PIL_ONLY)


def _tv_op(name: str):
    """The op behind torchvision.io's `name` (mode, apply_exif_orientation): the public
    wrappers warn on every call that torchvision's image I/O is deprecated in favour of
    TorchCodec; torchvision is pinned (pyproject.toml) and tests/test_scale.py checks the op."""
    op = _TV_OPS.get(name)
    if op is None:
        import torchvision.io.image  # noqa: F401 - loads the image extension that registers the ops
        op = _TV_OPS[name] = getattr(torch.ops.image, name)
    return op


_TV_OPS: dict = {}  # looked up once: prepare calls for every file


def _decode_fast(path: Path) -> np.ndarray | None:
    """(H, W, C) pixels through torchvision.io, or None when PIL must decode the file."""
    if path.suffix.lower() not in FAST_EXTS:
        return None
    try:
        data = _read_bytes(path)
    except OSError:
        return None  # PIL reports it
    if _plain_jpeg(data):
        op = "decode_jpeg"
    elif _plain_png(data):
        op = "decode_png"
    else:
        return None
    try:
        out = _tv_op(op)(torch.frombuffer(data, dtype=torch.uint8), 0, True)  # UNCHANGED, EXIF orientation
    except Exception:  # noqa: BLE001 - corrupt or truncated: PIL decides and words the error
        return None
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())  # decoded HWC: no copy


def decode_image(path: Path) -> np.ndarray:
    """A 2D image file -> (H, W, C) array in its stored dtype."""
    if path.suffix.lower() in TIFF_EXTS:
        arr = _decode_tiff(path)
    elif (fast := _decode_fast(path)) is not None:
        return fast
    else:
        try:
            arr = _decode_pil(path)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise DecodeError(f"cannot decode image: {exc}") from exc
    return _channels_last_2d(arr)


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


def pixel_hash(arr: np.ndarray) -> str:
    """sha256 of decoded pixels (dtype, shape and values), independent of file format."""
    canon = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    digest = hashlib.sha256(f"{canon.dtype.str}|{canon.shape}|".encode())
    digest.update(canon.reshape(-1).view(np.uint8))  # the bytes in place, no copy
    return digest.hexdigest()


def to_unit_float(arr: np.ndarray, intensity: list | tuple | None = None) -> np.ndarray:
    """Scale pixels to float32 in [0, 1].

    `intensity` = (lo, hi) in the file's own units: the dataset's real range, found by
    prepare (12-bit data in 16-bit files: (0, 4095); floats: their range), mapped to [0, 1]
    and clipped. Without it: uint8 / 255 and uint16 / 65535 (fixed, so brightness keeps its
    meaning across files); bool as 0/1; other dtypes (float, int16, uint32 ...) are kept
    when already within [0, 1] and otherwise min-max scaled per file.
    """
    if intensity is not None and arr.dtype != np.bool_:
        lo, hi = float(intensity[0]), float(intensity[1])
        out = (arr.astype(np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1e-12))
        return np.clip(out, 0.0, 1.0, out=out)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    out = arr.astype(np.float32)
    lo, hi = float(out.min()), float(out.max())
    if lo >= 0.0 and hi <= 1.0:
        return out
    if hi == lo:
        return np.zeros_like(out)
    return (out - lo) / (hi - lo)


def match_channels(arr: np.ndarray, in_chans: int, name: str = "") -> np.ndarray:
    """Channels-last float array -> `in_chans` channels (drop alpha, grey<->RGB)."""
    c = arr.shape[-1]
    if c in (2, 4) and in_chans != c:  # LA / RGBA: drop alpha
        arr = arr[..., : c - 1]
        c -= 1
    if c == in_chans:
        return arr
    if c == 1:
        return np.repeat(arr, in_chans, axis=-1)
    if in_chans == 1:
        return arr.mean(axis=-1, keepdims=True)
    raise DataError(f"{name or 'input'}: has {c} channels, the model takes {in_chans}")


def load_array(path, in_chans: int = 3, intensity=None) -> torch.Tensor:
    """Decode one file to a float tensor in [0, 1]: 2D -> (C, H, W), 3D -> (C, T, H, W);
    `intensity`: the dataset's (lo, hi), see `to_unit_float`."""
    path = Path(path)
    try:
        arr = decode(path)
    except DecodeError as exc:
        raise DataError(f"{path}: {exc}") from None
    return _to_tensor(arr, in_chans, str(path), intensity)


def _to_tensor(arr: np.ndarray, in_chans: int, name: str, intensity=None) -> torch.Tensor:
    arr = match_channels(to_unit_float(arr, intensity), in_chans, name)
    tensor = torch.from_numpy(np.ascontiguousarray(arr))
    if tensor.ndim == 3:  # H,W,C -> C,H,W
        return tensor.permute(2, 0, 1).contiguous()
    return tensor.permute(3, 0, 1, 2).contiguous()  # T,H,W,C -> C,T,H,W


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


# ---------------------------------------------------------------- resized copies (prepare)


def resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize (H,W,C) or (T,H,W,C) pixels to size x size, keeping the dtype (antialiased)."""
    dtype = arr.dtype
    work = arr.astype(np.uint8) if dtype == np.bool_ else arr
    x = torch.from_numpy(np.ascontiguousarray(work).astype(np.float64 if dtype.kind == "f" else np.float32))
    lead = x.shape[:-3]
    h, w, c = x.shape[-3:]
    x = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(*lead, size, size, c)
    out = x.numpy()
    if dtype.kind in "biu":
        info = np.iinfo(work.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(work.dtype)


def write_copy(arr: np.ndarray, stem: Path) -> Path:
    """Write pixels next to `stem` in a lossless format that keeps the dtype; return the path.

    2D uint8 (1-4 channels) and single-channel uint16 -> PNG; other 2D -> TIFF; 3D -> .npy.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 4:
        path = stem.with_name(stem.name + ".npy")
        np.save(path, arr, allow_pickle=False)
        return path
    c = arr.shape[-1]
    if arr.dtype == np.uint8 or (arr.dtype == np.uint16 and c == 1):
        from PIL import Image

        path = stem.with_name(stem.name + ".png")
        img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
        img.save(path, format="PNG")
        return path
    import tifffile

    path = stem.with_name(stem.name + ".tif")
    tifffile.imwrite(path, arr[:, :, 0] if c == 1 else arr, compression="zlib")
    return path
