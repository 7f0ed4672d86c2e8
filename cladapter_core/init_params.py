"""`cladapter init`: look at a dataset and write a commented params.yaml for it.

It starts from the paper's recipe (the embedded defaults): a pretrained backbone at its native
input size with empty backbone_kwargs, flips, fresh augmentation; and fills in what the data
say: the source, a model and experiment name from the folder, `data.resize` when the images
are large, the intensity handling for 12/14-bit or float data, and warnings for tiny classes.
The file is a plain params.yaml: `dvc repro` runs on it unchanged.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from .data import intensity
from .data.decoding import decode
from .data.files import DecodeError
from .data.sources import list_source
from .errors import DataError, ParamsError
from .outputs import atomic_write
from .params import defaults, load_params

SAMPLE_PER_CLASS = 20   # files decoded per class to learn sizes, channels and range
TINY_CLASS = 10         # fewer images than this in a class gets a warning
LARGE_SIDE = 512        # smaller side above this: resize once at prepare time
RESIZE_TO = 256


def inspect(source) -> dict:
    """Classes, counts, sizes, channels, dtypes and intensity of a sample of the files."""
    source = Path(source)
    listing = list_source(source)
    if not listing.items:
        raise DataError(f"{source}: no image or volume files found (one sub-folder per class, or a CSV)")
    counts = Counter(it.label for it in listing.items)
    shapes, dtypes, stats = [], Counter(), []
    for label in listing.class_names:
        for it in [i for i in listing.items if i.label == label][:SAMPLE_PER_CLASS]:
            try:
                arr = decode(it.path)
            except (DecodeError, OSError):
                continue  # prepare reports unreadable files, with --skip-invalid
            shapes.append(arr.shape)
            dtypes[str(arr.dtype)] += 1
            stats.append({"dtype": str(arr.dtype), **intensity.file_stats(arr)})
    if not shapes:
        raise DataError(f"{source}: none of the sampled files could be decoded")
    sides = np.array([s[-3:-1] for s in shapes])
    return {"source": str(source), "name": _slug(source), "classes": listing.class_names,
            "counts": {c: counts.get(c, 0) for c in listing.class_names},
            "is_3d": len(shapes[0]) == 4, "size_min": sides.min(axis=0).tolist(),
            "size_max": sides.max(axis=0).tolist(), "channels": sorted({s[-1] for s in shapes}),
            "dtypes": dict(dtypes), "intensity": intensity.summarise(stats, "auto"),
            "sampled": len(shapes)}


def _slug(source: Path) -> str:
    name = (source.stem if source.is_file() else source.resolve().name) or "data"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "data"


def params_for(found: dict, backbone: str | None = None, pretrained: bool = True,
               weights: str | None = None, stage_epochs: tuple[int, int] | None = None) -> dict:
    """The paper's recipe with what the data say (a nested dict, checked by load_params)."""
    p = defaults()  # the embedded defaults are the paper's recipe
    p["data"] = {"source": found["source"], "intensity": "auto"}
    if min(found["size_min"]) > LARGE_SIDE:
        p["data"]["resize"] = RESIZE_TO
    m = p["model"]
    if backbone:
        m["backbone"] = backbone
    m["pretrained"], m["weights"] = bool(pretrained and not weights), weights
    if stage_epochs:
        p["stage1"]["epochs"], p["stage2"]["epochs"] = stage_epochs
    p["tracking"] = {"experiment": f"cladapter-{found['name']}"}
    p["register"] = {"model_name": f"{found['name']}-cladapter", "metric": "macro_f1", "auto_promote": False}
    return p


def warnings_for(found: dict) -> list[str]:
    out = [f"class {c!r} has only {n} image(s): few-shot at best; collect more or merge classes"
           for c, n in found["counts"].items() if n < TINY_CLASS]
    if found["intensity"].get("note"):
        out.append(found["intensity"]["note"])
    if len(found["channels"]) > 1:
        out.append(f"the files mix {found['channels']} channels: all are converted to the backbone's 3")
    return out


