"""Backbones behind one interface: every model's features become tokens (B, N, D).

- timm ViT-like (ViT, DeiT, CLIP-ViT, EVA, ...): patch tokens, every prefix token
  (class, distillation, registers) dropped.
- timm CNNs in NCHW (ResNet, ConvNeXt, EfficientNet): (B, C, h, w) -> (B, h*w, C).
- timm models with NHWC output (Swin, some ConvNeXt variants): (B, h, w, C) -> (B, h*w, C).
- torchvision video models (r3d_18, mc3_18, r2plus1d_18, swin3d_*, s3d):
  (B, C, t, h, w) -> (B, t*h*w, C).
"""
from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import storage
from ..errors import ModelError
from ..backbone_names import VIDEO_MODELS, check_backbone_name
from ..settings import exported
from .mirror import mirror_uri, mirrored_weights
from .weights import load_into, read_state_dict, strip_model_prefix

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
class Backbone(nn.Module):
    """A pretrained feature extractor with `forward_tokens` and `forward_pooled`.

    Attributes: `name`, `model` (the timm/torchvision module), `dim` (token width D),
    `is_3d`, `data_config` (input_size, mean, std, interpolation).
    """

    def __init__(self, name: str, pretrained: bool = False, weights: str | None = None,
                 input_size: int | list[int] | None = None, **kwargs):
        super().__init__()
        check_backbone_name(name)
        self.name, self.kwargs = name, dict(kwargs)
        self.is_3d = name in VIDEO_MODELS
        if pretrained and not weights:  # an install without internet: its mirror's file
            weights = mirrored_weights(name)
        pretrained = pretrained and not weights  # given weights replace the download
        if self.is_3d:
            self._build_video(name, pretrained, kwargs)
        else:
            self._build_timm(name, pretrained, kwargs)
            self._check_native_size(bool(pretrained or weights), explicit=input_size is not None)
        if input_size is not None:
            self._set_input_size(input_size)
        if weights:
            state = read_state_dict(weights)
            if not self.is_3d:
                state = self._timm_filtered(state, str(weights))
            load_into(self.model, state, source=str(weights), ignore=self._classifier_keys())

    # -- construction ------------------------------------------------------------------
    def _build_timm(self, name, pretrained, kwargs):
        import timm
        try:
            # num_classes=0: timm replaces its classifier by an identity.
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        except TypeError as e:
            raise ModelError(f"backbone {name!r} rejected its options {kwargs}: {e}") from e
        self.dim = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
        cfg = timm.data.resolve_model_data_config(self.model)
        input_size = list(cfg["input_size"])
        self.native_input_size = list(input_size)  # what the pretrained weights expect
        # timm keeps the pretrained cfg's 224 when img_size/in_chans are overridden.
        img = kwargs.get("img_size")
        if img is not None:
            input_size[1:] = [img, img] if isinstance(img, int) else list(img)
        if "in_chans" in kwargs:
            input_size[0] = int(kwargs["in_chans"])
        self.data_config = {"input_size": input_size, "mean": list(cfg["mean"]),
                            "std": list(cfg["std"]),
                            "interpolation": cfg.get("interpolation", "bicubic")}
        if len(self.data_config["mean"]) != input_size[0]:  # e.g. in_chans=1 on RGB stats
            m, s = self.data_config["mean"], self.data_config["std"]
            self.data_config["mean"] = [sum(m) / len(m)] * input_size[0]
            self.data_config["std"] = [sum(s) / len(s)] * input_size[0]

    def _check_native_size(self, pretrained_weights: bool, explicit: bool) -> None:
        """`img_size` in backbone_kwargs that differs from the size the weights were trained
        at: refused with pretrained weights (kwargs carry over when only model.backbone is
        changed, the demo's 32 px onto a 224 px ViT), unless model.input_size states it on
        purpose; said out loud for randomly initialised backbones."""
        img = self.kwargs.get("img_size")
        native = list(self.native_input_size[1:])
        got = self.data_config["input_size"][1:]
        if img is None or got == native:
            return
        what = (f"{self.name} would take {got[0]}x{got[1]} images (model.backbone_kwargs.img_size="
                f"{img}), its pretrained configuration is {native[0]}x{native[1]}")
        if pretrained_weights and not explicit:
            raise ModelError(f"{what}: pretrained weights at another size lose accuracy. Remove img_size "
                             "from model.backbone_kwargs (they carry over when only model.backbone "
                             f"changes), or set model.input_size: {got[0]} to choose this size on purpose")
        if not explicit:
            warnings.warn(what, stacklevel=3)

    def _build_video(self, name, pretrained, kwargs):
        from torchvision.models import video
        ctor = getattr(video, name)
        try:
            self.model = ctor(weights="DEFAULT" if pretrained else None, **kwargs)
        except TypeError as e:
            raise ModelError(f"backbone {name!r} rejected its options {kwargs}: {e}") from e
        if hasattr(self.model, "fc"):               # VideoResNet
            self.dim = self.model.fc.in_features
            self.model.fc = nn.Identity()
        elif hasattr(self.model, "head"):           # Swin3D
            self.dim = self.model.head.in_features
            self.model.head = nn.Identity()
        else:                                       # S3D: classifier is a conv block
            self.dim = 1024
            self.model.classifier = nn.Identity()
        self.num_prefix_tokens = 0
        frames, size = (16, 224) if name.startswith(("swin3d", "s3d")) else (16, 112)
        self.data_config = {"input_size": [3, frames, size, size], "mean": list(KINETICS_MEAN),
                            "std": list(KINETICS_STD), "interpolation": "bilinear"}

    def _set_input_size(self, size) -> None:
        """What the data pipeline resizes to: H (square), [H, W], or [T, H, W] for 3D.
        CNNs take any size; for ViTs pass timm's `img_size` too."""
        size = [size] if isinstance(size, int) else list(size)
        want = 3 if self.is_3d else 2
        if len(size) == 1:
            size = size * 2 if not self.is_3d else self.data_config["input_size"][1:2] + size * 2
        if len(size) != want or not all(isinstance(v, int) and v > 0 for v in size):
            raise ModelError(f"input_size for {self.name} must be {'[T, H, W]' if self.is_3d else 'H or [H, W]'} "
                             f"of positive integers, got {size}")
        self.data_config["input_size"] = self.data_config["input_size"][:1] + size

    def _timm_filtered(self, state: dict, source: str) -> dict:
        """Local or S3 weights through timm's own conversion for this architecture, as
        `pretrained=True` does: position embeddings (and a Swin's bias tables) resampled to this
        img_size, the original repositories' key names mapped. Architectures without one
        (ResNets) take the weights as they are."""
        module = sys.modules.get(type(self.model).__module__)
        convert = getattr(module, "checkpoint_filter_fn", None)
        if convert is None:
            return state
        state = strip_model_prefix(self.model.state_dict(), state)
        try:
            return convert(state, self.model)
        except Exception as e:  # noqa: BLE001 - timm raises what it meets; load_into words it
            warnings.warn(f"{source}: timm's checkpoint conversion for {self.name} failed ({type(e).__name__}: "
                          f"{e}); loading it as it is", stacklevel=3)
            return state

    def _classifier_keys(self) -> tuple[str, ...]:
        """Prefixes of the original classifier, absent here and ignored in checkpoints."""
        if self.is_3d:
            return ("fc.", "head.", "classifier.")
        clf = getattr(self.model, "pretrained_cfg", {}).get("classifier") or "head"
        clf = clf if isinstance(clf, (list, tuple)) else [clf]
        return tuple(f"{c}." for c in clf)

    # -- features ----------------------------------------------------------------------
    def _video_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if hasattr(m, "stem"):  # VideoResNet
            x = m.stem(x)
            x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
            return x.flatten(2).transpose(1, 2)                    # (B, t*h*w, C)
        if hasattr(m, "patch_embed"):  # Swin3D: features come out (B, T, H, W, C)
            x = m.norm(m.features(m.pos_drop(m.patch_embed(x))))
            return x.flatten(1, 3)
        x = m.features(x)                                          # S3D: (B, C, t, h, w)
        return x.flatten(2).transpose(1, 2)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) from an input batch."""
        if self.is_3d:
            if x.dim() != 5:
                raise ModelError(f"video backbone {self.name} expects (B, C, T, H, W), got {tuple(x.shape)}")
            return self._video_features(x)
        f = self.model.forward_features(x)
        if f.dim() == 3:                                           # ViT-like
            return f[:, self.num_prefix_tokens:]
        if f.dim() == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC" or (
                    f.shape[1] != self.dim and f.shape[-1] == self.dim):
                return f.flatten(1, 2)                              # NHWC
            return f.flatten(2).transpose(1, 2)                     # NCHW
        raise ModelError(f"backbone {self.name} gave features of unexpected shape {tuple(f.shape)}")

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's usual pooled feature (B, D): class token for ViTs, average pool for CNNs."""
        if self.is_3d:
            return self._video_features(x).mean(dim=1)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None,
                    **kwargs) -> Backbone:
    return Backbone(name, pretrained=pretrained, weights=weights, **kwargs)


def mirror_weights(name: str, dest: str, source: str | None = None, **kwargs) -> str:
    """Write the weights of backbone `name` to the mirror `dest`: downloaded as timm or
    torchvision would (`source` None), or taken from the checkpoint `source` (converted
    as `model.weights` would be). Returns the file's URI."""
    from safetensors.torch import save_file

    uri = mirror_uri(name, dest)
    with exported(weights_mirror=None):  # read from the source, never from the mirror being filled
        backbone = Backbone(name, pretrained=source is None, weights=source, **kwargs)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="cladapter-mirror-") as tmp:
        path = Path(tmp) / f"{name}.safetensors"
        save_file(state, str(path), metadata={"backbone": name})
        try:
            storage.upload(path, uri)
        except storage.StorageError as e:
            raise ModelError(f"cannot write {uri}: {e.reason}") from e
    return uri

