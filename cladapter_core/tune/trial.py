"""The objective and one trial.

A trial is one Staged Fine-Tuning run: stage 1 then stage 2 (`train.train`) in a
temporary folder with the values the sampler suggests for the parameters of
``tune.space``. Its objective is the validation macro-F1 of the model stage 2 keeps
(the best epoch by ``train.select_metric``). The pruner compares like with like: trials
report at the same fractions of their stage-1 schedule (1/4, 2/4, 3/4, the end: steps 0
to 3), whatever the searched stage lengths, so a 4-epoch trial at the bottom of its cosine
is never measured against a 12-epoch one at its top; stage-2 epochs are logged to MLflow
but never reported to the pruner (``full`` mode has one stage: its whole schedule is
reported). A trial that fails (diverged, out of memory, a cache that does not fit) ends
with the worst objective, 0, and the reason: the sampler learns to avoid its region and
the worker goes on. Trial outputs are deleted.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

from ..errors import CacheError, TrainingError, TuneError
from ..training import Callback
from .runs import TrialRun
from .space import format_value, suggest, trial_params

log = logging.getLogger(__name__)

OBJECTIVE = "val_macro_f1"
PRUNE_POINTS = 4        # stage 1 is reported at 1/4, 2/4, 3/4 and the end of its schedule
FAILED_VALUE = 0.0      # the objective a failed trial reports: the worst macro-F1
FAILED_ATTR = "failed"  # the user attribute holding why


def fraction_steps(epoch: int, epochs: int) -> list[int]:
    """The pruner's steps (0-based quarters of the schedule) that epoch `epoch` (1-based)
    of `epochs` is the first to complete: every trial reports each step once."""
    return [q - 1 for q in range(1, PRUNE_POINTS + 1) if math.ceil(q * epochs / PRUNE_POINTS) == epoch]


def _trial_failures() -> tuple:
    """What fails a trial, not the worker: divergence and the trainer's other refusals, a
    cache that does not fit, and running out of memory (host or GPU)."""
    import torch
    return (TrainingError, CacheError, MemoryError, torch.OutOfMemoryError)


class PruningCallback(Callback):
    """Trainer callback: logs each epoch (MLflow step = epochs of the trial so far) and,
    with `prune`, reports its validation macro-F1 to the trial at the stage's own epoch
    index and raises optuna.TrialPruned when the pruner says so (the exception leaves
    `train.train`, which ends the trial)."""

    def __init__(self, trial, offset: int, logger: TrialRun | None = None, counter: dict | None = None,
                 prune: bool = True, epochs: int = PRUNE_POINTS):
        self.trial, self.offset, self.logger, self.prune = trial, offset, logger, prune
        self.epochs = epochs  # of the reported stage: its quarters are the pruner's steps
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
        steps = fraction_steps(int(record["epoch"]), self.epochs) if self.prune else []
        for q in steps:
            self.trial.report(float(value), q)
        if steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at stage-1 epoch {record['epoch']} of {self.epochs} "
                                     f"({OBJECTIVE} {value:.4f})")


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
                 callbacks=[PruningCallback(trial, 0, logger, counter, epochs=s1_epochs)])
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


def rerun(params: dict, prepared_dir, values: dict, seeds: list[int], work_dir=None) -> list[float]:
    """The objective of `values` trained again, once per seed (stage 1 then stage 2, no
    pruner, nothing logged): what the search's single run of them is worth on other seeds."""
    from ..training import STAGED_MODES, train
    out = []
    for seed in seeds:
        p = trial_params(params, values)
        p["seed"] = seed
        tmp = Path(tempfile.mkdtemp(prefix=f"cladapter-rerun-s{seed}-", dir=work_dir))
        try:
            last = train(p, prepared_dir, tmp / "stage1", stage=1, resume=False, progress=False)
            last_dir = tmp / "stage1"
            if p["train"]["mode"] in STAGED_MODES and p["stage2"]["epochs"] > 0:
                last = train(p, prepared_dir, tmp / "stage2", stage=2, init_from=last_dir, resume=False,
                             progress=False)
                last_dir = tmp / "stage2"
            value = _selected_value(last_dir, last["stage"], last["best_epoch"])
        except _trial_failures() as e:
            log.warning("re-run of %s on seed %d failed (%s): it counts as %s", values, seed, e, FAILED_VALUE)
            value = FAILED_VALUE
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out.append(float(value if value is not None else FAILED_VALUE))
    return out


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
    except _trial_failures() as e:
        reason = f"{type(e).__name__}: {e}"[:500]
        trial.set_user_attr(FAILED_ATTR, reason)
        log.warning("trial %d failed (%s): it counts as %s so the sampler avoids its region",
                    trial.number, reason, FAILED_VALUE)
        value = FAILED_VALUE
        return value
    finally:
        trial.set_user_attr("epochs", counter["epochs"])
        logger.end(state, value, counter["epochs"])
        shutil.rmtree(tmp, ignore_errors=True)


def outcome(frozen) -> str:
    """COMPLETE, PRUNED, FAIL or RUNNING: a failed trial (recorded with the worst
    objective so the sampler learns from it) is FAIL here, whatever Optuna's state."""
    return "FAIL" if frozen.user_attrs.get(FAILED_ATTR) else frozen.state.name


def trial_line(study, frozen) -> str:
    """The line printed when a trial ends: its values, outcome and the best so far."""
    vals = " ".join(f"{k}={format_value(v)}" for k, v in frozen.params.items())
    epochs = frozen.user_attrs.get("epochs", "?")
    if frozen.user_attrs.get(FAILED_ATTR):
        return f"trial {frozen.number}: {vals} -> failed after {epochs} epochs ({frozen.user_attrs[FAILED_ATTR]})"
    if frozen.state.name == "COMPLETE":
        try:
            best = f", best so far {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = ""
        return f"trial {frozen.number}: {vals} -> val macro-F1 {frozen.value:.4f} in {epochs} epochs{best}"
    if frozen.state.name == "PRUNED":
        return f"trial {frozen.number}: {vals} -> pruned after {epochs} epochs"
    return f"trial {frozen.number}: {vals} -> {frozen.state.name.lower()}"
