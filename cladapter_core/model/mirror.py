"""The install's mirror of pretrained backbone weights, for clusters without internet.

`$CLADAPTER_WEIGHTS_MIRROR` (an s3:// prefix or a folder) holds one file per backbone:
`<mirror>/<backbone name>.safetensors` (the name with its pretrained tag, e.g.
`vit_base_patch16_clip_224.laion2b.safetensors`): the backbone module's own state dict
(written by `backbones.mirror_weights`).
With it set, `model.pretrained: true` without `model.weights` reads the weights from
there and never downloads. `cladapter mirror-weights NAME --to MIRROR` writes a file: on a
machine with internet it downloads the weights as timm/torchvision would (`pretrained`),
or it takes a checkpoint you already have (`--from-file`).
"""
from __future__ import annotations

from .. import storage
from ..errors import ModelError
from ..settings import settings, var


def mirror_uri(name: str, mirror: str) -> str:
    """Where the mirror `mirror` keeps the weights of backbone `name`."""
    if not name or "/" in name or name.startswith("."):
        raise ModelError(f"backbone {name!r}: not a name the weights mirror can hold")
    return f"{str(mirror).rstrip('/')}/{name}.safetensors"


def mirrored_weights(name: str) -> str | None:
    """The mirror's file for `name` when the install has a mirror (None without one); a
    ModelError that says how to fill it when the file is not there."""
    mirror = settings().weights_mirror.strip()
    if not mirror:
        return None
    uri = mirror_uri(name, mirror)
    try:
        found = storage.exists(uri)
    except storage.StorageError as e:
        raise ModelError(f"pretrained weights of {name}: cannot read the weights mirror "
                         f"{var('weights_mirror')}={mirror} ({e.reason})") from e
    if not found:
        raise ModelError(f"pretrained weights of {name}: not in the weights mirror ({uri} does not exist). "
                         f"Mirror them on a machine with internet: cladapter mirror-weights {name} --to {mirror}; "
                         f"or set model.weights, or unset {var('weights_mirror')} to download them")
    return uri

