"""Reading a prepared directory for training, evaluation and prediction."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cladapter_core.data.decoding import load_array, load_clip
from cladapter_core.data.files import frame_files, is_hidden, is_image_file, is_volume_file, kind_of
from cladapter_core.data.seeding import EpochBatchSampler, EpochTagged
from cladapter_core.data.sources import SPLITS, format_lines
from cladapter_core.data.transforms import build_transform
from cladapter_core.data.workers import loader_workers
from cladapter_core.errors import DataError
from cladapter_core.settings import settings

PREFETCH_FACTOR = 4  # batches each worker keeps ready (DataLoader's default is 2)


def _need(prepared_dir: Path, name: str) -> Path:
    path = Path(prepared_dir) / name
    if not path.is_file():
        raise DataError(f"{prepared_dir} is not a prepared data directory (no {name}); run `prepare` first")
    return path


def load_summary(prepared_dir) -> dict:
    path = _need(prepared_dir, "summary.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def load_classes(prepared_dir) -> list[str]:
    path = _need(prepared_dir, "classes.json")
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: expected a JSON list of class names")
    return classes


def is_3d(prepared_dir) -> bool:
    return bool(load_summary(prepared_dir).get("is_3d", False))


def data_root(prepared_dir) -> Path:
    """The folder manifest paths are relative to.

    Tried in order: `root` relative to the prepared dir ("." when images were copied in,
    so a copied prepared dir works anywhere), then `source_root` as given to `prepare`
    (relative to the working directory, e.g. the repo root).
    """
    prepared_dir = Path(prepared_dir)
    summary = load_summary(prepared_dir)
    candidates = [prepared_dir / summary.get("root", ".")]
    if summary.get("source_root") and not summary.get("copied"):
        candidates.append(Path(summary["source_root"]))
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise DataError(
        f"{prepared_dir}: the data it indexes is not found at "
        + " or ".join(str(c) for c in candidates)
        + " (moved or deleted?); prepare again, or prepare with data.resize to copy the images in"
    )


def read_manifest(prepared_dir, split: str | None = None) -> list[tuple[Path, int]]:
    """(absolute path, label id) rows of the manifest, in manifest order; one split or all."""
    if split is not None and split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    prepared_dir = Path(prepared_dir)
    path = _need(prepared_dir, "manifest.csv")
    root = data_root(prepared_dir).resolve()
    n_classes = len(load_classes(prepared_dir))
    rows: list[tuple[Path, int]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "label", "split"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: lacks column(s) {', '.join(sorted(missing))}")
        for line_no, row in enumerate(reader, start=2):
            if split is not None and row["split"] != split:
                continue
            try:
                label = int(row["label"])
            except ValueError:
                raise DataError(f"{path}: line {line_no}: label {row['label']!r} is not a class index") from None
            if not 0 <= label < n_classes:
                raise DataError(f"{path}: line {line_no}: label {label} is outside 0..{n_classes - 1}")
            rows.append((Path(os.path.normpath(root / row["path"])), label))
    return rows


def manifest_sha256(prepared_dir) -> dict[Path, str]:
    """{absolute path: sha256} from manifest.csv: the content identity of every file, as
    prepare computed it (paths as `read_manifest` gives them)."""
    prepared_dir = Path(prepared_dir)
    path = _need(prepared_dir, "manifest.csv")
    root = data_root(prepared_dir).resolve()
    with open(path, newline="", encoding="utf-8") as fh:
        return {Path(os.path.normpath(root / row["path"])): row.get("sha256") or ""
                for row in csv.DictReader(fh)}


class ManifestDataset(Dataset):
    """`(tensor, label)` pairs of one split of a prepared directory."""

    def __init__(self, prepared_dir, split: str | None, transform=None, in_chans: int = 3):
        self.prepared_dir = Path(prepared_dir)
        self.split = split
        self.items = read_manifest(prepared_dir, split)
        self.classes = load_classes(prepared_dir)
        self.targets = [label for _, label in self.items]
        self.transform = transform
        self.in_chans = in_chans

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        # One torch thread for one item's small ops: with more, each op waits for threads
        # the cores cannot give on a busy machine, 5 to 10x slower (benchmarks/loader.py).
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            # A clip: only the frames the model's transform takes are read (load_clip).
            frames = getattr(self.transform, "frames", None)
            intensity = getattr(self.transform, "intensity", None)  # the dataset's real range
            x = (load_clip(path, self.in_chans, frames, intensity) if frames
                 else load_array(path, self.in_chans, intensity))
            if self.transform is not None:
                x = self.transform(x)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        return x, label


def loader_options(num_workers, device_type: str) -> dict:
    """DataLoader settings that keep a GPU fed: `train.num_workers` worker processes ("auto":
    from the cores and the device, data/workers.py), kept alive across epochs, each with
    PREFETCH_FACTOR batches ready, in pinned memory when the batches go to a GPU."""
    workers = loader_workers(num_workers, device_type)
    options = {"num_workers": workers, "pin_memory": device_type == "cuda"}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR)
    return options


def epoch_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers, device, seed: int,
                 decode_on_device: bool | None = None):
    """The trainer's loader: `sampler`'s batches of a SeededDataset, the epoch sent with
    every index so persistent workers augment as one process does. Its own generator:
    creating an iterator must not draw from the global RNG, which a checkpoint restores.
    `decode_on_device` (default: the environment variable CLADAPTER_GPU_DECODE=1) on a
    CUDA device: JPEGs decoded by nvjpeg and augmented on the GPU (data/device_decode.py);
    2D data only."""
    device = torch.device(device)
    if decode_on_device is None:
        decode_on_device = settings().gpu_decode  # CLADAPTER_GPU_DECODE=1: nvjpeg on the GPU
    options = loader_options(num_workers, device.type)
    if decode_on_device and device.type == "cuda" and not getattr(dataset.dataset.transform, "is_3d", True):
        from cladapter_core.data.device_decode import DeviceDecodeLoader
        return DeviceDecodeLoader(dataset, sampler, options, device, seed)
    return DataLoader(dataset, batch_sampler=EpochTagged(sampler), generator=torch.Generator().manual_seed(seed),
                      **options)


def make_loader(prepared_dir, split: str, model_config: dict, train: bool, params: dict,
                batch_size: int | None = None) -> DataLoader:
    """A DataLoader over one split; train=True augments and shuffles (seeded from params['seed']).

    An empty split (e.g. val with data.val_fraction 0) gives an empty loader; callers check
    `len(loader.dataset)`.
    """
    tp = params.get("train", {}) or {}
    data_is_3d = is_3d(prepared_dir)
    model_is_3d = len(model_config["input_size"]) == 4
    if data_is_3d != model_is_3d:
        raise DataError(
            f"{prepared_dir} holds {'3D' if data_is_3d else '2D'} data but the model takes "
            f"{'3D clips' if model_is_3d else '2D images'} (input_size {list(model_config['input_size'])})"
        )
    transform = build_transform(model_config, train, tp.get("augment"))
    dataset = ManifestDataset(prepared_dir, split, transform, in_chans=int(model_config["input_size"][0]))
    generator = None
    if train:
        generator = torch.Generator()
        generator.manual_seed(int(params.get("seed", 0)))
    return DataLoader(
        dataset,
        batch_size=int(batch_size or tp.get("batch_size", 32)),
        shuffle=train,
        generator=generator,  # also seeds the workers, so their augmentations repeat
        drop_last=False,
        **loader_options(tp.get("num_workers", 0), "cuda" if torch.cuda.is_available() else "cpu"),
    )


def walk_inputs(path: Path, want_3d: bool) -> list[Path]:
    """Supported inputs under a folder, sorted. For 3D a folder of frames is one clip."""
    if want_3d and frame_files(path) and not any(p.is_dir() and not is_hidden(p) for p in path.iterdir()):
        return [path]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if want_3d:
            if here != path and not dirnames and frame_files(here):
                found.append(here)
            found += [here / f for f in sorted(filenames) if not f.startswith(".") and is_volume_file(Path(f))]
        else:
            found += [here / f for f in sorted(filenames) if not f.startswith(".") and is_image_file(Path(f))]
    return found




def list_inputs(paths, model_config: dict) -> list[Path]:
    """Files and folders -> the input files (or 3D frame folders), folders walked, in
    order, each once; every unusable path is named in one DataError."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    want_3d = len(model_config["input_size"]) == 4
    files: list[Path] = []
    problems: list[str] = []
    for raw in paths or []:
        p = Path(raw)
        if not p.exists():
            problems.append(f"{p}: does not exist")
        elif p.is_dir():
            found = walk_inputs(p, want_3d)
            if not found:
                problems.append(f"{p}: holds no supported {'3D volumes/clips' if want_3d else 'images'}")
            files += found
        elif (kind_of(p) == "3d") != want_3d or kind_of(p) is None:
            problems.append(f"{p}: not a {'3D volume (.npy/.npz)' if want_3d else 'supported image'} file")
        else:
            files.append(p)
    if problems:
        raise DataError("cannot use the inputs:\n" + format_lines(problems))
    if not files:
        raise DataError("no inputs given")
    seen, unique = set(), []
    for f in files:
        key = os.path.normpath(os.path.abspath(f))
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def load_inputs(paths, model_config: dict) -> tuple[torch.Tensor, list[Path]]:
    """Files and folders -> (batch through the eval transform, the input paths in batch order)."""
    files = list_inputs(paths, model_config)
    transform = build_transform(model_config, train=False)
    in_chans = int(model_config["input_size"][0])
    tensors, errors = [], []
    for f in files:
        try:
            tensors.append(transform(load_array(f, in_chans, transform.intensity)))
        except DataError as exc:
            errors.append(str(exc))
    if errors:
        raise DataError(f"{len(errors)} input(s) cannot be decoded:\n" + format_lines(errors))
    return torch.stack(tensors), files
