"""The staged trainer: CLAdapter's Staged Fine-Tuning and the baselines through one loop
(the modes and their stages: `schedule.py`).

`train()` is the entry point (CLI, DVC, KFP, tune, compare). It runs a `Trainer`, whose
steps read like the recipe: build the run (model, data, precision), maybe the stage-1
feature cache, the optimizer and schedule, resume, the epoch loop (train an epoch,
validate, select the best epoch, checkpoint, callbacks), then finalize (save, summary).

Determinism: the order of the samples and every augmentation are functions of (seed,
epoch, index) alone (`data/seeding.py`), so a run resumed from a checkpoint, at an epoch
boundary or in the middle of one, ends with the same weights as one never interrupted (on
the CPU, with num_workers=0 or more), and DDP ranks see disjoint slices of the
single-process batches.

Callbacks are `callbacks.Callback`s: `on_train_start(info)`, `on_epoch_end(record)` (may
raise `StopTraining`), `on_train_end(summary)`, and `on_exception(error)` when training
fails, so what a callback holds (metrics not yet sent) is not lost with the error.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import resume as ckpt
from .callbacks import Callback, StopTraining  # noqa: F401  (StopTraining: public here too)
from .resume import CKPT_NAME, checkpoint_dir  # noqa: F401  (public: components use them)
from ..data.seeding import EpochBatchSampler, SeededDataset, seed_everything
from ..distributed import init_distributed, pick_device
from ..errors import Preempted, TrainingError
from ..evaluation.metrics import classification_metrics
from ..console import progress
from ..model import batchnorm_layers, build_model, load_model, save_model
from ..params import model_kwargs
from .resume import LoopState
from .schedule import check_request, freezes_norm_stats, lr_lambda, make_optimizer, stage_plan, warmup_steps
from .validation import _autocast, run_eval

log = logging.getLogger(__name__)

# -- the entry point -------------------------------------------------------------------------
def train(params: dict, prepared_dir, out_dir, stage: int = 1, mode: str | None = None,
          init_from=None, resume: bool = True, callbacks=(), progress: bool = True,
          max_steps: int | None = None, device: str | None = None) -> dict:
    """Train one stage and write the model directory `out_dir` (model.safetensors,
    config.json, history.json, train_summary.json) atomically; return the summary.

    stage 2 of a staged mode needs `init_from`, the stage-1 model directory.
    `max_steps` stops after that many optimizer steps as if killed (tests, fault drills).
    `device`: auto (default: ``$CLADAPTER_DEVICE``, else auto), cpu, cuda or cuda:N
    (`distributed.pick_device`: a GPU torch cannot use stops training unless cpu is asked).
    """
    trainer = Trainer(params, prepared_dir, out_dir, stage=stage, mode=mode, init_from=init_from,
                      callbacks=callbacks, progress=progress, max_steps=max_steps, device=device)
    return trainer.run(resume=resume)


class Trainer:
    """One call of `train`: a stage of one mode on one prepared dataset."""

    def __init__(self, params: dict, prepared_dir, out_dir, *, stage: int = 1, mode: str | None = None,
                 init_from=None, callbacks=(), progress: bool = True, max_steps: int | None = None,
                 device: str | None = None):
        self.params, self.t = params, params["train"]
        self.requested_device = device
        self.prepared_dir, self.out_dir = Path(prepared_dir), Path(out_dir)
        self.stage, self.mode = stage, mode or params["train"]["mode"]
        self.init_from, self.callbacks = init_from, list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TrainingError(f"callback {cb!r} is not a cladapter_core.training.Callback")
        self.progress, self.max_steps = progress, max_steps
        check_request(stage, self.mode, init_from, self.prepared_dir)
        self.plan = stage_plan(params, stage, self.mode)
        self.seed = params["seed"] + (1000 if stage == 2 else 0)
        self.ckpt_path = checkpoint_dir(self.out_dir) / CKPT_NAME
        self.state = LoopState()
        self.preempted = False  # set by SIGTERM: checkpoint and stop at the next safe point

    def run(self, resume: bool = True) -> dict:
        """The recipe."""
        seed_everything(self.seed)
        self.device = pick_device(self.requested_device)
        self.rank, self.world = init_distributed(self.device)
        self.build_model()
        self.build_data()
        self.build_precision_and_ddp()
        self.maybe_cache()
        self.build_optimizer()
        self.fingerprint = ckpt.fingerprint(self.params, self.prepared_dir, self.stage, self.mode, self.init_from)
        if resume:
            self.restore()
        try:
            with self._sigterm_sets_preempted():
                self.start()
                self.epoch_loop()
            return self.finalize()
        except BaseException as error:
            for cb in self.callbacks:
                with contextlib.suppress(Exception):  # the training error is the one to report
                    cb.on_exception(error)
            raise

    # -- building the run --------------------------------------------------------------------
    def build_model(self) -> None:
        from .. import data
        self.classes = data.load_classes(self.prepared_dir)
        if self.init_from:
            model = load_model(self.init_from)
            if model.mode != self.mode:
                raise TrainingError(f"{self.init_from} holds a {model.mode!r} model, not {self.mode!r}")
            if model.class_names != self.classes:
                raise TrainingError(f"{self.init_from} was trained on classes {model.class_names}, "
                                    f"the data in {self.prepared_dir} has {self.classes}")
        else:
            model = build_model(num_classes=len(self.classes), class_names=self.classes,
                                **{**model_kwargs(self.params), "mode": self.mode})
        if not self.init_from:  # stage 2 keeps what stage 1 recorded
            model.intensity = data.intensity_range(self.prepared_dir)
        model.freeze_norm_stats = freezes_norm_stats(self.t, self.world)
        model.set_stage(1 if self.plan["freeze"] else 2)
        model.to(self.device)
        if self.t.get("channels_last"):
            model.to(memory_format=torch.channels_last)  # CNNs: NHWC kernels; inputs follow the weights
        self.model, self.config = model, model.config_dict()

    def build_data(self) -> None:
        from .. import data
        t, config = self.t, self.config
        self.train_ds = SeededDataset(data.ManifestDataset(
            self.prepared_dir, "train", data.build_transform(config, True, t["augment"]),
            in_chans=config["input_size"][0]), self.seed)
        if len(self.train_ds) == 0:
            raise TrainingError(f"{self.prepared_dir}: the train split is empty")
        self.sampler = EpochBatchSampler(len(self.train_ds), t["batch_size"], self.seed, True,
                                         self.rank, self.world)
        # Workers (num_workers: auto) that persist across epochs, pinned memory, prefetch;
        # its own generator, not the global RNG that a mid-epoch checkpoint restores.
        self.train_loader = data.epoch_loader(self.train_ds, self.sampler, t["num_workers"], self.device,
                                              self.seed)
        self.val_loader = data.make_loader(self.prepared_dir, "val", config, False, self.params)
        if len(self.val_loader.dataset) == 0:
            self.val_loader = None  # no validation split: the last epoch is kept

    def build_precision_and_ddp(self) -> None:
        self.amp_dtype = None
        if self.t["amp"] and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward, self.eval_forward, self.cache_info = self.net, None, None

    def maybe_cache(self) -> None:
        """Frozen backbone: train on its stored outputs (feature_cache.py) instead of recomputing them."""
        if self.plan["freeze"] and (self.t.get("cache") or {}).get("views") is not None:
            if self.world > 1:
                log.info("feature cache: off under DDP (each rank would recompute the whole cache)")
            else:
                self._use_cache()
        if self.t.get("compile"):
            self.forward = torch.compile(self.forward)

    def _use_cache(self) -> None:
        from .feature_cache import stage1_cache
        cached = stage1_cache(self.model, self.params, self.prepared_dir, self.config, self.seed,
                              self.sampler, self.device, self.amp_dtype, has_val=self.val_loader is not None,
                              epochs=self.plan["epochs"])
        self.train_ds = self.train_loader = cached["train"]
        self.val_loader, info = cached["val"], cached["info"]
        self.forward = self.eval_forward = self.model.head_features
        self.cache_info = info
        log.info("feature cache: %s (%d views, %.1f MiB, %.1f s)", "built" if info["built"] else "reused",
                 info["views"], info["bytes"] / 2**20, info["seconds"])

    def build_optimizer(self) -> None:
        self.optimizer = make_optimizer(self.params, self.model, self.plan["lr"], self.plan.get("head_lr"))
        steps_per_epoch = math.ceil(len(self.sampler) / self.t["grad_accum"])
        total_steps = max(1, self.plan["epochs"] * steps_per_epoch)
        self.warmup = warmup_steps(self.t["warmup_epochs"], steps_per_epoch, total_steps,
                                   self.t["warmup_max_fraction"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total_steps, self.warmup))

    # -- checkpoints -------------------------------------------------------------------------
    def restore(self) -> None:
        """Resume from this stage's checkpoint when it belongs to the same params and data."""
        if not self.ckpt_path.is_file():
            return
        ck = ckpt.load_checkpoint(self.ckpt_path)
        if ck.get("fingerprint") != self.fingerprint:
            if self.rank == 0:
                log.info("ignoring checkpoint %s: it belongs to other params or data", self.ckpt_path)
            return
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        ckpt.set_rng_state(ck["rng"])
        for name in LoopState.CHECKPOINTED:
            setattr(self.state, name, ck[name])
        s = self.state
        s.start_epoch, s.skip_batches, s.global_step = ck["epoch"], ck["batch"], ck["global_step"]
        s.epoch_loss = tuple(ck.get("epoch_loss", (0.0, 0)))  # absent from older checkpoints
        if self.rank == 0:
            log.info("resuming %s from %s: epoch %d, batch %d", self.out_dir, self.ckpt_path, s.start_epoch + 1,
                     s.skip_batches)

    def save_checkpoint(self, epoch: int, batch: int) -> None:
        if self.rank != 0:
            return
        s = self.state
        ckpt.save_checkpoint({
            "fingerprint": self.fingerprint, "epoch": epoch, "batch": batch, "global_step": s.global_step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(), "epoch_loss": s.epoch_loss,
            **{name: getattr(s, name) for name in LoopState.CHECKPOINTED},
        }, self.ckpt_path)

    @contextlib.contextmanager
    def _sigterm_sets_preempted(self):
        old = None
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "preempted", True))
        try:
            yield
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    # -- the loop ----------------------------------------------------------------------------
    def _callbacks(self, hook: str, arg) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(arg)

    def start(self) -> None:
        self.info = {"params": self.params, "stage": self.stage, "mode": self.mode, "out_dir": str(self.out_dir),
                     "prepared_dir": str(self.prepared_dir),
                     "param_report": self.model.param_report(), "epochs": self.plan["epochs"],
                     "lr": self.plan["lr"], "head_lr": self.plan.get("head_lr"),
                     "device": str(self.device), "world_size": self.world,
                     "batchnorm": self._batchnorm_rule()}
        self._callbacks("on_train_start", self.info)
        if self.rank == 0:
            rep = self.info["param_report"]
            lr = f"{self.plan['lr']:g}" + (f" (head {self.plan['head_lr']:g})" if self.plan.get("head_lr") else "")
            log.info("stage %d (%s): %d epochs, lr %s, %s of %s parameters trainable, on %s%s", self.stage,
                     self.mode, self.plan["epochs"], lr, f"{rep['trainable']:,}", f"{rep['total']:,}",
                     self.device, f", BatchNorm statistics {self.info['batchnorm']}" if self.info["batchnorm"] else "")

    def _batchnorm_rule(self) -> str | None:
        """What the backbone's BatchNorm layers do in this stage (None: it has none)."""
        if not batchnorm_layers(self.model.backbone):
            return None
        if self.plan["freeze"] or self.model.freeze_norm_stats:
            return "frozen"
        return "trained"

    def epoch_loop(self) -> None:
        s, epochs = self.state, self.plan["epochs"]
        for epoch in range(s.start_epoch, epochs):
            t0 = time.time()
            record = self.train_epoch(epoch)
            value = self.validate(epoch, record)
            record["seconds"] = round(time.time() - t0, 3)
            s.history.append(record)
            improved = self.select(epoch, value)
            self._print_epoch(epoch, record, value, improved)
            try:
                self._callbacks("on_epoch_end", record)
            except StopTraining:
                s.stopped_early = True
            if self.t["early_stopping"] and s.bad_epochs >= self.t["early_stopping"]:
                s.stopped_early = True
            self.save_checkpoint(epoch + 1, 0)
            if s.stopped_early or self.preempted:
                break
            if self.max_steps is not None and s.global_step >= self.max_steps:
                raise Preempted(f"stopped after epoch {epoch + 1} (max_steps); checkpoint {self.ckpt_path}")
        if self.preempted and len(s.history) < epochs and not s.stopped_early:
            raise Preempted(f"SIGTERM: checkpoint {self.ckpt_path} saved after epoch {len(s.history)}; "
                            "run again to resume")

    def train_epoch(self, epoch: int) -> dict:
        s, sampler = self.state, self.sampler
        self.train_ds.epoch = sampler.epoch = epoch
        sampler.skip = s.skip_batches if epoch == s.start_epoch else 0
        self.net.train()
        # Dropout and anything else random in the model: seeded per epoch unless resumed
        # mid-epoch, where the checkpoint restored the exact RNG state.
        if sampler.skip == 0:
            torch.manual_seed(self.seed * 31 + epoch)
        # Resumed mid-epoch: the batches before the stop, as rank 0 saved them (under DDP the
        # other ranks' are not kept; the loss is then the mean over the samples known).
        total_loss, n_seen = s.epoch_loss if sampler.skip and self.rank == 0 else (0.0, 0)
        s.epoch_loss = (0.0, 0)
        bar = progress(len(sampler) - sampler.skip, f"stage {self.stage} epoch {epoch + 1}/{self.plan['epochs']}",
                       enabled=self.progress and self.rank == 0)
        self.optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(self.train_loader, start=sampler.skip):
            loss, last = self.train_step(epoch, i, x, y)
            own = sampler.own(i) if self.world > 1 else len(y)
            total_loss += loss * own
            n_seen += own
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if self._must_stop_at(i, last):
                s.epoch_loss = (total_loss, n_seen)
                self.save_checkpoint(epoch, i + 1)
                bar.close()
                raise Preempted(f"stopped at stage {self.stage}, epoch {epoch + 1}, batch {i + 1}; "
                                f"checkpoint {self.ckpt_path}; run again to resume")
        bar.close()
        total_loss, n_seen = self._all_ranks(total_loss, n_seen)
        return {"stage": self.stage, "epoch": epoch + 1, "train_loss": total_loss / max(n_seen, 1),
                "lr": self.optimizer.param_groups[0]["lr"]}

    def train_step(self, epoch: int, i: int, x, y) -> tuple[float, bool]:
        """Forward and backward of batch i; an optimizer step every grad_accum batches."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with _autocast(self.device, self.amp_dtype):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) at stage {self.stage}, epoch "
                                f"{epoch + 1}, batch {i + 1}: lower train.lr or check the data; "
                                "nothing was saved")
        # DDP averages gradients over ranks: weigh each rank's mean loss by its share
        # of the global batch (uneven slices, a padding sample) to match one process.
        loss_for_grad = loss * self.sampler.loss_scale(i) if self.world > 1 else loss
        self.scaler.scale(loss_for_grad / self.t["grad_accum"]).backward()
        last = i + 1 == len(self.sampler)
        if (i + 1) % self.t["grad_accum"] == 0 or last:
            self.optimizer_step()
        return loss.item(), last

    def optimizer_step(self) -> None:
        if self.t["grad_clip"]:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.global_step += 1

    def _must_stop_at(self, i: int, last: bool) -> bool:
        """SIGTERM or max_steps mid-epoch: stop after a whole optimizer step, not the last."""
        step_limit = self.max_steps is not None and self.state.global_step >= self.max_steps
        return (self.preempted or step_limit) and not last and (i + 1) % self.t["grad_accum"] == 0

    def _all_ranks(self, total_loss: float, n_seen: int) -> tuple[float, int]:
        """The epoch's loss over all ranks' samples, as one process reports it."""
        if self.world == 1:
            return total_loss, n_seen
        sums = torch.tensor([total_loss, float(n_seen)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(sums)
        return sums[0].item(), int(sums[1].item())

    def validate(self, epoch: int, record: dict) -> float:
        """Validation metrics into `record`; returns the value the best epoch is chosen by."""
        if self.val_loader is None:
            return epoch  # no validation: the latest epoch is the best
        val_loss, labels, probs = run_eval(self.model, self.val_loader, self.device, self.amp_dtype,
                                           self.eval_forward)
        if not math.isfinite(val_loss):  # the epoch's last steps diverged
            raise TrainingError(f"non-finite validation loss ({val_loss}) after stage {self.stage}, "
                                f"epoch {epoch + 1}: the weights diverged; lower train.lr "
                                "or set train.grad_clip; the model was not saved")
        vm = classification_metrics(labels, probs, len(self.classes))
        record.update({"val_loss": val_loss, **{f"val_{k}": v for k, v in vm.items()}})
        metric = self.t["select_metric"]
        value = -val_loss if metric == "neg_loss" else vm[metric]
        if not math.isfinite(value):  # e.g. ROC AUC with a class missing from validation
            record["selected_by"] = "neg_loss"
            record["select_note"] = f"val_{metric} undefined (NaN): this epoch is ranked by validation loss"
        return value

    def select(self, epoch: int, value: float) -> bool:
        """Keep the weights of the best epoch so far; True when this one is it.

        Epochs rank by (select metric is defined, metric value or else -val_loss): an
        undefined (NaN) metric never beats a defined one, and among undefined ones the
        lower validation loss wins; `train.select_ties` settles equal keys."""
        s = self.state
        record = s.history[-1]
        defined = math.isfinite(value)
        key = (defined, value if defined else -record.get("val_loss", math.inf))
        best = tuple(s.best_key) if s.best_state is not None else None
        # a tie keeps the earlier epoch, or the later one (the paper's code) by train.select_ties
        improved = best is None or key > best or (key == best and self.t["select_ties"] == "later")
        if improved:
            s.best_key = key
            s.best_value, s.best_epoch, s.bad_epochs = value, epoch + 1, 0
            s.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            s.bad_epochs += 1
        return improved

    def _print_epoch(self, epoch: int, record: dict, value: float, improved: bool) -> None:
        if self.rank == 0 and self.progress:
            shown = f"val {self.t['select_metric']} {value:.4f}" if self.val_loader is not None else ""
            log.info("  epoch %d: train loss %.4f %s%s", epoch + 1, record["train_loss"], shown,
                     " (best)" if improved else "")

    # -- the end -----------------------------------------------------------------------------
    def finalize(self) -> dict:
        """Best weights back in, the model directory written, the checkpoint removed."""
        s = self.state
        if s.best_state is not None:
            self.model.load_state_dict(s.best_state)
        summary = self.summary()
        history = s.history
        if self.init_from and (Path(self.init_from) / "history.json").is_file():
            history = json.loads((Path(self.init_from) / "history.json").read_text()) + history
        for i, record in enumerate(history, start=1):  # one x-axis across both stages (plots)
            record["global_epoch"] = i
        if self.rank == 0:
            save_model(self.model, self.out_dir,
                       extra_files={"history.json": history, "train_summary.json": summary})
            shutil.rmtree(checkpoint_dir(self.out_dir), ignore_errors=True)
        self._callbacks("on_train_end", summary)
        if self.world > 1:
            torch.distributed.barrier()
        return summary

    def summary(self) -> dict:
        s = self.state
        return {"stage": self.stage, "mode": self.mode, "epochs_run": len(s.history), "best_epoch": s.best_epoch,
                "select_metric": self.t["select_metric"],
                "best_value": s.best_value if s.best_state is not None and math.isfinite(s.best_value) else None,
                "selected_by": self.t["select_metric"] if s.best_key[0] else "neg_loss (select metric undefined)",
                "warmup_steps": self.warmup,
                "stopped_early": s.stopped_early, "param_report": self.model.param_report(),
                "lr": self.plan["lr"], "head_lr": self.plan.get("head_lr"), "batchnorm": self.info["batchnorm"],
                "init_from": str(self.init_from) if self.init_from else None,
                "seconds": round(sum(r["seconds"] for r in s.history), 3), "cache": self.cache_info}
