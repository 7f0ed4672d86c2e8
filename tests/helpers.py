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
import subprocess
import sys
import time
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
    "backbone": "vit_tiny_patch16_224", "num_centers": 4, "batch_size": 17,
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
