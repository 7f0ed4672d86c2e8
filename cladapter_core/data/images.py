"""Decoding 2D image files into numpy arrays (H, W, C) of their stored dtype, the pixel
hash, scaling to [0, 1], channels, and the resized copies prepare writes.

Every file's size is read from its header before anything is decoded (PNG's IHDR, JPEG's
frame header, the TIFF's first series, what Pillow's lazy open reads), and a file over
`settings().max_image_pixels` ($CLADAPTER_MAX_IMAGE_PIXELS, Pillow's own default) is
refused: a 177 KB PNG can declare 13,500 x 13,500 pixels, which decoders allocate at once
(docs/security.md)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from cladapter_core.errors import DataError
from cladapter_core.data.files import TIFF_EXTS, DecodeError
from cladapter_core.settings import settings, var

# ---------------------------------------------------------------- sizes, before decoding


def check_pixels(width: int, height: int, what: str = "image", pixels: int | None = None) -> None:
    """Refuse an image of more pixels than the deployment allows, before it is decoded;
    `pixels`: where it is more than one plane (a TIFF stack)."""
    limit = settings().max_image_pixels
    pixels = width * height if pixels is None else pixels
    if pixels > limit:
        raise DecodeError(f"{what} of {width:,} x {height:,} = {pixels:,} pixels, over the limit of "
                          f"{limit:,} ({var('max_image_pixels')}); refused before decoding")


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

    limit = settings().max_image_pixels
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # a deployment that allows more: Pillow's check too
    try:
        img = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit, so over ours
        raise DecodeError(f"image over the limit of {limit:,} pixels ({var('max_image_pixels')}); "
                          f"refused before decoding ({exc})") from None
    with img:
        check_pixels(*img.size)
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


def _check_tiff(series) -> None:
    """The pixels of the series tifffile.imread reads (all its pages; samples are channels)."""
    dims = [int(n) for n, axis in zip(series.shape, series.axes) if axis != "S"]
    height, width = (dims[-2], dims[-1]) if len(dims) >= 2 else (1, dims[0] if dims else 0)
    planes = int(np.prod(dims[:-2])) if len(dims) > 2 else 1
    check_pixels(width, height, f"TIFF ({planes} planes)" if planes > 1 else "TIFF", width * height * planes)


def _decode_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]  # what tifffile.imread reads
            _check_tiff(series)
            return np.asarray(tif.asarray(series=0))
    except DecodeError:
        raise
    except Exception as tiff_exc:  # noqa: BLE001 - fall back to PIL, report both if both fail
        try:
            return _decode_pil(path)
        except DecodeError:
            raise  # over the limit: Pillow read the size tifffile could not
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


def _png_size(data: bytearray) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, the first after the signature."""
    if data[:8] != _PNG_SIG or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _jpeg_size(data: bytearray) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (any SOF marker), read without decoding."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn, not DHT/JPG/DAC
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA:  # a scan before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


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
    size = _png_size(data) or _jpeg_size(data)
    if size is not None:
        check_pixels(*size)  # before either decoder allocates
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


def _to_tensor(arr: np.ndarray, in_chans: int, name: str, intensity=None) -> torch.Tensor:
    arr = match_channels(to_unit_float(arr, intensity), in_chans, name)
    tensor = torch.from_numpy(np.ascontiguousarray(arr))
    if tensor.ndim == 3:  # H,W,C -> C,H,W
        return tensor.permute(2, 0, 1).contiguous()
    return tensor.permute(3, 0, 1, 2).contiguous()  # T,H,W,C -> C,T,H,W


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
