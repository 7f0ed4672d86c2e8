"""The trainer's resumable checkpoint: what it holds, where it lives, when it is valid.

A checkpoint is written at every epoch end (and on SIGTERM mid-epoch) beside the stage's
output, as a weights-only torch file, and resumed only when its fingerprint (params, data,
stage, starting weights) matches the run asking for it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TrainingError
from ..outputs import fsync_dir, fsync_file
from ..params import flatten

CKPT_NAME = "last.pt"


def checkpoint_dir(out_dir: Path) -> Path:
    """Beside the output, not inside it: DVC removes a stage's outputs before rerunning it."""
    return out_dir.with_name(out_dir.name + ".ckpt")


def fingerprint(params: dict, prepared_dir: Path, stage: int, mode: str, init_from) -> str:
    """What a checkpoint must match to be resumed: params, data, stage, starting weights."""
    h = hashlib.sha256()
    relevant = {k: v for k, v in params.items() if k not in ("evaluate", "register", "tune")}
    relevant = {k: v for k, v in flatten(relevant).items() if not k.startswith("train.num_workers")}
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    h.update((prepared_dir / "manifest.csv").read_bytes())
    h.update(f"{stage}:{mode}".encode())
    if init_from:
        h.update((Path(init_from) / "model.safetensors").read_bytes())
    return h.hexdigest()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(obj: dict, path: Path) -> None:
    """torch.save through a temp file and a rename: a kill never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        fsync_file(tmp)  # on the disk before the rename: a power loss leaves the old one, not 0 bytes
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict:
    try:  # weights only: a checkpoint with pickled code in it is refused, not run
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"checkpoint {path} refused or unreadable (only weights-only "
                            f"checkpoints are loaded: {type(e).__name__}); delete it to "
                            "start this stage over") from e


@dataclass
class LoopState:
    """What the epoch loop carries from epoch to epoch (and a checkpoint restores)."""
    history: list = field(default_factory=list)
    start_epoch: int = 0
    skip_batches: int = 0
    global_step: int = 0
    best_value: float = -math.inf
    best_key: tuple = (False, -math.inf)
    best_state: dict | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    # (loss sum, samples) of the epoch's batches before a mid-epoch stop: the resumed epoch's
    # train_loss is then of all its batches, not only those after the resume
    epoch_loss: tuple = (0.0, 0)

    CHECKPOINTED = ("history", "best_value", "best_key", "best_epoch", "best_state", "bad_epochs")
