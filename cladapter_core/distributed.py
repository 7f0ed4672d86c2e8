"""Where training runs: the device, and the process group under `torchrun` (DDP).

The device
    ``--device`` on the commands (or ``$CLADAPTER_DEVICE``, which the CLI sets so spawned
    workers follow it): ``auto`` (default), ``cpu``, ``cuda`` or ``cuda:N``. ``auto`` takes
    the GPU when torch can use it, else the CPU - except on a machine that has an NVIDIA GPU
    torch cannot use (device nodes ``/dev/nvidia*`` or ``nvidia-smi`` present, but
    ``torch.cuda.is_available()`` false: a driver older than this torch's CUDA, a CPU-only
    torch build, a container without the GPU runtime). There it stops with a `DeviceError`
    that names what was found and why torch cannot use it, instead of training on the CPU
    without a word; ``--device cpu`` is the deliberate choice. ``CUDA_VISIBLE_DEVICES=""``
    (or ``-1``) hides the GPUs on purpose and is taken as the CPU.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from .errors import CLAdapterError
from .settings import settings, var

DEVICE_ENV = var("device")  # CLADAPTER_DEVICE
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(CLAdapterError):
    """The device asked for (or found) cannot be used."""


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    s = settings()
    return s.rank, s.world_size, s.local_rank


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun; returns (rank, world size)."""
    rank, world, _ = dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives (barrier) use this rank's GPU
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


# -- is there a GPU that torch cannot use? -------------------------------------------------
def gpu_evidence(dev_dir: str | Path = "/dev", path: str | None = None) -> list[str]:
    """What says this machine has an NVIDIA GPU, whatever torch thinks: the device nodes
    ``<dev_dir>/nvidia<N>`` (and ``nvidiactl``) and an ``nvidia-smi`` on ``path`` (default
    ``$PATH``). Empty on a machine without one. Reads only the folder and the search path,
    so a test can hand it a folder holding a fake device node."""
    found = []
    dev = Path(dev_dir)
    try:
        nodes = sorted(p.name for p in dev.iterdir() if re.fullmatch(r"nvidia(\d+|ctl)", p.name))
    except OSError:
        nodes = []
    if nodes:
        found.append("device nodes " + ", ".join(str(dev / n) for n in nodes))
    smi = shutil.which("nvidia-smi", path=path if path is not None else settings().path)
    if smi:
        found.append(f"{smi}")
    return found


def _driver_report(path: str | None) -> str:
    """`nvidia-smi`'s own words on the GPU and driver (or why it failed), one line."""
    smi = shutil.which("nvidia-smi", path=path if path is not None else settings().path)
    if not smi:
        return ""
    try:
        r = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {type(e).__name__}: {e}"
    text = (r.stdout.strip() or r.stderr.strip()).splitlines()
    first = text[0].strip() if text else f"exit status {r.returncode}"
    return f"nvidia-smi: {first}" if r.returncode == 0 else f"nvidia-smi failed: {first}"


def cuda_status() -> tuple[bool, str]:
    """(torch can use CUDA, torch's reason when it cannot): the warning torch gives while
    initialising CUDA (e.g. "The NVIDIA driver on your system is too old"), or what its
    build says."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    if ok:
        return True, ""
    said = [str(w.message).strip() for w in caught if "cuda" in str(w.message).lower()]
    if said:
        return False, said[0].splitlines()[0]
    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is a CPU-only build"
    return False, f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no usable GPU"


def _hidden_on_purpose() -> bool:
    return settings().cuda_visible_devices in ("", "-1")


def unusable_gpu_message(evidence: list[str], reason: str, driver: str = "") -> str:
    found = "; ".join(evidence)
    return (f"this machine has an NVIDIA GPU ({found}) that torch cannot use: {reason}"
            + (f" [{driver}]" if driver else "") + ". Training would fall back to the CPU, many "
            f"times slower. Fix the GPU (a driver at least as new as torch's CUDA "
            f"{torch.version.cuda or '(none: install a CUDA build of torch)'}; see infra/README.md) "
            "or choose the CPU deliberately with --device cpu (CLADAPTER_DEVICE=cpu under "
            "dvc repro / KFP).")


# -- the device ---------------------------------------------------------------------------
def requested_device(requested: str | None = None) -> str:
    """The device asked for: ``requested``, else ``$CLADAPTER_DEVICE``, else ``auto``;
    DeviceError unless it is one of auto, cpu, cuda, cuda:N."""
    value = (requested or settings().device or "auto").strip().lower()
    if not _DEVICE.match(value):
        source = "--device" if requested else f"${DEVICE_ENV}"
        raise DeviceError(f"{source} {value!r}: expected {DEVICE_CHOICES}")
    return value


def pick_device(requested: str | None = None, *, dev_dir: str | Path = "/dev",
                path: str | None = None, cuda: tuple[bool, str] | None = None) -> torch.device:
    """The torch device to run on (see the module docstring). ``cuda`` (default: the GPU of
    this process's local rank) and ``cuda:N`` need torch to see a GPU; ``auto`` stops with a
    DeviceError where a GPU is present that torch cannot use (``gpu_evidence(dev_dir, path)``).
    ``cuda``: (available, reason) in place of asking torch (``cuda_status()``), for tests."""
    want = requested_device(requested)
    if want == "cpu":
        return torch.device("cpu")
    ok, reason = cuda if cuda is not None else cuda_status()
    if want.startswith("cuda"):
        if not ok:
            evidence = gpu_evidence(dev_dir, path)
            raise DeviceError(f"--device {want}: torch cannot use a GPU here: {reason}"
                              + (f" (found: {'; '.join(evidence)})" if evidence else
                                 " (no NVIDIA device nodes, no nvidia-smi)"))
        index = int(want.split(":")[1]) if ":" in want else dist_info()[2]
        if cuda is None and index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceError(f"--device {want}: this machine has {count} GPU(s) (cuda:0 .. cuda:{count - 1})")
        return torch.device("cuda", index)
    if ok:
        return torch.device("cuda", dist_info()[2])
    evidence = [] if _hidden_on_purpose() else gpu_evidence(dev_dir, path)
    if evidence:
        raise DeviceError(unusable_gpu_message(evidence, reason, _driver_report(path)))
    return torch.device("cpu")
