"""The staged trainer: CLAdapter's Staged Fine-Tuning and the baselines through one loop.

Modes and stages:
- ``cla``   stage 1: backbone frozen, adapter + head trained at ``train.lr``;
            stage 2: starts from stage 1's model, everything trained at lr * stage2.lr_factor.
- ``lp-ft`` the same two stages without an adapter (linear probe, then full fine-tuning).
- ``linear`` one stage, backbone frozen, head on the pooled feature (stage1.epochs).
- ``full``  one stage, everything trained from the start (stage1.epochs + stage2.epochs).

Determinism: the order of the samples and every augmentation are functions of (seed,
epoch, index) alone, so a run resumed from a checkpoint, at an epoch boundary or in the
middle of one, ends with the same weights as one never interrupted (on the CPU, with
num_workers=0 or more), and DDP ranks see disjoint slices of the single-process batches.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import CLAdapterError
from .metrics import classification_metrics
from .model import build_model, load_model, save_model
from .params import flatten, model_kwargs

STAGED_MODES = ("cla", "lp-ft")
CKPT_NAME = "last.pt"


class TrainingError(CLAdapterError):
    """Training cannot go on (non-finite loss, inconsistent inputs)."""


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch."""


class Preempted(CLAdapterError):
    """SIGTERM arrived: a checkpoint was saved; run again to resume."""


# -- deterministic data ------------------------------------------------------------------
class SeededDataset(Dataset):
    """Each item's augmentation draws from an RNG seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        # One thread for the per-image transforms: on tiny tensors torch's intra-op threads
        # cost more than they give, up to 30x on a busy machine (benchmarks/loader.py).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + int(index)) % (2**63))
                return self.dataset[index]
        finally:
            torch.set_num_threads(threads)


class EpochBatchSampler(Sampler):
    """Global batches from a permutation seeded by (seed, epoch); rank r of W takes its
    slice of each global batch, so W processes together see what one process sees."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world, self.epoch, self.skip = rank, world, 0, 0

    def _batches(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            share = math.ceil(len(batch) / self.world)
            # A rank with nothing of a last batch smaller than the world must still join
            # the gradient all-reduce (or DDP hangs): it takes one sample, weighted 0.
            yield batch[self.rank * share:(self.rank + 1) * share] or batch[:1]

    def __iter__(self):
        for i, batch in enumerate(self._batches()):
            if i >= self.skip and batch:
                yield batch

    def own(self, i: int) -> int:
        """How many samples of global batch i are this rank's (0 for a padding sample)."""
        size = min(self.batch_size, self.n - i * self.batch_size)
        share = math.ceil(size / self.world)
        return max(0, min(share, size - self.rank * share))

    def loss_scale(self, i: int) -> float:
        """Factor on this rank's mean loss of batch i such that DDP's gradient average is
        the gradient of the global batch's mean loss, also when the slices are uneven."""
        size = min(self.batch_size, self.n - i * self.batch_size)
        return self.own(i) * self.world / size

    def __len__(self):
        return math.ceil(self.n / self.batch_size)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# -- distributed -------------------------------------------------------------------------
def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _init_distributed(device: torch.device) -> tuple[int, int]:
    rank, world, _ = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives (barrier) use this rank's GPU
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", _dist_info()[2])
    return torch.device("cpu")


# -- schedule ----------------------------------------------------------------------------
def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to 0 (per optimizer step)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(params: dict, model: torch.nn.Module, lr: float):
    t = params["train"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=t["weight_decay"])
    cls = torch.optim.AdamW if t["optimizer"] == "adamw" else torch.optim.Adam
    return cls(trainable, lr=lr, weight_decay=t["weight_decay"])


# -- the plan of one training call ----------------------------------------------------------
def stage_plan(params: dict, stage: int, mode: str) -> dict:
    """Epochs, learning rate and freezing for (mode, stage)."""
    lr, s1, s2 = params["train"]["lr"], params["stage1"]["epochs"], params["stage2"]["epochs"]
    factor = params["stage2"]["lr_factor"]
    if mode in STAGED_MODES:
        if stage == 1:
            return {"epochs": s1, "lr": lr, "freeze": True}
        return {"epochs": s2, "lr": lr * factor, "freeze": False}
    if mode == "linear":
        return {"epochs": s1, "lr": lr, "freeze": True}
    return {"epochs": s1 + s2, "lr": lr, "freeze": False}  # full


def _fingerprint(params: dict, prepared_dir: Path, stage: int, mode: str, init_from) -> str:
    """What a checkpoint must match to be resumed: params, data, stage, starting weights."""
    h = hashlib.sha256()
    relevant = {k: v for k, v in params.items() if k not in ("evaluate", "register", "tune")}
    relevant = {k: v for k, v in flatten(relevant).items() if not k.startswith("train.num_workers")}
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    h.update((prepared_dir / "manifest.csv").read_bytes())
    h.update(f"{stage}:{mode}".encode())
    if init_from:
        h.update((Path(init_from) / "model.safetensors").read_bytes())
    return h.hexdigest()


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out_dir: Path) -> Path:
    """Beside the output, not inside it: DVC removes a stage's outputs before rerunning it."""
    return out_dir.with_name(out_dir.name + ".ckpt")


