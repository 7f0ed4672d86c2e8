"""Where training runs: the device, and the process group under `torchrun` (DDP)."""
from __future__ import annotations

import os

import torch


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun; returns (rank, world size)."""
    rank, world, _ = dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives (barrier) use this rank's GPU
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info()[2])
    return torch.device("cpu")
