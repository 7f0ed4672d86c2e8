"""The prepare stage: validate every file, split, detect leaks, write the prepared dir.

Output (written atomically): `manifest.csv` (path,label,split,sha256), `classes.json`,
`summary.json`, and with `data.resize` an `images/` folder of resized copies.
Same source, params and seed give byte-identical files.
"""

from __future__ import annotations

import csv
import gc
import logging
import multiprocessing
import os
import signal
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cladapter_core.outputs import atomic_dir, csv_path_cell, write_json
from cladapter_core.data import intensity
from cladapter_core.data.decoding import decode
from cladapter_core.data.files import DecodeError
from cladapter_core.data.images import pixel_hash, resize_array, write_copy
from cladapter_core.data.splits import assign_splits, few_shot, find_leaks
from cladapter_core.data.sources import SPLITS, Item, Listing, format_lines, list_source
from cladapter_core.data.workers import prepare_workers
from cladapter_core.console import progress
from cladapter_core.errors import DataError
from cladapter_core.identity import name_of
from cladapter_core.params import checked

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


# ---------------------------------------------------------------- decoding


def _copy_stems(items: list[Item], class_index: dict[str, int]) -> list[str]:
    """images/<label id>/<file stem>, made unique in listing order."""
    taken: set[str] = set()
    stems = []
    for it in items:
        base = f"images/{class_index[it.label]}/{Path(it.rel).stem or 'item'}"
        stem, n = base, 0
        while stem in taken:
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


def _check_one(task: tuple[str, int | None, str | None]) -> dict:
    """Decode one item: its pixel hash, dtype and size, or the reason it is unusable; with
    `resize`, also write the resized copy. Runs in prepare's worker processes."""
    path, resize, copy_stem = task
    try:
        arr = decode(path)
    except DecodeError as exc:
        return {"error": str(exc)}
    except OSError as exc:
        return {"error": f"cannot read: {exc}"}
    info = {"sha256": pixel_hash(arr), "dtype": _dtype_name(arr.dtype), "shape": list(arr.shape[:-1]),
            **intensity.file_stats(arr)}
    if resize:
        copy = write_copy(resize_array(arr, resize), Path(copy_stem))
        info["copy"] = copy.name
    return info


