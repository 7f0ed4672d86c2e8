"""One GPU check: the platform's throughput figures on one GPU, in one command (< 8 minutes).

Prints a table and writes JSON (benchmarks/results/gpu_check.json) with, on one device:

1. stage-2 training step of CLAdapter on ViT-B/16 (random weights, K=20, r=256), bf16
   autocast: images/s, model FLOP utilisation (FLOPs of forward + backward counted by
   torch's FlopCounterMode over the step time, against the GPU's dense bf16 peak, see
   _common.py) and peak memory;
2. stage 1 end to end through the trainer, with the feature cache (views 0) and without:
   seconds per epoch, and the cache build's images/s;
3. the adapter op: einsum (this code) vs the reference's repeat-multiply-sum, forward +
   backward, time and peak memory (torch.cuda.max_memory_allocated), same numbers;
4. inference images/s of a saved and reloaded CLAdapter model, bf16;
5. the training loader's images/s (JPEG photos decoded and augmented by
   `train.num_workers: auto` workers) against the model's images/s of (1).

It reuses the benchmark scripts' pieces: train_step.make_steps, adapter_op's two
formulations, cache_stage1's no-augmentation setting, loader.make_photos.
`--tiny` runs the same code on the CPU with a 32 px one-block ViT and a few images in about
a minute; tests/test_gpu_check.py runs it so the command cannot rot between GPU runs.

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --tiny     # anywhere
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F

from cladapter_core.model.adapter import ClusterAttention
from cladapter_core.model.config import AdapterConfig
from cladapter_core.data import epoch_loader, make_demo_data, prepare
from cladapter_core.data import ManifestDataset, build_transform
from cladapter_core.data.seeding import EpochBatchSampler, SeededDataset
from cladapter_core.model import build_model, load_model, save_model
from cladapter_core.params import load_params
from cladapter_core.training import train


@dataclass
class Sizes:
    """What each part measures; FULL for a GPU, TINY for the CPU (the test suite)."""
    backbone: str = "vit_base_patch16_224"
    backbone_kwargs: dict = field(default_factory=dict)
    img: int = 224
    centers: int = 20
    rank: int = 256
    batch: int = 64              # training step and loader
    steps: int = 10
    warmup: int = 3
    infer_batch: int = 256
    op_batch: int = 64           # adapter op: B x 196 x 768
    op_tokens: int = 196
    op_dim: int = 768
    stage1_images: int = 800     # the digits demo, resized at prepare
    cached_epochs: int = 5
    uncached_epochs: int = 2
    photos: int = 512            # loader: JPEG photos of photo_size px
    photo_size: int = 1024


FULL = Sizes()
TINY = Sizes(backbone="vit_tiny_patch16_224", img=32, centers=4, rank=8, batch=8, steps=2, warmup=1,
             backbone_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
             infer_batch=8, op_batch=2, op_tokens=16, op_dim=32, stage1_images=60, cached_epochs=2,
             uncached_epochs=1, photos=24, photo_size=96)


def _model(s: Sizes, device, mode: str = "cla"):
    torch.manual_seed(0)
    kwargs = dict(s.backbone_kwargs)
    return build_model(s.backbone, 10, mode=mode, num_centers=s.centers, rank=s.rank, pretrained=False,
                       backbone_kwargs={k: v for k, v in kwargs.items() if k != "img_size"},
                       **({"img_size": kwargs["img_size"]} if "img_size" in kwargs else {})).to(device)


# -- 1. the stage-2 training step -----------------------------------------------------------
def train_step(s: Sizes, device) -> dict:
    from train_step import make_steps
    model = _model(s, device)
    x = torch.randn(s.batch, 3, s.img, s.img, device=device)
    y = torch.randint(0, 10, (s.batch,), device=device)
    fwd_bwd, opt_step = make_steps(model, x, y, device)["CLAdapter stage 2"]

    def step():
        fwd_bwd()
        opt_step()
    seconds = C.median(C.time_interleaved({"step": step}, s.warmup, s.steps, device)["step"])
    flops = C.count_flops(fwd_bwd)
    mfu = C.mfu(flops, seconds, device)
    return {"batch": s.batch, "step_s": seconds, "images_per_s": s.batch / seconds,
            "tflop_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12, "mfu": mfu,
            "peak_memory_bytes": C.peak_memory(step, device)}


# -- 2. stage 1 cached vs uncached, and the cache build ---------------------------------------
def stage1_cache(s: Sizes, device, work: Path) -> dict:
    from cache_stage1 import NO_AUG
    base = [f"model.backbone={s.backbone}", f"model.backbone_kwargs={json.dumps(s.backbone_kwargs)}",
            f"model.rank={s.rank}", f"model.num_centers={s.centers}", f"train.batch_size={s.batch}", NO_AUG,
            "train.warmup_epochs=0", f"data.shots_per_class={s.stage1_images // 10}",
            "data.val_fraction=0.02", "data.test_fraction=0.02", f"data.resize={s.img}",
            "train.cache.views=null", f"train.cache.dir={work / 'cache'}",
            "model.pretrained=false", "train.lr=0.002", "train.grad_clip=1.0"]  # random weights
    make_demo_data(work / "digits")
    prepare(work / "digits", work / "stage1-data", load_params(None, base))
    out = {}
    for label, epochs, extra in (("uncached", s.uncached_epochs, []), ("cached", s.cached_epochs,
                                                                        ["train.cache.views=0"])):
        params = load_params(None, base + extra + [f"stage1.epochs={epochs}"])
        t0 = time.perf_counter()
        summary = train(params, work / "stage1-data", work / f"stage1-{label}", stage=1, progress=False)
        hist = json.loads((work / f"stage1-{label}" / "history.json").read_text())
        out[label] = {"wall_s": time.perf_counter() - t0, "epoch_s": [r["seconds"] for r in hist],
                      "cache": summary.get("cache")}
    n_train = len(ManifestDataset(work / "stage1-data", "train"))
    cache = out["cached"]["cache"] or {}
    un_epoch = C.median(out["uncached"]["epoch_s"])
    ca_epoch = C.median(out["cached"]["epoch_s"][1:] or out["cached"]["epoch_s"])
    return {"train_images": n_train, "uncached_s_per_epoch": un_epoch, "cached_s_per_epoch": ca_epoch,
            "epoch_speedup": un_epoch / max(ca_epoch, 1e-9), "cache_build_s": cache.get("seconds"),
            "cache_build_images_per_s": n_train / cache["seconds"] if cache.get("seconds") else None,
            "runs": out}


# -- 3. the adapter op ------------------------------------------------------------------------
def adapter_op(s: Sizes, device) -> dict:
    from adapter_op import reference_forward, rel_diff
    torch.manual_seed(0)
    attn = ClusterAttention(s.op_dim, AdapterConfig(num_centers=s.centers, rank=s.rank)).to(device)
    x = torch.randn(s.op_batch, s.op_tokens, s.op_dim, device=device, requires_grad=True)
    grad = torch.randn_like(x)

    def run(fwd):
        def f():
            attn.zero_grad(set_to_none=True)
            x.grad = None
            fwd(x).backward(grad)
        return f
    fns = {"einsum": run(attn), "reference": run(lambda t: reference_forward(attn, t))}
    times = C.time_interleaved(fns, 1, max(3, s.steps // 2), device)
    peaks = {k: C.peak_memory(f, device) for k, f in fns.items()}
    with torch.no_grad():
        diff = rel_diff(attn(x), reference_forward(attn, x))
    te, tr = C.median(times["einsum"]), C.median(times["reference"])
    return {"shape": [s.op_batch, s.op_tokens, s.op_dim, s.centers, s.rank], "einsum_ms": te * 1e3,
            "reference_ms": tr * 1e3, "speedup": tr / te, "einsum_peak_bytes": peaks["einsum"],
            "reference_peak_bytes": peaks["reference"], "memory_ratio": peaks["reference"] / max(peaks["einsum"], 1),
            "max_rel_diff": diff, "peak_memory_is": "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "the CPU allocator's peak (torch.profiler)"}


# -- 4. inference of a saved model ------------------------------------------------------------
def inference(s: Sizes, device, work: Path) -> dict:
    save_model(_model(s, device).cpu(), work / "saved")
    model = load_model(work / "saved").to(device).eval()
    x = torch.randn(s.infer_batch, 3, s.img, s.img, device=device)

    def run():
        with torch.inference_mode(), C.autocast(device):
            model(x)
    seconds = C.median(C.time_interleaved({"infer": run}, s.warmup, s.steps, device)["infer"])
    return {"batch": s.infer_batch, "images_per_s": s.infer_batch / seconds, "batch_s": seconds}


# -- 5. the loader against the model ----------------------------------------------------------
def loader_vs_model(s: Sizes, device, work: Path, model_ips: float) -> dict:
    """The trainer's loader over JPEG photos, augmentation on, `num_workers: auto`: decoded in
    the workers, and decoded on the device (nvjpeg on a GPU, data/device_decode.py; on the
    CPU libjpeg-turbo in this process), each over an epoch after a warm-up epoch."""
    from loader import make_photos

    from cladapter_core.data.datasets import loader_options
    from cladapter_core.data.device_decode import DeviceDecodeLoader
    make_photos(work / "photos", s.photos, s.photo_size)
    params = load_params(None, [f"train.batch_size={s.batch}", "data.val_fraction=0.05", "data.test_fraction=0.05"])
    prepare(work / "photos", work / "photos-prepared", params)
    config = {"input_size": [3, s.img, s.img], "mean": [0.5] * 3, "std": [0.25] * 3}
    out = {"photo_px": s.photo_size, "model_images_per_s": model_ips}
    for how in ("workers", "device"):
        dataset = SeededDataset(ManifestDataset(work / "photos-prepared", "train",
                                                build_transform(config, True, params["train"]["augment"])), 0)
        sampler = EpochBatchSampler(len(dataset), s.batch, 0)
        loader = (epoch_loader(dataset, sampler, "auto", device, 0, decode_on_device=False) if how == "workers"
                  else DeviceDecodeLoader(dataset, sampler, loader_options("auto", device.type), device, 0))
        for sampler.epoch in range(2):  # epoch 0: worker start-up and file cache
            C.sync(device)
            t0 = time.perf_counter()
            n = sum(len(y) for _, y in loader)
            C.sync(device)
            seconds = time.perf_counter() - t0
        out[how] = {"images": n, "num_workers": loader_options("auto", device.type)["num_workers"],
                    "images_per_s": n / seconds, "loader_over_model": n / seconds / model_ips}
    out["device_over_workers"] = out["device"]["images_per_s"] / out["workers"]["images_per_s"]
    return out


def report(res: dict) -> None:
    t, c, a, i, lo = res["train_step"], res["stage1_cache"], res["adapter_op"], res["inference"], res["loader"]
    mfu = f"{t['mfu'] * 100:.1f} %" if t["mfu"] is not None else "- (no GPU peak known)"
    rows = [["stage-2 training step, images/s", f"{t['images_per_s']:.1f}"],
            ["stage-2 training step, MFU", mfu],
            ["stage-2 training step, peak memory GiB", f"{t['peak_memory_bytes'] / 2**30:.2f}"],
            ["stage 1 uncached, s/epoch", f"{c['uncached_s_per_epoch']:.2f}"],
            ["stage 1 cached, s/epoch", f"{c['cached_s_per_epoch']:.3f}"],
            ["stage 1 cached / uncached epoch speed-up", f"{c['epoch_speedup']:.1f}x"],
            ["cache build, images/s", f"{c['cache_build_images_per_s'] or float('nan'):.1f}"],
            ["adapter op einsum / reference, ms", f"{a['einsum_ms']:.2f} / {a['reference_ms']:.2f} "
             f"({a['speedup']:.1f}x)"],
            ["adapter op peak memory einsum / reference, MiB", f"{a['einsum_peak_bytes'] / 2**20:.1f} / "
             f"{a['reference_peak_bytes'] / 2**20:.1f} ({a['memory_ratio']:.1f}x)"],
            ["adapter op max rel. diff", f"{a['max_rel_diff']:.1e}"],
            ["inference, images/s", f"{i['images_per_s']:.1f}"],
            [f"loader, decoding in {lo['workers']['num_workers']} workers, images/s",
             f"{lo['workers']['images_per_s']:.1f} ({lo['workers']['loader_over_model']:.2f}x the model)"],
            [f"loader, decoding on the {'GPU (nvjpeg)' if res['device'] == 'cuda' else 'CPU in-process'}, images/s",
             f"{lo['device']['images_per_s']:.1f} ({lo['device']['loader_over_model']:.2f}x the model)"]]
    print(C.fmt_table(["figure", "value"], rows))


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized run of the same code (tests)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    device = C.pick_device("cpu" if args.tiny else args.device)
    s = TINY if args.tiny else FULL
    info = C.banner(f"GPU check ({'tiny, ' if args.tiny else ''}{s.backbone} at {s.img} px)", device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cladapter-gpu-check-"))
    t0, res, seconds = time.time(), {}, {}
    for name, fn in (("train_step", lambda: train_step(s, device)), ("adapter_op", lambda: adapter_op(s, device)),
                     ("inference", lambda: inference(s, device, work)),
                     ("stage1_cache", lambda: stage1_cache(s, device, work)),
                     ("loader", lambda: loader_vs_model(s, device, work, res["train_step"]["images_per_s"]))):
        t1 = time.time()
        res[name] = fn()
        seconds[name] = time.time() - t1
        print(f"# {name}: {seconds[name]:.0f} s", flush=True)
    res["device"] = device.type
    report(res)
    print(f"# whole check: {time.time() - t0:.0f} s")
    C.write_json("gpu_check", {"command": C.command_line(), "device": info, "sizes": asdict(s), "tiny": args.tiny,
                               "seconds": seconds, "results": res}, args.json)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