def render(found: dict, p: dict) -> str:
    """params.yaml text: a header of what was found, then the params with short comments."""
    inten = found["intensity"]
    head = [f"# params.yaml written by `cladapter init` for {found['source']}",
            f"# {len(found['classes'])} classes: " + ", ".join(f"{c} ({n})" for c, n in found["counts"].items()),
            f"# sampled {found['sampled']} files: sizes {found['size_min']} to {found['size_max']}, "
            f"channels {found['channels']}, dtypes {found['dtypes']}",
            f"# intensity: {inten.get('dtype')}, values {inten.get('min', 0):g} to {inten.get('max', 0):g}"
            + (f" ({inten['bits']}-bit)" if inten.get("bits") else "")
            + f"; data.intensity auto maps {inten['range'] or 'the type range'} to [0, 1]",
            "# Starting point: the paper's recipe (the embedded defaults). Every field is",
            "# documented in cladapter_core/param_models.py; run `dvc repro` to train, evaluate and register.",
            *[f"# WARNING: {w}" for w in warnings_for(found)], ""]
    order = ["seed", "data", "model", "train", "stage1", "stage2", "evaluate", "tracking", "register"]
    p = {k: p[k] for k in order if k in p} | {k: v for k, v in p.items() if k not in order}
    body = yaml.safe_dump(p, sort_keys=False, default_flow_style=False)
    return "\n".join(head) + "\n" + _commented(body)


COMMENTS = {  # (section, key) -> a short reason, appended to that line
    ("data", "intensity"): "auto: 12/14-bit by their bit depth, floats by their range (or percentiles, type)",
    ("data", "resize"): "the images are large: resized once at prepare time",
    ("model", "backbone"): "any timm name; torchvision video models for 3D",
    ("model", "backbone_kwargs"): "empty: the backbone's native input size",
    ("model", "pretrained"): "true: timm downloads the weights; offline: set weights",
    ("model", "num_centers"): "K; `cladapter sweep model.num_centers=5,10,20,30,50` shows the sensitivity",
    ("model", "rank"): "r, the paper's default",
    ("train", "lr"): "stage 1; stage 2 uses lr * stage2.lr_factor",
    ("train", "views"): "null: fresh augmentation every epoch",
    ("stage1", "epochs"): "backbone frozen: adapter + head",
    ("stage2", "epochs"): "everything trained at lr / 10",
    ("register", "auto_promote"): "false: promote by hand, `cladapter promote`",
}


def _commented(body: str) -> str:
    out, section = [], None
    for line in body.splitlines():
        if line and not line.startswith(" "):
            section = line.split(":")[0]
        key = line.strip().split(":")[0]
        note = COMMENTS.get((section, key))
        out.append(f"{line}  # {note}" if note and line.startswith(" ") else line)
    return "\n".join(out) + "\n"


def init(source, out="params.yaml", *, backbone: str | None = None, pretrained: bool = True,
         weights: str | None = None, stage_epochs=None, force: bool = False) -> dict:
    """Inspect `source`, write the params file `out` (refusing to overwrite unless `force`),
    check that it loads, and return what was found."""
    out = Path(out)
    if out.exists() and not force:
        raise ParamsError(f"{out} exists: pass --force to replace it (or --out another file)")
    found = inspect(source)
    partial = params_for(found, backbone, pretrained, weights, stage_epochs)
    check = out.with_name(f".{out.name}.check.yaml")
    try:  # every field, resolved and checked: DVC reads each section the stages name
        atomic_write(check, yaml.safe_dump(partial, sort_keys=False))
        full = load_params(check, use_best=False)
    finally:
        check.unlink(missing_ok=True)
    atomic_write(out, render(found, full))
    found["warnings"] = warnings_for(found)
    return found
