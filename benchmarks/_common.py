"""Shared helpers of the benchmark scripts: device, timing, memory, FLOPs, tables, JSON.

Every script compares variants measured in the same run (interleaved, so a busy machine
slows them alike) and prints ratios; absolute times depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Dense bf16 peak of common accelerators (TFLOP/s), for the model FLOP utilisation estimate.
# Override with CLADAPTER_PEAK_TFLOPS when the GPU is not listed or clocks differ.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0,
                    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "V100": 125.0,
                    "T4": 65.0}


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--json", default=None, help="where to write the JSON results "
                   "(default benchmarks/results/<script>.json)")
    return p


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_info(device: torch.device) -> dict:
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["note"] = f"ran on GPU ({info['name']}) with bf16 autocast"
    else:
        info["name"] = platform.processor() or platform.machine()
        try:
            info["load_average_1min"] = os.getloadavg()[0]
        except OSError:
            pass
        info["note"] = (f"ran on CPU ({torch.get_num_threads()} threads, float32); no GPU here, so no "
                        "images/s at bf16, peak GPU memory or MFU figures")
    return info


def banner(title: str, device: torch.device) -> dict:
    info = device_info(device)
    print(f"# {title}")
    print(f"# {info['note']}")
    if "load_average_1min" in info:
        print(f"# load average {info['load_average_1min']:.1f} on {info['cpu_count']} cores: absolute times "
              "are noisy; compare the ratios, measured interleaved in this run")
    return info


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, warmup: int, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each call of every function; the functions take turns (round robin)
    so that load from other processes falls on all of them alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def count_flops(fn) -> int:
    """FLOPs of one call (matmuls and convolutions, as torch's FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_tflops(device: torch.device) -> float | None:
    env = os.environ.get("CLADAPTER_PEAK_TFLOPS")
    if env:
        return float(env)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def mfu(flops_per_call: int, seconds: float, device: torch.device) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the device's dense bf16 peak."""
    peak = peak_tflops(device)
    if not peak or not seconds:
        return None
    return flops_per_call / seconds / (peak * 1e12)


def cuda_peak_memory(fn, device: torch.device) -> int:
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def cpu_peak_memory(fn) -> int:
    """Peak bytes the CPU allocator held during `fn`, beyond what was allocated before.

    The profiler with profile_memory=True reports every CPU allocation and free with the
    running total allocated since profiling began; the maximum of that total is the peak
    of new memory (tensors, autograd's saved tensors, gradients, temporaries)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"].get("Total Allocated", 0) for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max(totals, default=0)


def peak_memory(fn, device: torch.device) -> int:
    return cuda_peak_memory(fn, device) if device.type == "cuda" else cpu_peak_memory(fn)


def fmt_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table (the README copies these lines)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(name: str, payload: dict, path: str | None = None) -> Path:
    """Write results atomically to `path` or benchmarks/results/<name>.json."""
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print(f"# results: {out}")
    return out


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], REPO) if sys.argv else "?"
    return " ".join(["python", rel, *sys.argv[1:]])
