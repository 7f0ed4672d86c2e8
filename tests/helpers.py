"""Helpers shared by the test modules: `from helpers import REPO, free_port, ...`.

Test modules import from here (and from tiny.py and fixtures_services.py), never from
one another, and never `from conftest import ...`: with the whole suite collected,
`conftest` may name tests/faults/conftest.py. tests/ is on sys.path (rootdir conftest).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
BIN = Path(sys.executable).parent  # the virtual environment's console scripts


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until something accepts connections on loopback `port`; fail if `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def tree_digest(root: Path) -> str:
    """One hash of every file's relative path and bytes under `root`."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# -- data-parallel training (tests/test_ddp.py, tests/test_multinode.py) -------------------
# The fixtures `ddp_dataset` and `stage1_reference` are in tests/conftest.py.
DDP_TINY = {
    "backbone": "vit_tiny_patch16_224", "pretrained": False, "num_centers": 4, "batch_size": 17,
    "backbone_kwargs": {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
    "stage1_epochs": 2, "stage2_epochs": 1,
}
# No feature cache (DDP does not use it) and no dropout: the two runs compute the same thing.
DDP_OVERRIDES = "model.rank=8; model.dropout=0.0; train.warmup_epochs=1; train.cache.views=null"
DDP_TOLERANCE = 1e-5  # float sums in another order (all-reduce); observed differences ~1e-7


def ddp_params() -> dict:
    from components import runtime
    return runtime.resolve_params(DDP_TINY, DDP_OVERRIDES)


@contextmanager
def one_thread():
    """The torchrun ranks run with OMP_NUM_THREADS=1; so does the reference."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def child_env(**extra) -> dict:
    """This process's environment without tracking variables, one thread, unbuffered."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "CLADAPTER_PIPELINE_ID", "CLADAPTER_TRACKING")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg", **extra)
    return env


def assert_same_training(reference: Path, ddp: Path) -> None:
    """Two training outputs hold the same weights (within DDP_TOLERANCE), history and choice."""
    import pytest
    from safetensors.torch import load_file
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= DDP_TOLERANCE, f"weights differ by up to {worst:.3g}"
    ha = json.loads((reference / "history.json").read_text())
    hb = json.loads((ddp / "history.json").read_text())
    assert [(r["stage"], r["epoch"]) for r in ha] == [(r["stage"], r["epoch"]) for r in hb]
    for ra, rb in zip(ha, hb):
        # the epoch loss covers every rank's samples, as one process counts them
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4)
    sa = json.loads((reference / "train_summary.json").read_text())
    sb = json.loads((ddp / "train_summary.json").read_text())
    assert sa["best_epoch"] == sb["best_epoch"] and sa["epochs_run"] == sb["epochs_run"]


# ------------------------------------------- decompression bombs (test_hostile_input, test_serving)
BOMB_SIDE = 13_500               # 182,250,000 pixels: twice Pillow's default limit
BOMB_VOLUME = (400, 1000, 1000)  # 400 M voxels: over the default voxel limit


def png_bomb(path: Path, width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> Path:
    """An 8-bit grey PNG of zeros, compressed row by row (never held whole): ~177 KB."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    comp = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def tiff_bomb(path: Path, side: int = BOMB_SIDE, tile: int = 1024) -> Path:
    """A zlib-compressed tiled TIFF of zeros, written tile by tile: ~200 KB."""
    import numpy as np
    import tifffile
    block = np.zeros((tile, tile), np.uint8)
    count = (-(-side // tile)) ** 2
    tifffile.imwrite(path, (block for _ in range(count)), shape=(side, side), dtype=np.uint8,
                     tile=(tile, tile), compression="zlib")
    return path


def npz_bomb(path: Path, shape: tuple = BOMB_VOLUME) -> Path:
    """An .npz whose one uint8 array is streamed into the deflated member: ~400 KB."""
    import numpy as np
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("data.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            plane = bytes(int(np.prod(shape[1:])))
            for _ in range(shape[0]):
                fh.write(plane)
    return path
