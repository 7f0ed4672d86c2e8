"""Which backbone names exist: timm's registry and torchvision's video models. A leaf, so
that validating params.yaml's `model.backbone` needs neither torch's models nor the model
package."""
from __future__ import annotations

import difflib
from functools import lru_cache

from .errors import ModelError

VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18", "swin3d_t", "swin3d_s", "swin3d_b", "s3d")


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm
    return tuple(timm.list_models())


def known_backbone(name: str) -> bool:
    import timm
    if name in VIDEO_MODELS:
        return True
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