# -- evaluation on a split -----------------------------------------------------------------
@torch.no_grad()
def run_eval(model, loader, device, amp_dtype=None, forward=None) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, labels and probabilities of the model over a loader."""
    model.eval()
    forward = forward or model
    losses, labels, probs = [], [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            logits = forward(x)
        losses.append(F.cross_entropy(logits.float(), y, reduction="sum").item())
        labels.append(y.cpu())
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    n = sum(len(y) for y in labels)
    return (sum(losses) / max(n, 1), torch.cat(labels).numpy() if labels else np.zeros(0),
            torch.cat(probs).numpy() if probs else np.zeros((0, 0)))


def _select_value(metric: str, val_loss: float, metrics: dict) -> float:
    return -val_loss if metric == "neg_loss" else metrics[metric]


# -- the loop --------------------------------------------------------------------------------
def train(params: dict, prepared_dir, out_dir, stage: int = 1, mode: str | None = None,
          init_from=None, resume: bool = True, callbacks=(), progress: bool = True,
          max_steps: int | None = None) -> dict:
    """Train one stage and write the model directory `out_dir` (model.safetensors,
    config.json, history.json, train_summary.json) atomically.

    stage 2 of a staged mode needs `init_from`, the stage-1 model directory.
    `max_steps` stops after that many optimizer steps as if killed (tests, fault drills).
    """
    from . import data
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    mode = mode or params["train"]["mode"]
    if stage not in (1, 2):
        raise TrainingError(f"stage must be 1 or 2, got {stage!r}")
    if mode in STAGED_MODES and stage == 2 and not init_from:
        raise TrainingError(f"mode {mode!r} stage 2 needs the stage-1 model directory (--init-from)")
    if mode not in STAGED_MODES and stage == 2:
        raise TrainingError(f"mode {mode!r} has a single stage; run it with --stage 1")
    if not (prepared_dir / "manifest.csv").is_file():
        raise TrainingError(f"{prepared_dir}: not a prepared dataset (no manifest.csv); run `cladapter prepare`")
    t = params["train"]
    plan = stage_plan(params, stage, mode)
    seed = params["seed"] + (1000 if stage == 2 else 0)
    _seed_everything(seed)
    device = pick_device()
    rank, world = _init_distributed(device)

    classes = data.load_classes(prepared_dir)
    if init_from:
        model = load_model(init_from)
        if model.mode != mode:
            raise TrainingError(f"{init_from} holds a {model.mode!r} model, not {mode!r}")
        if model.class_names != classes:
            raise TrainingError(f"{init_from} was trained on classes {model.class_names}, "
                                f"the data in {prepared_dir} has {classes}")
    else:
        model = build_model(num_classes=len(classes), class_names=classes, **{**model_kwargs(params), "mode": mode})
    model.set_stage(1 if plan["freeze"] else 2)
    model.to(device)
    if t.get("channels_last"):
        model.to(memory_format=torch.channels_last)  # CNNs: NHWC kernels; inputs follow the weights
    config = model.config_dict()

    train_ds = SeededDataset(data.ManifestDataset(
        prepared_dir, "train", data.build_transform(config, True, t["augment"]),
        in_chans=config["input_size"][0]), seed)
    if len(train_ds) == 0:
        raise TrainingError(f"{prepared_dir}: the train split is empty")
    sampler = EpochBatchSampler(len(train_ds), t["batch_size"], seed, True, rank, world)
    # Its own generator: creating the iterator must not draw from the global RNG, whose
    # state a mid-epoch checkpoint restores.
    train_loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=t["num_workers"],
                              pin_memory=device.type == "cuda",
                              generator=torch.Generator().manual_seed(seed))
    val_loader = data.make_loader(prepared_dir, "val", config, False, params)
    if len(val_loader.dataset) == 0:
        val_loader = None  # no validation split: the last epoch is kept

    amp_dtype = None
    if t["amp"] and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    # Frozen backbone: train on its stored outputs (cache.py) instead of recomputing them.
    forward, eval_forward, cache_info = net, None, None
    if plan["freeze"] and (t.get("cache") or {}).get("views") is not None:
        if world > 1:
            print("feature cache: off under DDP (each rank would recompute the whole cache)")
        else:
            from .cache import stage1_cache
            cached = stage1_cache(model, params, prepared_dir, config, seed, sampler, device,
                                  amp_dtype, has_val=val_loader is not None)
            train_ds = train_loader = cached["train"]
            val_loader, cache_info = cached["val"], cached["info"]
            forward = eval_forward = model.head_features
            print(f"feature cache: {'built' if cache_info['built'] else 'reused'} "
                  f"({cache_info['views']} views, {cache_info['bytes'] / 2**20:.1f} MiB, {cache_info['seconds']:.1f} s)")
    if t.get("compile"):
        forward = torch.compile(forward)

    optimizer = make_optimizer(params, model, plan["lr"])
    steps_per_epoch = math.ceil(len(sampler) / t["grad_accum"])
    total_steps = max(1, plan["epochs"] * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, t["warmup_epochs"] * steps_per_epoch))

    fingerprint = _fingerprint(params, prepared_dir, stage, mode, init_from)
    ckpt_dir = checkpoint_dir(out_dir)
    ckpt_path = ckpt_dir / CKPT_NAME
    history: list[dict] = []
    start_epoch, skip_batches, best_value, best_state, best_epoch = 0, 0, -math.inf, None, -1
    bad_epochs, global_step = 0, 0
    if resume and ckpt_path.is_file():
        try:  # weights only: a checkpoint with pickled code in it is refused, not run
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise TrainingError(f"checkpoint {ckpt_path} refused or unreadable (only weights-only "
                                f"checkpoints are loaded: {type(e).__name__}); delete it to "
                                "start this stage over") from e
        if ck.get("fingerprint") == fingerprint:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            _set_rng_state(ck["rng"])
            history, best_value, best_epoch = ck["history"], ck["best_value"], ck["best_epoch"]
            best_state, bad_epochs = ck["best_state"], ck["bad_epochs"]
            start_epoch, skip_batches, global_step = ck["epoch"], ck["batch"], ck["global_step"]
            if rank == 0:
                print(f"resuming {out_dir} from {ckpt_path}: epoch {start_epoch + 1}, batch {skip_batches}")
        elif rank == 0:
            print(f"ignoring checkpoint {ckpt_path}: it belongs to other params or data")

    def save_checkpoint(epoch: int, batch: int) -> None:
        if rank != 0:
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save({
            "fingerprint": fingerprint, "epoch": epoch, "batch": batch, "global_step": global_step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": _rng_state(), "history": history, "best_value": best_value,
            "best_epoch": best_epoch, "best_state": best_state, "bad_epochs": bad_epochs,
        }, ckpt_path)

    preempted = {"flag": False}
    old_handler = None
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        old_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True))

    info = {"params": params, "stage": stage, "mode": mode, "out_dir": str(out_dir),
            "param_report": model.param_report(), "epochs": plan["epochs"], "lr": plan["lr"],
            "device": str(device), "world_size": world}
    for cb in callbacks:
        getattr(cb, "on_train_start", lambda i: None)(info)
    if rank == 0:
        rep = info["param_report"]
        print(f"stage {stage} ({mode}): {plan['epochs']} epochs, lr {plan['lr']:g}, "
              f"{rep['trainable']:,} of {rep['total']:,} parameters trainable, on {device}")

    select = t["select_metric"]
    stopped_early = False
    try:
        for epoch in range(start_epoch, plan["epochs"]):
            t0 = time.time()
            train_ds.epoch = sampler.epoch = epoch
            sampler.skip = skip_batches if epoch == start_epoch else 0
            net.train()
            # Dropout and anything else random in the model: seeded per epoch unless resumed
            # mid-epoch, where the checkpoint restored the exact RNG state.
            if sampler.skip == 0:
                torch.manual_seed(seed * 31 + epoch)
            total_loss, n_seen = 0.0, 0
            bar = _progress(len(sampler) - sampler.skip, f"stage {stage} epoch {epoch + 1}/{plan['epochs']}",
                            progress and rank == 0)
            optimizer.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(train_loader, start=sampler.skip):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                    logits = forward(x)
                loss = F.cross_entropy(logits.float(), y)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite loss ({loss.item()}) at stage {stage}, epoch "
                                        f"{epoch + 1}, batch {i + 1}: lower train.lr or check the data; "
                                        "nothing was saved")
                # DDP averages gradients over ranks: weigh each rank's mean loss by its share
                # of the global batch (uneven slices, a padding sample) to match one process.
                loss_for_grad = loss * sampler.loss_scale(i) if world > 1 else loss
                scaler.scale(loss_for_grad / t["grad_accum"]).backward()
                last = i + 1 == len(sampler)
                if (i + 1) % t["grad_accum"] == 0 or last:
                    if t["grad_clip"]:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    global_step += 1
                own = sampler.own(i) if world > 1 else len(y)
                total_loss += loss.item() * own
                n_seen += own
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                stop_now = max_steps is not None and global_step >= max_steps
                if (preempted["flag"] or stop_now) and not last and (i + 1) % t["grad_accum"] == 0:
                    save_checkpoint(epoch, i + 1)
                    bar.close()
                    raise Preempted(f"stopped at stage {stage}, epoch {epoch + 1}, batch {i + 1}; "
                                    f"checkpoint {ckpt_path}; run again to resume")
            bar.close()
            if world > 1:  # the epoch's loss over all ranks' samples, as one process reports it
                sums = torch.tensor([total_loss, float(n_seen)], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(sums)
                total_loss, n_seen = sums[0].item(), int(sums[1].item())
            record = {"stage": stage, "epoch": epoch + 1, "train_loss": total_loss / max(n_seen, 1),
                      "lr": optimizer.param_groups[0]["lr"]}
            if val_loader is not None:
                val_loss, labels, probs = run_eval(model, val_loader, device, amp_dtype, eval_forward)
                if not math.isfinite(val_loss):  # the epoch's last steps diverged
                    raise TrainingError(f"non-finite validation loss ({val_loss}) after stage {stage}, "
                                        f"epoch {epoch + 1}: the weights diverged; lower train.lr "
                                        "or set train.grad_clip; the model was not saved")
                vm = classification_metrics(labels, probs, len(classes))
                record.update({"val_loss": val_loss, **{f"val_{k}": v for k, v in vm.items()}})
                value = _select_value(select, val_loss, vm)
            else:
                value = epoch  # no validation: the latest epoch is the best
            record["seconds"] = round(time.time() - t0, 3)
            history.append(record)
            improved = value > best_value or best_state is None
            if improved:
                best_value, best_epoch, bad_epochs = value, epoch + 1, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            if rank == 0 and progress:
                shown = f"val {select} {value:.4f}" if val_loader is not None else ""
                print(f"  epoch {epoch + 1}: train loss {record['train_loss']:.4f} {shown}"
                      f"{' (best)' if improved else ''}")
            try:
                for cb in callbacks:
                    getattr(cb, "on_epoch_end", lambda r: None)(record)
            except StopTraining:
                stopped_early = True
            if t["early_stopping"] and bad_epochs >= t["early_stopping"]:
                stopped_early = True
            save_checkpoint(epoch + 1, 0)
            if stopped_early or preempted["flag"]:
                break
            if max_steps is not None and global_step >= max_steps:
                raise Preempted(f"stopped after epoch {epoch + 1} (max_steps); checkpoint {ckpt_path}")
        if preempted["flag"] and len(history) < plan["epochs"] and not stopped_early:
            raise Preempted(f"SIGTERM: checkpoint {ckpt_path} saved after epoch {len(history)}; "
                            "run again to resume")
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    if best_state is not None:
        model.load_state_dict(best_state)
    summary = {"stage": stage, "mode": mode, "epochs_run": len(history), "best_epoch": best_epoch,
               "select_metric": select, "best_value": best_value if best_state is not None else None,
               "stopped_early": stopped_early, "param_report": model.param_report(),
               "lr": plan["lr"], "init_from": str(init_from) if init_from else None,
               "seconds": round(sum(r["seconds"] for r in history), 3), "cache": cache_info}
    if init_from and (Path(init_from) / "history.json").is_file():
        history = json.loads((Path(init_from) / "history.json").read_text()) + history
    for i, record in enumerate(history, start=1):  # one x-axis across both stages (plots)
        record["global_epoch"] = i
    if rank == 0:
        save_model(model, out_dir, extra_files={"history.json": history, "train_summary.json": summary})
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    for cb in callbacks:
        getattr(cb, "on_train_end", lambda r: None)(summary)
    if world > 1:
        torch.distributed.barrier()
    return summary


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
