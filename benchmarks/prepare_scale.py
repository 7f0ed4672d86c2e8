"""Benchmark: `prepare` at scale against one core's decode floor, in one run.

Writes `--files` JPEG photos (`--size` px, `--classes` class folders, like a user's
ImageFolder tree; 20,000 by default), reads them once so the page cache holds them, then
takes turns (`--rounds` times, each variant first in turn, medians reported) between four
variants:

- floor A, as the issue measured it: one process reads each file, sha256-hashes its bytes
  and decodes it with PIL into a numpy array, in a plain loop;
- floor B, the least work that gives prepare's manifest: one process reads each file,
  decodes it with libjpeg-turbo (torchvision.io, the decoder prepare uses for JPEG) and
  sha256-hashes the decoded pixels (the manifest's sha256 is a pixel hash, so identical
  pixels in PNG and TIFF are found as leaks), in a plain loop;
- `prepare` with 1 process;
- `prepare` with its default processes (one per available core).

Each is measured in wall-clock seconds and in CPU seconds (user + system, its worker
processes included), so the per-core comparison holds on a machine shared with others:
files per CPU-second is files/s per core used; "floor / this" is the median over rounds of
the ratio of CPU seconds within one round. Target: prepare within 1.3x of the floor
per core (floor B: the floor of prepare's work; floor A is printed beside it). Also
printed: prepare's resident memory (a fresh process, after the imports and at the peak).

    python benchmarks/prepare_scale.py [--files 20000 --size 256 --classes 4 --rounds 5]
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common as C
import numpy as np

warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io.image")

from cladapter_core.data import prepare
from cladapter_core.data.workers import available_cores, prepare_workers
from cladapter_core.params import load_params


# -- the data --------------------------------------------------------------------------------
def _write_photos(job: tuple[str, int, int, int, int]) -> None:
    """Photos start..stop-1: smooth colour fields with texture (compress like photos)."""
    from PIL import Image
    out, start, stop, size, classes = job
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        c = i % classes
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        noise = rng.normal(0, 0.06, (size // 4 + 1, size // 4 + 1, 3)).astype(np.float32)
        noise = noise.repeat(4, 0).repeat(4, 1)[:size, :size]
        wave = 0.2 * np.sin((xx * (c + 2) + yy * (i % 7)) * 6)[..., None]
        arr = np.clip(np.stack([xx, yy, 1 - xx], -1) * tint + noise + wave, 0, 1)
        folder = Path(out) / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((arr * 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def make_jpegs(out: Path, n: int, size: int, classes: int) -> list[Path]:
    """n JPEG photos in `classes` class folders, written by one process per core."""
    step = 500
    jobs = [(str(out), s, min(n, s + step), size, classes) for s in range(0, n, step)]
    with multiprocessing.get_context("fork").Pool(available_cores()) as pool:
        pool.map(_write_photos, jobs)
    return sorted(out.rglob("*.jpg"))


# -- what is timed ---------------------------------------------------------------------------
def floor_a(files: list[Path]) -> None:
    """The issue's floor: read, sha256 the file's bytes, decode with PIL into an array."""
    from PIL import Image
    for f in files:
        data = f.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            np.asarray(img)


def floor_b(files: list[Path]) -> None:
    """The floor of prepare's work: read, decode with libjpeg-turbo, sha256 the pixels."""
    import torch
    from torchvision.io import decode_jpeg
    for f in files:
        pixels = decode_jpeg(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8),
                             apply_exif_orientation=True)
        hashlib.sha256(pixels.permute(1, 2, 0).contiguous().numpy()).hexdigest()


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children (prepare's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_seconds() - c0


def memory_mib(src: Path, out: Path) -> dict:
    """`prepare` run alone in a fresh process: its resident memory after the imports (torch
    alone takes hundreds of MiB) and at the peak (workers included), and the peak of the
    Python objects it allocates (tracemalloc): the listing and one small record per file."""
    code = ("import resource, sys, tracemalloc; from cladapter_core.data import prepare; "
            "from cladapter_core.params import load_params; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True); "
            "tracemalloc.start(); prepare(sys.argv[1], sys.argv[2], load_params(None, [])); "
            "print(tracemalloc.get_traced_memory()[1], flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(out)], cwd=C.REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    base = float(proc.stdout.readline())
    python_peak = float(proc.stdout.readline() or "nan")
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("prepare failed in the memory run")
    return {"rss_after_imports": base / 1024, "rss_peak": usage.ru_maxrss / 1024,
            "python_objects_peak": python_peak / 2**20}


# -- the run ---------------------------------------------------------------------------------
def run(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cladapter-bench-prepare-"))
    src = work / "photos"
    t0 = time.time()
    files = make_jpegs(src, args.files, args.size, args.classes) if not src.is_dir() else sorted(src.rglob("*.jpg"))
    print(f"# {len(files)} JPEGs of {args.size} px in {args.classes} classes, "
          f"{sum(f.stat().st_size for f in files) / 2**20:.0f} MiB, written in {time.time() - t0:.0f} s")
    floor_a(files)  # page cache warm for every variant alike
    params = load_params(None, [])
    workers = args.workers or prepare_workers(len(files))
    variants = {"floor A: read, sha256 of the file, PIL decode (1 process)": lambda: floor_a(files),
                "floor B: read, libjpeg-turbo decode, sha256 of the pixels (1 process)": lambda: floor_b(files),
                "prepare, 1 process": lambda: prepare(src, work / "out1", params, workers=1),
                f"prepare, {workers} processes": lambda: prepare(src, work / "outN", params, workers=workers)}
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each goes first in turn
            times[name].append(measure(variants[name]))
        print(f"# round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in times.items()))
    same = (work / "out1" / "manifest.csv").read_bytes() == (work / "outN" / "manifest.csv").read_bytes()
    memory = memory_mib(src, work / "out-mem") if args.memory else None
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return {"files": len(files), "size": args.size, "workers": workers, "cores": available_cores(),
            "times": times, "same_manifest": same, "memory_mib": memory}


def per_round_ratio(cpu: list[float], floor_cpu: list[float]) -> float:
    """Median over rounds of this variant's CPU seconds over the floor's in the same round:
    a neighbour's burst slows both of a round alike, so the ratio moves less than either."""
    return C.median([c / f for c, f in zip(cpu, floor_cpu)])


def report(res: dict) -> list[dict]:
    n = res["files"]
    rows, out = [], []
    cpus = {name: [t[1] for t in ts] for name, ts in res["times"].items()}
    floor_a_cpu, floor_b_cpu = list(cpus.values())[:2]
    for name, ts in res["times"].items():
        wall, cpu = C.median([t[0] for t in ts]), C.median(cpus[name])
        out.append({"variant": name, "wall_s": wall, "cpu_s": cpu, "files_per_s": n / wall,
                    "cores_used": cpu / wall, "files_per_s_per_core": n / cpu,  # files per CPU-second
                    "floor_a_over_this_per_core": per_round_ratio(cpus[name], floor_a_cpu),
                    "floor_b_over_this_per_core": per_round_ratio(cpus[name], floor_b_cpu)})
    for r in out:
        rows.append([r["variant"], f"{r['files_per_s']:.0f}", f"{r['cores_used']:.2f}",
                     f"{r['files_per_s_per_core']:.0f}", f"{r['floor_b_over_this_per_core']:.2f}x",
                     f"{r['floor_a_over_this_per_core']:.2f}x"])
    print(C.fmt_table(["variant", "files/s", "cores used (CPU s / wall s)", "files/s per core",
                       "floor B / this, per core", "floor A / this, per core"], rows))
    worst = max(r["floor_b_over_this_per_core"] for r in out[2:])
    worst_a = max(r["floor_a_over_this_per_core"] for r in out[2:])
    print(f"# prepare per core: within {worst:.2f}x of floor B (target <= 1.3x: "
          f"{'met' if worst <= 1.3 else 'NOT met'}), {worst_a:.2f}x of floor A; same manifest with 1 "
          f"and {res['workers']} processes: {res['same_manifest']}")
    m = res["memory_mib"]
    if m is not None:
        print(f"# memory of a fresh prepare over {n} files: resident {m['rss_after_imports']:.0f} MiB after "
              f"the imports, {m['rss_peak']:.0f} MiB at the peak; Python objects at the peak "
              f"{m['python_objects_peak']:.1f} MiB ({m['python_objects_peak'] * 2**20 / n:.0f} bytes per file; "
              "no pixels are kept)")
    return out


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=20000)
    p.add_argument("--size", type=int, default=256, help="photo width and height, px")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="turns each variant takes (median reported)")
    p.add_argument("--workers", type=int, default=None, help="prepare's processes (default: its own choice)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory run")
    p.add_argument("--workdir", default=None, help="keep the photos and outputs here (reused when present)")
    args = p.parse_args()
    info = C.banner(f"prepare at scale: {args.files} JPEGs of {args.size} px vs one core's decode floor",
                    C.pick_device("cpu"))
    res = run(args)
    rows = report(res)
    C.write_json("prepare_scale", {"command": C.command_line(), "device": info, "args": vars(args),
                                   "results": rows, "raw": res}, args.json)


if __name__ == "__main__":
    main()
