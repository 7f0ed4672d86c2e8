"""Training: the staged trainer (`trainer`), its stage plan and schedule (`schedule`), the
validation pass (`validation`), the callbacks it calls (`callbacks`), its resume checkpoint
(`resume`) and the stage-1 feature cache of a frozen backbone (`feature_cache`)."""
from __future__ import annotations

import importlib

from ..errors import Preempted, TrainingError
from .callbacks import Callback, EpochRecord, StopTraining, TrainInfo

# Loaded on first use: they need torch, and tracking imports `Callback` from here in the
# pipeline's light image, which has none.
_LAZY = {"CKPT_NAME": "resume", "checkpoint_dir": "resume", "STAGED_MODES": "schedule",
         "freezes_norm_stats": "schedule", "lr_lambda": "schedule", "make_optimizer": "schedule",
         "stage_plan": "schedule", "warmup_steps": "schedule", "Trainer": "trainer", "train": "trainer",
         "run_eval": "validation"}

__all__ = ["CKPT_NAME", "Callback", "EpochRecord", "Preempted", "STAGED_MODES", "StopTraining", "TrainInfo",
           "Trainer", "TrainingError", "checkpoint_dir", "freezes_norm_stats", "lr_lambda", "make_optimizer",
           "run_eval", "stage_plan", "train", "warmup_steps"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once: later lookups (and monkeypatching) see a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
