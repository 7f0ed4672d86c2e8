"""What the trainer tells its callbacks, typed (as Lightning's `Callback`): a base class
whose hooks do nothing, and the dicts each hook receives.

A callback subclasses `Callback` and overrides the hooks it needs:
- `on_train_start(info)`: the run is built (model, data, optimizer), before the first epoch.
- `on_epoch_end(record)`: after each epoch's validation; may raise `StopTraining` to end
  training after this epoch, or any other exception to stop it (optuna.TrialPruned).
- `on_train_end(summary)`: the model directory is written.
- `on_exception(error)`: training failed (or was preempted, or a callback raised): the
  last chance to send what the callback holds; the error propagates afterwards.
"""
from __future__ import annotations

from typing import Any, TypedDict


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch."""


class TrainInfo(TypedDict):
    """What `on_train_start` receives."""
    params: dict
    stage: int
    mode: str
    out_dir: str
    prepared_dir: str
    param_report: dict
    epochs: int
    lr: float
    device: str
    world_size: int
    batchnorm: str | None


class EpochRecord(TypedDict, total=False):
    """What `on_epoch_end` receives (also a row of history.json): the epoch's training
    loss and learning rate, and with a validation split `val_loss` and `val_<metric>`."""
    stage: int
    epoch: int
    train_loss: float
    lr: float
    seconds: float
    val_loss: float


class Callback:
    """Base class of training callbacks: every hook is a no-op."""

    def on_train_start(self, info: TrainInfo) -> None:
        pass

    def on_epoch_end(self, record: EpochRecord) -> None:
        pass

    def on_train_end(self, summary: dict[str, Any]) -> None:
        pass

    def on_exception(self, error: BaseException) -> None:
        pass
