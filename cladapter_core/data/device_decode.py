"""JPEGs decoded on the training device (nvjpeg on a GPU) instead of in the loader's workers.

With CLADAPTER_GPU_DECODE=1 in the environment and a CUDA device, the workers only read files: a plain JPEG
(8-bit, grey or YCbCr, no EXIF) reaches the training process as its bytes, a batch of them
is decoded at once by `torchvision.io.decode_jpeg(..., device=...)` (nvjpeg on CUDA), and
each image goes through the same transform with the same per-item seed (data/seeding.py)
on that device. Anything else (PNG, TIFF, EXIF orientation, CMYK) is decoded and
transformed in the workers as before. On the CPU the same code decodes with
libjpeg-turbo and gives the workers' batches bit for bit (tests/test_scale.py); whether
nvjpeg is the faster path on a given GPU node is what benchmarks/gpu_check.py measures.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cladapter_core.data.images import _plain_jpeg, _read_bytes
from cladapter_core.data.seeding import EpochBatchSampler, EpochTagged, SeededDataset, item_seed

JPEG_EXTS = (".jpg", ".jpeg")


def _device_decodable(data: bytearray) -> bool:
    """A JPEG the device decodes as the CPU path does: plain, and no EXIF (nvjpeg does not
    apply the orientation)."""
    return _plain_jpeg(data) and data.find(b"Exif\x00\x00", 0, 65536) < 0


class EncodedItems(Dataset):
    """What a worker hands over: ("jpeg", bytes) for the device to decode, or ("ready",
    tensor) decoded and transformed here; the label; the (epoch, index) key."""

    def __init__(self, seeded: SeededDataset):
        self.seeded = seeded

    def __len__(self):
        return len(self.seeded)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (self.seeded.epoch, key)
        path, label = self.seeded.dataset.items[index]
        if path.suffix.lower() in JPEG_EXTS:
            data = _read_bytes(path)
            if _device_decodable(data):
                return ("jpeg", torch.frombuffer(data, dtype=torch.uint8)), label, (epoch, index)
        x, label = self.seeded[(epoch, index)]
        return ("ready", x), label, (epoch, index)


def _collate(batch):
    entries, labels, keys = zip(*batch)
    return list(entries), torch.tensor(labels), list(keys)


def _unit_float(img: torch.Tensor, in_chans: int, intensity=None) -> torch.Tensor:
    """(C, H, W) uint8 -> float in [0, 1] with `in_chans` channels, as decoding.load_array
    (the same float32 steps as images.to_unit_float, `intensity` included)."""
    if intensity is not None:
        lo, hi = float(intensity[0]), float(intensity[1])
        x = img.to(torch.float32).sub_(float(np.float32(lo))).div_(float(np.float32(max(hi - lo, 1e-12))))
        x = x.clamp_(0.0, 1.0)
    else:
        x = img.to(torch.float32) / 255.0
    if x.shape[0] == in_chans:
        return x
    if x.shape[0] == 1:
        return x.repeat(in_chans, 1, 1)
    return x.mean(dim=0, keepdim=True)  # RGB -> grey


class DeviceDecodeLoader:
    """The trainer's loader with JPEG decoding and augmentation on `device`: iterates like
    data.epoch_loader's DataLoader, yielding (x, y) already on the device."""

    def __init__(self, seeded: SeededDataset, sampler: EpochBatchSampler, options: dict, device, seed: int):
        self.seeded, self.sampler, self.device, self.seed = seeded, sampler, torch.device(device), seed
        base = seeded.dataset
        self.transform, self.in_chans = base.transform, base.in_chans
        self.loader = DataLoader(EncodedItems(seeded), batch_sampler=EpochTagged(sampler), collate_fn=_collate,
                                 generator=torch.Generator().manual_seed(seed), **options)

    def __len__(self):
        return len(self.sampler)

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        if not encoded:
            return []
        from torchvision.io import decode_jpeg
        with warnings.catch_warnings():  # torchvision's image I/O warns it is deprecated, every call
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(encoded, device=self.device)

    def _transformed(self, img: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # as SeededDataset: the same ops, the same numbers
        try:
            with torch.random.fork_rng(devices=[]):  # the CPU RNG draws the random parameters
                torch.manual_seed(item_seed(self.seeded.seed, *key))
                return self.transform(_unit_float(img, self.in_chans, getattr(self.transform, "intensity", None)))
        finally:
            torch.set_num_threads(threads)

    def __iter__(self):
        for entries, y, keys in self.loader:
            decoded = iter(self._decode([value for kind, value in entries if kind == "jpeg"]))
            xs = [self._transformed(next(decoded), key) if kind == "jpeg" else value.to(self.device, non_blocking=True)
                  for (kind, value), key in zip(entries, keys)]
            yield torch.stack(xs), y.to(self.device, non_blocking=True)
