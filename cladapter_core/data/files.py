"""What kind of item a path is (2D image, 3D volume or frame folder), and the order of
frames: decided from names, without decoding."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path


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
