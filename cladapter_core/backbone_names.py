"""Which backbone names exist: timm's registry and torchvision's video models. A leaf, so
that validating params.yaml's `model.backbone` needs neither torch's models nor the model
package.

Where timm cannot be imported (the pipeline's light image has no torch, so no timm), the
names come from `timm_models.txt`: timm.list_models() of the pinned timm, committed
(`python -m cladapter_core.backbone_names --write` rewrites it after a timm upgrade;
tests/test_light_image.py fails while it is stale)."""
from __future__ import annotations

import difflib
import sys
from functools import lru_cache
from pathlib import Path

from .errors import ModelError

VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18", "swin3d_t", "swin3d_s", "swin3d_b", "s3d")
NAMES_FILE = Path(__file__).with_name("timm_models.txt")


def _timm():
    try:
        import timm
    except ImportError:  # the light image
        return None
    return timm


@lru_cache(maxsize=1)
def _listed() -> tuple[str, ...]:
    """The committed list: its first line names the timm version it was taken from."""
    return tuple(line for line in NAMES_FILE.read_text().splitlines()[1:] if line)


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    timm = _timm()
    return tuple(timm.list_models()) if timm else _listed()


def known_backbone(name: str) -> bool:
    if name in VIDEO_MODELS:
        return True
    timm = _timm()
    if timm is None:  # timm.is_model's rule: the architecture, any pretrained tag after "."
        return name.partition(".")[0] in _listed()
    try:
        return timm.is_model(name)
    except Exception:
        return False


def check_backbone_name(name: str) -> None:
    """Raise ModelError with close matches for an unknown backbone name."""
    if not isinstance(name, str) or not known_backbone(name):
        close = difflib.get_close_matches(str(name), _timm_names() + VIDEO_MODELS, n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise ModelError(f"unknown backbone {name!r} (not a timm model nor one of "
                         f"torchvision's video models {', '.join(VIDEO_MODELS)}){hint}")


def names_file_text() -> str:
    import timm
    return f"# timm {timm.__version__}: timm.list_models()\n" + "".join(f"{n}\n" for n in timm.list_models())


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    NAMES_FILE.write_text(names_file_text())
    print(f"wrote {NAMES_FILE}")
