"""The plan of a stage (epochs, learning rate, what is frozen), the optimizer and the
learning-rate schedule (linear warm-up, then cosine decay).

Modes and stages:
- ``cla``   stage 1: backbone frozen, adapter + head trained at ``train.lr``;
            stage 2: starts from stage 1's model, everything trained at lr * stage2.lr_factor.
- ``lp-ft`` the same two stages without an adapter (linear probe, then full fine-tuning).
- ``linear`` one stage, backbone frozen, head on the pooled feature (stage1.epochs).
- ``linear-mean`` the same on the mean of the backbone's tokens (CLAdapter's pooling).
- ``full``  one stage, everything trained from the start (stage1.epochs + stage2.epochs):
            the backbone at its learning rate lr * stage2.lr_factor, like every stage 2, and
            the new, random head at the head's ``train.lr``, like every stage 1 (two
            parameter groups; one schedule scales both).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..model.config import FROZEN_MODES
from ..errors import TrainingError

STAGED_MODES = ("cla", "lp-ft")


# -- the plan, the optimizer and the schedule ------------------------------------------------
def stage_plan(params: dict, stage: int, mode: str) -> dict:
    """Epochs, learning rate and freezing for (mode, stage)."""
    lr, s1, s2 = params["train"]["lr"], params["stage1"]["epochs"], params["stage2"]["epochs"]
    factor = params["stage2"]["lr_factor"]
    if mode in STAGED_MODES:
        if stage == 1:
            return {"epochs": s1, "lr": lr, "freeze": True}
        return {"epochs": s2, "lr": lr * factor, "freeze": False}
    if mode in FROZEN_MODES:
        return {"epochs": s1, "lr": lr, "freeze": True}
    # full: everything trains from the start: the backbone at its learning rate, the same as
    # every stage 2's (a pretrained backbone at the head's lr would be unfair to it), the
    # random head at the head's, the same as every stage 1's (at lr / 10 it would be unfair
    # to the head).
    return {"epochs": s1 + s2, "lr": lr * factor, "head_lr": lr, "freeze": False}


def freezes_norm_stats(t: dict, world: int = 1) -> bool:
    """Whether a stage that trains the backbone keeps its BatchNorm running statistics
    (`train.batchnorm`; auto: frozen while the per-device batch is below
    `train.batchnorm_min_batch`, where batch statistics are too noisy to replace pretrained ones)."""
    if t["batchnorm"] == "auto":
        return math.ceil(t["batch_size"] / world) < t["batchnorm_min_batch"]
    return t["batchnorm"] == "frozen"


def warmup_steps(warmup_epochs: int, steps_per_epoch: int, total_steps: int, max_fraction: float) -> int:
    """Warm-up steps, capped to `max_fraction` of the stage: 2 warm-up epochs must not
    take all of a 2-epoch stage 2 (it would never decay)."""
    return min(warmup_epochs * steps_per_epoch, int(max_fraction * total_steps))


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to 0 (per optimizer step)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(params: dict, model: torch.nn.Module, lr: float, head_lr: float | None = None):
    """The optimizer over the trainable parameters at `lr`; with `head_lr`, two groups: the
    backbone's at `lr` (group 0) and everything else (adapter, head) at `head_lr`."""
    t = params["train"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: list = trainable
    if head_lr is not None:
        backbone = {id(p) for p in model.backbone.parameters()}
        groups = [{"params": [p for p in trainable if id(p) in backbone], "lr": lr},
                  {"params": [p for p in trainable if id(p) not in backbone], "lr": head_lr}]
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=t["weight_decay"])
    cls = torch.optim.AdamW if t["optimizer"] == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, weight_decay=t["weight_decay"])


def check_request(stage: int, mode: str, init_from, prepared_dir: Path) -> None:
    """The stage and mode make sense together, and the data is prepared."""
    if stage not in (1, 2):
        raise TrainingError(f"stage must be 1 or 2, got {stage!r}")
    if mode in STAGED_MODES and stage == 2 and not init_from:
        raise TrainingError(f"mode {mode!r} stage 2 needs the stage-1 model directory (--init-from)")
    if mode not in STAGED_MODES and stage == 2:
        raise TrainingError(f"mode {mode!r} has a single stage; run it with --stage 1")
    if not (prepared_dir / "manifest.csv").is_file():
        raise TrainingError(f"{prepared_dir}: not a prepared dataset (no manifest.csv); run `cladapter prepare`")
