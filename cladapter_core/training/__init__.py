"""Training: the staged trainer (`trainer`), its stage plan and schedule (`schedule`), the
validation pass (`validation`), the callbacks it calls (`callbacks`), its resume checkpoint
(`resume`) and the stage-1 feature cache of a frozen backbone (`feature_cache`)."""
from __future__ import annotations

from ..errors import Preempted, TrainingError
from .callbacks import Callback, EpochRecord, StopTraining, TrainInfo
from .resume import CKPT_NAME, checkpoint_dir
from .schedule import STAGED_MODES, freezes_norm_stats, lr_lambda, make_optimizer, stage_plan, warmup_steps
from .trainer import Trainer, train
from .validation import run_eval

__all__ = ["CKPT_NAME", "Callback", "EpochRecord", "Preempted", "STAGED_MODES", "StopTraining", "TrainInfo",
           "Trainer", "TrainingError", "checkpoint_dir", "freezes_norm_stats", "lr_lambda", "make_optimizer",
           "run_eval", "stage_plan", "train", "warmup_steps"]
