"""Data side of CLAdapter: demo data, `prepare` (validate, split, manifest), loading.

Modules: `demo` (digits demo tree), `sources` (listing ImageFolder trees / CSV
manifests), `images` (decoding 2D/3D files), `prepare` (the prepare stage),
`transforms` (train/eval tensor transforms), `datasets` (manifest reading, Dataset,
DataLoader, predict inputs), `seeding` (per-item seeding and
the epoch batch sampler, shared by the trainer and the feature cache).
"""

from cladapter_core.data.datasets import (
    ManifestDataset,
    data_root,
    is_3d,
    load_classes,
    list_inputs,
    load_inputs,
    load_summary,
    make_loader,
    read_manifest,
    walk_inputs,
)
from cladapter_core.data.demo import make_demo_data
from cladapter_core.data.images import IMAGE_EXTS, VOLUME_EXTS, decode, load_array, pixel_hash
from cladapter_core.data.prepare import DATA_DEFAULTS, data_params, prepare
from cladapter_core.data.transforms import AUGMENT_DEFAULTS, augment_params, build_transform

__all__ = [
    "AUGMENT_DEFAULTS",
    "DATA_DEFAULTS",
    "IMAGE_EXTS",
    "VOLUME_EXTS",
    "ManifestDataset",
    "augment_params",
    "build_transform",
    "data_params",
    "data_root",
    "decode",
    "is_3d",
    "load_array",
    "load_classes",
    "list_inputs",
    "load_inputs",
    "load_summary",
    "make_demo_data",
    "make_loader",
    "pixel_hash",
    "prepare",
    "read_manifest",
    "walk_inputs",
]
