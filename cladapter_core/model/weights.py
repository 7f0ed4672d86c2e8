"""Weights in: a local path, file:// or s3:// URI; safetensors or a weights-only torch file.

Only safetensors and `torch.load(weights_only=True)` are used, so a pickled file with
code in it is refused rather than executed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import torch
from torch import nn

from .. import storage
from ..errors import ModelError
from ..storage import s3_client  # noqa: F401 - the boto3 client callers took from here

_WRAPPERS = ("state_dict", "model", "model_state", "module")
_PREFIXES = ("module.", "_orig_mod.")


def fetch_uri(uri: str, dest_dir: str | Path) -> Path:
    """A local Path for `uri` (downloading s3:// objects into dest_dir)."""
    uri = str(uri)
    if storage.scheme(uri) not in ("", "file", "s3"):
        raise ModelError(f"weights {uri}: unsupported scheme {storage.scheme(uri)!r} "
                         "(use a path, file:// or s3://)")
    if storage.is_remote(uri):
        dest = Path(dest_dir) / (PurePosixPath(urlparse(uri).path).name or "weights")
        try:
            storage.download(uri, dest)
        except storage.StorageError as e:
            raise ModelError(f"cannot download weights {uri}: {e.reason}") from e
        return dest
    path = Path(storage.local_path(uri))
    if not path.is_file():
        raise ModelError(f"weights {uri}: no such file")
    return path


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ModelError(f"weights {path}: empty file")
    # safetensors starts with an 8-byte little-endian header length, then '{'.
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise ModelError(f"weights {path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"weights {path}: refused or unreadable: only safetensors and "
                         f"weights-only torch files are loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    for key in _WRAPPERS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights {path}: expected a state dict of tensors")
    return obj


def read_state_dict(uri: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a path, file:// or s3:// URI."""
    with tempfile.TemporaryDirectory(prefix="cladapter-ckpt-") as tmp:
        state = _read_file(fetch_uri(str(uri), tmp))
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def strip_model_prefix(own: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights saved from a CLAdapter model directory carries a `backbone.model.` prefix:
    the keys without it, when none of them fits `own` (a state dict) as they are."""
    for prefix in ("backbone.model.", "backbone."):
        if state and not any(k in own for k in state) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str = "weights",
              ignore: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`; any missing, unexpected or mis-shaped key is an error
    that lists them all (keys starting with a prefix in `ignore` are dropped first)."""
    own = module.state_dict()
    state = strip_model_prefix(own, state)
    state = {k: v for k, v in state.items() if not (k.startswith(ignore) and k not in own)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: weights {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:20]) + (f" ... (+{len(items) - 20} more)" if len(items) > 20 else "")
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {few(shapes)}")
        if missing:
            parts.append(f"{len(missing)} missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
        raise ModelError(f"{source} does not fit the backbone: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