def _dtype_name(dtype: np.dtype) -> str:
    """str(dtype) ('uint8', '>u2'), remembered: numpy builds the text anew on every call."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


_DTYPE_NAMES: dict = {}


def _worker_init() -> None:
    """A decoding process: one torch thread (resizing), and it dies with prepare (Linux),
    so a killed prepare leaves no orphans behind."""
    import torch
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches prepare, which stops us
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextmanager
def _decoded(tasks, n: int, workers: int):
    """Results of `_check_one` over `tasks`, in order, from `workers` processes (forked, so
    they start in milliseconds) or from this one; only results are held, never pixels."""
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # resizing small images: threads cost more than they give
        try:
            yield map(_check_one, tasks)
        finally:
            torch.set_num_threads(threads)
        return
    # Objects that exist now stay out of the garbage collector's passes while the pool runs:
    # a pass writes to every object it visits, and each page written after the fork is
    # copied, in this process and in every worker.
    gc.freeze()
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
    try:
        yield pool.imap(_check_one, tasks, chunksize=max(1, min(256, n // (workers * 16))))
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        gc.unfreeze()


def _check_all(items: list[Item], resize: int | None, tmp: Path, stems: list[str] | None,
               workers: int | None = None) -> list[dict]:
    """Decode every item once, in one process per core; a progress bar with files/s.
    `stems`: where the resized copies go (with `resize`)."""
    n = len(items)
    workers = prepare_workers(n, workers)
    tasks = ((str(it.path), resize, str(tmp / stems[i]) if resize else None) for i, it in enumerate(items))
    t0 = time.perf_counter()
    info: list[dict] = []
    with _decoded(tasks, n, workers) as results, \
            progress(n, "prepare: decoding", unit="file") as bar:
        for i, inf in enumerate(results):
            if "copy" in inf:
                inf["copy"] = f"{stems[i].rsplit('/', 1)[0]}/{inf['copy']}"
            info.append(inf)
            bar.update(1)
    seconds = time.perf_counter() - t0
    line = (f"prepare: decoded {n} files in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} files/s, "
            f"{workers} process{'es' if workers > 1 else ''})")
    log.info(line)
    return info


# ---------------------------------------------------------------- the stage


def _rel_to(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return path.resolve().as_posix()


def prepare(source, out_dir, params: dict, workers: int | None = None, *, name: str | None = None) -> dict:
    """Validate, split and index `source` into `out_dir`; return the summary dict.

    `source`: ImageFolder directory, CSV manifest (path,label[,split|fold]), or class
    folders of .npy/.npz volumes or frame folders (3D). See docs/ARCHITECTURE.md.
    `name`: the dataset's name, which runs and experiments are named after (default: the
    source's folder, `identity.name_of`; a pipeline passes its dataset URI's).
    `workers`: decoding processes (default: one per available core, one for small
    sources); the outputs are the same for any number.
    """
    checked_params = checked(params, "seed", "data")
    dp, seed = checked_params["data"], checked_params["seed"]
    source, out_dir = Path(source), Path(out_dir)
    _check_no_overlap(source, out_dir)
    listing = list_source(source, allow_outside_root=dp["allow_outside_root"])
    is_3d = _check_listing(source, listing)
    class_index = {name: i for i, name in enumerate(listing.class_names)}

    items = sorted(listing.items, key=lambda it: it.rel)
    with atomic_dir(out_dir) as tmp:
        stems = _copy_stems(items, class_index) if dp["resize"] else None
        info = _check_all(items, dp["resize"], tmp, stems, workers)
        items, info, skipped = _leave_out_unusable(source, listing, items, info, dp["skip_invalid"])
        _check_trainable(source, listing, items, skipped)
        split, how = assign_splits(items, dp, seed, has_split=listing.has_split, has_fold=listing.has_fold)
        n_dropped = few_shot(items, split, dp["shots_per_class"], seed) if dp["shots_per_class"] else 0
        leaks, duplicates = find_leaks(items, split, info)
        if leaks:
            _warn_leaks(leaks)
        _write_manifest(tmp / "manifest.csv", items, info, split, class_index, copied=bool(dp["resize"]))
        write_json(tmp / "classes.json", listing.class_names)
        summary = {
            "format_version": FORMAT_VERSION,
            "dataset": name or name_of(source),
            "source": str(source),
            "source_kind": listing.kind,
            "source_root": str(listing.root),
            # Manifest paths are relative to `root`, itself relative to the prepared dir
            # ("." when the images were copied in, so the dir can move on its own).
            "root": "." if dp["resize"] else _rel_to(listing.root, out_dir.parent / out_dir.name),
            "copied": bool(dp["resize"]),
            "is_3d": is_3d,
            **_split_summary(listing.class_names, items, split, how, n_dropped),
            "leaks": leaks,
            "num_leaks": len(leaks),
            "duplicates_within_split": duplicates,
            "skipped": skipped,
            "ignored": listing.ignored,
            # data.allow_outside_root: where the files outside the root are (a pipeline's
            # Dataset artifact refuses those outside its dataset, copied or not)
            "outside_root": listing.outside,
            **_pixel_summary(info),
            "intensity": intensity.summarise(info, dp["intensity"]),
            "seed": seed,
            "params": dp,
        }
        write_json(tmp / "summary.json", summary)
        intensity.warn_if_small(summary["intensity"])
    log.info("prepared %s -> %s: %s, %d classes, %d leak(s), %d skipped",
             source, out_dir, summary["totals"], len(listing.class_names), len(leaks), len(skipped))
    return summary


# The steps of `prepare`, in order. A warning is attributed to prepare's caller
# (stacklevel=3: the step, prepare, its caller), as it was when prepare raised it itself.


def _check_no_overlap(source: Path, out_dir: Path) -> None:
    src_abs, out_abs = source.resolve(), out_dir.resolve()
    if out_abs == src_abs or src_abs.is_relative_to(out_abs) or (source.is_dir() and out_abs.is_relative_to(src_abs)):
        # Replacing out_dir would delete the source, or the output would be listed as a class.
        raise DataError(f"output {out_dir} and data source {source} overlap; write the prepared data elsewhere")


def _check_listing(source: Path, listing: Listing) -> bool:
    """One kind of data (2D or 3D) and at least two classes; returns is_3d."""
    kinds = {it.kind: it for it in listing.items}
    if len(kinds) > 1:
        raise DataError(
            f"{source}: mixes 2D images ({kinds['2d'].rel}) and 3D volumes/clips ({kinds['3d'].rel}); "
            "prepare them as separate datasets"
        )
    if len(listing.class_names) < 2:
        raise DataError(
            f"{source}: only one class ({', '.join(listing.class_names) or 'none'}) found; "
            "classification needs at least two"
        )
    return "3d" in kinds


def _leave_out_unusable(source: Path, listing: Listing, items: list[Item], info: list[dict],
                        skip_invalid: bool) -> tuple[list[Item], list[dict], list[dict]]:
    """Items and their decode info without the unusable files; raise unless skip_invalid.

    Returns (items, info, skipped) where `skipped` lists {path, reason} for summary.json.
    """
    bad = [(it, reason) for it, reason in listing.bad]
    bad += [(it, inf["error"]) for it, inf in zip(items, info) if "error" in inf]
    bad.sort(key=lambda b: b[0].rel)
    if bad and not skip_invalid:
        lines = [f"{it.path}: {reason}" for it, reason in bad]
        raise DataError(
            f"{len(bad)} unusable file(s) in {source}:\n" + format_lines(lines)
            + "\nFix or remove them, or set data.skip_invalid: true to leave them out."
        )
    skipped = [{"path": it.rel, "reason": reason} for it, reason in bad]
    if skipped:
        warnings.warn(f"prepare: left out {len(skipped)} unusable file(s) of {source} (see summary.json 'skipped')",
                      stacklevel=3)
    good = [(it, inf) for it, inf in zip(items, info) if "error" not in inf]
    return [g[0] for g in good], [g[1] for g in good], skipped


def _check_trainable(source: Path, listing: Listing, items: list[Item], skipped: list[dict]) -> None:
    """Every class must still have something to train on."""
    has_split = listing.has_split and not listing.has_fold
    trainable = Counter(it.label for it in items if not has_split or it.split == "train")
    if listing.has_fold:
        trainable = Counter(it.label for it in items if it.split != "test")
    lacking = [name for name in listing.class_names if trainable[name] == 0]
    if lacking:
        raise DataError(
            f"{source}: class(es) with no usable training file: {', '.join(lacking)}"
            + (" (after leaving out unusable files)" if skipped else "")
        )


def _warn_leaks(leaks: list[dict]) -> None:
    msg = (f"prepare: {len(leaks)} image(s) with identical pixels appear in more than one split "
           "(data leak; see summary.json 'leaks')")
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)


def _write_manifest(path: Path, items: list[Item], info: list[dict], split: dict[int, str],
                    class_index: dict[str, int], copied: bool) -> None:
    """manifest.csv: path,label,split,sha256; rows by split (train, val, test), then path. A
    path a spreadsheet would run as a formula (``=cmd|...``) is written as ``./=cmd|...``:
    the same file for every reader, inert text in a spreadsheet."""
    rows = []
    for i in sorted(split, key=lambda i: (SPLITS.index(split[i]), items[i].rel)):
        rel = info[i]["copy"] if copied else items[i].rel
        rows.append((csv_path_cell(rel), class_index[items[i].label], split[i], info[i]["sha256"]))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "split", "sha256"])
        writer.writerows(rows)


def _split_summary(class_names: list[str], items: list[Item], split: dict[int, str], how: dict,
                   n_dropped: int) -> dict:
    """The summary's classes and counts per split and class, and how the split was made."""
    counts = {s: {name: 0 for name in class_names} for s in SPLITS}
    for i, s in split.items():
        counts[s][items[i].label] += 1
    return {
        "classes": class_names,
        "num_classes": len(class_names),
        "counts": counts,
        "totals": {s: sum(counts[s].values()) for s in SPLITS},
        "split": how,
        "few_shot_dropped": n_dropped,
    }


def _pixel_summary(info: list[dict]) -> dict:
    """The summary's dtypes and sizes of the stored pixels."""
    shapes = np.array([inf["shape"] for inf in info]) if info else np.zeros((0, 2), int)
    return {
        "dtypes": dict(sorted(Counter(inf["dtype"] for inf in info).items())),
        # (T,)H,W of the stored pixels before any resize
        "size_min": shapes.min(axis=0).tolist() if len(shapes) else [],
        "size_max": shapes.max(axis=0).tolist() if len(shapes) else [],
    }
