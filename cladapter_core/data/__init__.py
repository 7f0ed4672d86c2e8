"""Data side of CLAdapter: demo data, `prepare` (validate, split, manifest), loading.

Modules: `demo` (digits demo tree), `sources` (listing ImageFolder trees / CSV
manifests), `images` (decoding 2D/3D files), `prepare` (the prepare stage),
`transforms` (train/eval tensor transforms), `datasets` (manifest reading, Dataset,
DataLoader, predict inputs), `seeding` (per-item seeding and
the epoch batch sampler, shared by the trainer and the feature cache), `workers` (cores,
prepare's processes, `train.num_workers: auto`).
"""

from cladapter_core.data.datasets import (
    ManifestDataset,
    data_root,
    epoch_loader,
    is_3d,
    load_classes,
    list_inputs,
    load_inputs,
    load_summary,
    loader_options,
    make_loader,
    read_manifest,
    walk_inputs,
)
from cladapter_core.data.demo import make_demo_data
from cladapter_core.data.intensity import intensity_range
from cladapter_core.data.decoding import decode, load_array
from cladapter_core.data.files import IMAGE_EXTS, VOLUME_EXTS
from cladapter_core.data.images import pixel_hash
from cladapter_core.data.prepare import prepare
from cladapter_core.data.transforms import augment_params, build_transform
from cladapter_core.data.workers import available_cores, loader_workers

__all__ = [
    "IMAGE_EXTS",
    "VOLUME_EXTS",
    "ManifestDataset",
    "augment_params",
    "available_cores",
    "build_transform",
    "data_root",
    "decode",
    "epoch_loader",
    "intensity_range",
    "is_3d",
    "load_array",
    "load_classes",
    "list_inputs",
    "load_inputs",
    "load_summary",
    "loader_options",
    "loader_workers",
    "make_demo_data",
    "make_loader",
    "pixel_hash",
    "prepare",
    "read_manifest",
    "walk_inputs",
]
