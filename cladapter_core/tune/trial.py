"""The objective and one trial.

A trial is one Staged Fine-Tuning run: stage 1 then stage 2 (`train.train`) in a
temporary folder with the values the sampler suggests for the parameters of
``tune.space``. Its objective is the validation macro-F1 of the model stage 2 keeps
(the best epoch by ``train.select_metric``). The pruner compares like with like: it
sees the stage-1 epochs only, each at its stage-1 epoch index (0-based), so step 5 is
the sixth stage-1 epoch in every trial, whatever the searched stage lengths; stage-2
epochs are logged to MLflow but never reported to the pruner (``full`` mode has one
stage: all its epochs are reported). Trial outputs are deleted.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..training import Callback
from ..errors import TuneError
from .runs import TrialRun
from .space import format_value, suggest, trial_params

OBJECTIVE = "val_macro_f1"


class PruningCallback(Callback):
    """Trainer callback: logs each epoch (MLflow step = epochs of the trial so far) and,
    with `prune`, reports its validation macro-F1 to the trial at the stage's own epoch
    index and raises optuna.TrialPruned when the pruner says so (the exception leaves
    `train.train`, which ends the trial)."""

    def __init__(self, trial, offset: int, logger: TrialRun | None = None, counter: dict | None = None,
                 prune: bool = True):
        self.trial, self.offset, self.logger, self.prune = trial, offset, logger, prune
        self.counter = counter if counter is not None else {"epochs": 0}

    def on_epoch_end(self, record: dict) -> None:
        import optuna
        step = self.offset + int(record["epoch"]) - 1
        self.counter["epochs"] += 1
        self.trial.set_user_attr("epochs", self.counter["epochs"])
        if self.logger is not None:
            self.logger.log({k: v for k, v in record.items() if k not in ("epoch",)}, step=step + 1)
        value = record.get(OBJECTIVE)
        if value is None:
            raise TuneError("the validation split is empty: tuning needs validation macro-F1 "
                            "(prepare the data with data.val_fraction > 0)")
        if not self.prune:
            return
        self.trial.report(float(value), int(record["epoch"]) - 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at stage-1 epoch {record['epoch']} ({OBJECTIVE} {value:.4f})")


def _selected_value(model_dir: Path, stage: int, best_epoch: int) -> float | None:
    """Validation macro-F1 of the epoch the trainer kept."""
    history = json.loads((model_dir / "history.json").read_text())
    for r in history:
        if r["stage"] == stage and r["epoch"] == best_epoch:
            return r.get(OBJECTIVE)
    return None


def _train_stages(trial, p: dict, prepared_dir, tmp: Path, logger: TrialRun, counter: dict) -> float:
    """Stage 1, then stage 2 for staged modes with stage-2 epochs; the kept model's value."""
    from ..training import STAGED_MODES, train
    mode = p["train"]["mode"]
    s1_epochs = p["stage1"]["epochs"] + (p["stage2"]["epochs"] if mode == "full" else 0)
    last = train(p, prepared_dir, tmp / "stage1", stage=1, mode=mode, resume=False, progress=False,
                 callbacks=[PruningCallback(trial, 0, logger, counter)])
    last_dir = tmp / "stage1"
    if mode in STAGED_MODES and p["stage2"]["epochs"] > 0:
        last = train(p, prepared_dir, tmp / "stage2", stage=2, mode=mode, init_from=tmp / "stage1",
                     resume=False, progress=False,
                     callbacks=[PruningCallback(trial, s1_epochs, logger, counter, prune=False)])
        last_dir = tmp / "stage2"
    value = _selected_value(last_dir, last["stage"], last["best_epoch"])
    if value is None:
        raise TuneError(f"trial {trial.number}: no validation macro-F1 was recorded")
    return float(value)


def run_trial(trial, params: dict, prepared_dir, space: list[dict], logger: TrialRun | None = None,
              work_dir=None) -> float:
    """One Staged Fine-Tuning run with the trial's values; returns its objective."""
    import optuna

    values = suggest(trial, space, params)
    p = trial_params(params, values)
    counter = {"epochs": 0}
    logger = logger or TrialRun(None, {})
    logger.start(trial, p, values, prepared_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"cladapter-trial{trial.number}-", dir=work_dir))
    state, value = "FAIL", None
    try:
        value = _train_stages(trial, p, prepared_dir, tmp, logger, counter)
        state = "COMPLETE"
        return value
    except optuna.TrialPruned:
        state = "PRUNED"
        raise
    finally:
        trial.set_user_attr("epochs", counter["epochs"])
        logger.end(state, value, counter["epochs"])
        shutil.rmtree(tmp, ignore_errors=True)


def trial_line(study, frozen) -> str:
    """The line printed when a trial ends: its values, outcome and the best so far."""
    vals = " ".join(f"{k}={format_value(v)}" for k, v in frozen.params.items())
    epochs = frozen.user_attrs.get("epochs", "?")
    if frozen.state.name == "COMPLETE":
        try:
            best = f", best so far {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = ""
        return f"trial {frozen.number}: {vals} -> val macro-F1 {frozen.value:.4f} in {epochs} epochs{best}"
    if frozen.state.name == "PRUNED":
        return f"trial {frozen.number}: {vals} -> pruned after {epochs} epochs"
    return f"trial {frozen.number}: {vals} -> {frozen.state.name.lower()}"
