"""The demo dataset: scikit-learn's bundled handwritten digits as an ImageFolder tree.

1797 real 8x8 scans (values 0..16, shipped inside scikit-learn, so no download) are
written as 8-bit grayscale PNGs `out_dir/<digit>/<index:04d>.png`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cladapter_core.outputs import atomic_dir


def _kept(targets, per_class: int | None) -> list[int]:
    """Indices of the scans written: all, or the first `per_class` of each digit."""
    if per_class is None:
        return list(range(len(targets)))
    seen: dict[int, int] = {}
    keep = []
    for i, t in enumerate(targets):
        seen[int(t)] = seen.get(int(t), 0) + 1
        if seen[int(t)] <= per_class:
            keep.append(i)
    return keep


def _expected_files(targets, keep) -> set[str]:
    return {f"{int(targets[i])}/{i:04d}.png" for i in keep}


def _existing_files(out_dir: Path) -> set[str]:
    return {p.relative_to(out_dir).as_posix() for p in out_dir.glob("*/*.png")}


def make_demo_data(out_dir, per_class: int | None = None) -> Path:
    """Write the digits demo data to `out_dir` (same bytes every time); return the path.
    `per_class`: only the first N scans of each digit (a small stand-in dataset).

    A complete existing tree is left as it is; anything else at `out_dir` is replaced
    atomically (built in a temp dir beside it, then renamed).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    digits = load_digits()
    keep = _kept(digits.target, per_class)
    expected = _expected_files(digits.target, keep)
    if out_dir.is_dir() and _existing_files(out_dir) == expected:
        return out_dir

    # 0..16 -> 0..255 so the PNGs look like ordinary 8-bit scans.
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    with atomic_dir(out_dir) as tmp:
        for i in keep:
            img, target = pixels[i], digits.target[i]
            folder = tmp / str(int(target))
            folder.mkdir(exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png", format="PNG")
    return out_dir
