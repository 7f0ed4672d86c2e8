"""Tensor transforms for training and evaluation (torchvision.transforms.v2 on float tensors).

Inputs are float tensors in [0, 1] from `load_array`: (C, H, W) or, for 3D, (C, T, H, W).
Eval: resize to the model's input size, normalise. Train adds the paper's augmentations
(flips, brightness/contrast, shift/scale/rotate, each with its probability) from `train.augment`.
A 3D clip goes through as one (T, C, H, W) batch, so every frame gets the same random
parameters.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from cladapter_core.data.decoding import frame_indices
from cladapter_core.errors import ModelError

def augment_params(augment: dict | None) -> dict:
    """`train.augment` validated against its declaration (param_models.Augment), the
    declared defaults for what is not given; every problem at once (ParamsError)."""
    from cladapter_core.params import checked
    return checked({"train": {"augment": dict(augment or {})}}, "train")["train"]["augment"]


class BrightnessContrast(torch.nn.Module):
    """albumentations' RandomBrightnessContrast on [0, 1] data (the paper's code): with
    probability `p`, x * U(1 - contrast, 1 + contrast) + U(-brightness, brightness), clipped to
    [0, 1]; one draw per call, so the frames of a 3D clip change together."""

    def __init__(self, brightness: float, contrast: float, p: float):
        super().__init__()
        self.brightness, self.contrast, self.p = float(brightness), float(contrast), float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p < 1 and torch.rand(()) >= self.p:
            return x
        alpha = 1 + (torch.rand(()) * 2 - 1) * self.contrast
        beta = (torch.rand(()) * 2 - 1) * self.brightness
        return (x * alpha + beta).clamp(0, 1)


def _augmentations(aug: dict) -> list:
    """The paper's order (albumentations in its code): flips, brightness/contrast, then
    shift/scale/rotate with a black border, each with its probability."""
    steps = []
    if aug["hflip"]:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if aug["vflip"]:
        steps.append(v2.RandomVerticalFlip(p=0.5))
    if (aug["brightness"] or aug["contrast"]) and aug["color_p"]:
        steps.append(BrightnessContrast(aug["brightness"], aug["contrast"], aug["color_p"]))
    if (aug["rotate"] or aug["shift"] or aug["scale"]) and aug["affine_p"]:
        affine = v2.RandomAffine(
            degrees=float(aug["rotate"]),
            translate=(float(aug["shift"]), float(aug["shift"])) if aug["shift"] else None,
            scale=(1.0 - aug["scale"], 1.0 + aug["scale"]) if aug["scale"] else None,
            interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        steps.append(affine if aug["affine_p"] >= 1 else v2.RandomApply([affine], p=float(aug["affine_p"])))
    return steps


INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST}


class ImageTransform:
    """Resize (+ augment) + normalise; a module-level class so DataLoader workers can pickle it."""

    def __init__(self, input_size, mean, std, augment: list | None = None, interpolation: str = "bilinear",
                 intensity=None):
        self.is_3d = len(input_size) == 4
        # (lo, hi) the decoder maps to [0, 1] (config.json's `intensity`, found by prepare);
        # the loaders read it from here so that training, evaluation and serving agree.
        self.intensity = list(intensity) if intensity is not None else None
        if interpolation not in INTERPOLATIONS:
            raise ModelError(f"model config: interpolation {interpolation!r} is not one of "
                             f"{', '.join(INTERPOLATIONS)}")
        self.interpolation = interpolation
        self.channels = int(input_size[0])
        self.frames = int(input_size[1]) if self.is_3d else None
        self.size = [int(input_size[-2]), int(input_size[-1])]
        self.augment = v2.Compose(augment) if augment else None
        mean, std = list(mean), list(std)
        if len(mean) == 1:
            mean = mean * self.channels
        if len(std) == 1:
            std = std * self.channels
        if len(mean) != self.channels or len(std) != self.channels:
            raise ModelError(
                f"model config: mean/std have {len(mean)}/{len(std)} values for {self.channels} input channels"
            )
        self.normalize = v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_3d:
            if x.ndim != 4:
                raise ModelError(f"3D model expects a (C,T,H,W) clip, got shape {tuple(x.shape)}")
            t = x.shape[1]
            if t != self.frames:  # evenly spaced frames (repeats when the clip is short)
                x = x[:, frame_indices(t, self.frames)]
            x = x.permute(1, 0, 2, 3)  # (T,C,H,W): frames share the random parameters
        elif x.ndim != 3:
            raise ModelError(f"2D model expects a (C,H,W) image, got shape {tuple(x.shape)}")
        if list(x.shape[-2:]) != self.size:
            x = v2.functional.resize(x, self.size, interpolation=INTERPOLATIONS[self.interpolation], antialias=True)
        if self.augment is not None:
            x = self.augment(x)
        x = self.normalize(x)
        if self.is_3d:
            x = x.permute(1, 0, 2, 3)
        return x.contiguous()


def build_transform(model_config: dict, train: bool, augment: dict | None = None) -> ImageTransform:
    """Callable float tensor -> model input; `train` adds the augmentations in `augment`."""
    input_size = list(model_config["input_size"])
    if len(input_size) not in (3, 4):
        raise ModelError(f"model config input_size {input_size} is neither [C,H,W] nor [C,T,H,W]")
    if "is_3d" in model_config and bool(model_config["is_3d"]) != (len(input_size) == 4):
        raise ModelError(f"model config: is_3d={model_config['is_3d']} does not match input_size {input_size}")
    steps = _augmentations(augment_params(augment)) if train else None
    # The backbone's pretrained resize (config.json's interpolation: bicubic for most timm
    # weights), so the model sees images resized as in its pretraining.
    return ImageTransform(input_size, model_config["mean"], model_config["std"], steps,
                          model_config.get("interpolation") or "bilinear", model_config.get("intensity"))
