"""How many processes the data side uses: the cores this process may run on, prepare's
decoding processes, and `train.num_workers: auto`.

The cores come from the CPU affinity mask and a container's CPU quota (cgroup v2
`cpu.max`, v1 `cpu.cfs_quota_us`): a pod limited to 4 CPUs on a 96-core node gets 4, not 96.
"""
from __future__ import annotations

import os
from pathlib import Path

from cladapter_core.settings import settings

CGROUP = Path("/sys/fs/cgroup")
PREPARE_MAX_WORKERS = 16   # decoding stops scaling before this on local disks
LOADER_MAX_WORKERS = 8     # per GPU: beyond it workers mostly wait for each other


def _cgroup_quota(root: Path = CGROUP) -> float | None:
    """CPUs a container may use (quota / period), or None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]          # cgroup v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())      # cgroup v1
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may use: its affinity mask, capped by a container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def prepare_workers(n_items: int, requested: int | None = None) -> int:
    """Processes prepare decodes with: `requested`, or one per available core (at most
    PREPARE_MAX_WORKERS); 1 (no pool) for a few hundred items, where starting the
    processes costs more than it gives."""
    if requested is not None:
        return max(1, int(requested))
    if n_items < 256:
        return 1
    return max(1, min(PREPARE_MAX_WORKERS, available_cores(), n_items // 64))


def loader_workers(value, device_type: str, local_world: int | None = None) -> int:
    """`train.num_workers` as a number of DataLoader worker processes.

    An int is used as given. "auto": on a GPU, the cores of this node shared by its
    training processes (LOCAL_WORLD_SIZE under torchrun), less one for the process that
    drives the GPU, at most LOADER_MAX_WORKERS and at least 1; on the CPU, where the model
    needs the same cores and the loader outruns it (benchmarks/loader.py), 0 below 8 cores
    per process and a quarter of them (at most 4) above, so loading overlaps the step.
    """
    if value != "auto":
        return int(value or 0)
    if local_world is None:
        local_world = settings().local_world_size
    per_process = max(1, available_cores() // max(1, local_world))
    if device_type == "cuda":
        return max(1, min(LOADER_MAX_WORKERS, per_process - 1))
    return 0 if per_process < 8 else min(4, per_process // 4)
