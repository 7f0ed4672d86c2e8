"""The demo dataset: scikit-learn's bundled handwritten digits as an ImageFolder tree.

1797 real 8x8 scans (values 0..16, shipped inside scikit-learn, so no download) are
written as 8-bit grayscale PNGs `out_dir/<digit>/<index:04d>.png`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cladapter_core.outputs import atomic_dir


def _expected_files(targets) -> set[str]:
    return {f"{int(t)}/{i:04d}.png" for i, t in enumerate(targets)}


def _existing_files(out_dir: Path) -> set[str]:
    return {p.relative_to(out_dir).as_posix() for p in out_dir.glob("*/*.png")}


def make_demo_data(out_dir) -> Path:
    """Write the digits demo data to `out_dir` (same bytes every time); return the path.

    A complete existing tree is left as it is; anything else at `out_dir` is replaced
    atomically (built in a temp dir beside it, then renamed).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    out_dir = Path(out_dir)
    digits = load_digits()
    expected = _expected_files(digits.target)
    if out_dir.is_dir() and _existing_files(out_dir) == expected:
        return out_dir

    # 0..16 -> 0..255 so the PNGs look like ordinary 8-bit scans.
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    with atomic_dir(out_dir) as tmp:
        for i, (img, target) in enumerate(zip(pixels, digits.target)):
            folder = tmp / str(int(target))
            folder.mkdir(exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png", format="PNG")
    return out_dir
