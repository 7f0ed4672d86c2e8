"""Benchmark 6: the data loader against the model, with and without resizing at prepare time.

Data: `--images` photos of `--src-size` px (the digits demo scaled up, coloured and
textured, saved as JPEG) so decoding and resizing cost what real photos cost. They are
prepared twice: as they are (the loader decodes full-size files and resizes every
epoch) and with `data.resize` (prepare writes 224 px copies once). For each, the
training loader (`data.make_loader`, augmentation on) is timed over a full epoch after a
warm-up epoch, with 0 and with `--workers` worker processes; with 0 workers also with torch limited to
one thread while loading (small tensor ops such as the affine augmentation slow down
many times over when their threads wait for cores other processes hold).

The model side: images/s of a training step of `--backbone` (batch 8): stage 1 without
the cache (frozen backbone forward + adapter) and full fine-tuning. Loader images/s over
the model's says whether the loader can keep up (> 1). On a GPU machine the model runs
on the GPU while workers decode on the CPU; on the CPU both share the same cores.

Also measured, interleaved: decoding one file with PIL against the decoder the loader uses
(libjpeg-turbo / libpng through torchvision.io, data/images.py), on the JPEG photos and
on the PNG copies prepare writes. The loader runs with `train.num_workers: auto` too (what
it resolves to on this machine), its workers persistent across epochs.

    python benchmarks/loader.py [--images 200 --src-size 1024 --workers 2 --backbone vit_small_patch16_224]
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np
import torch
import torch.nn.functional as F

from cladapter_core.data import loader_workers, make_loader, prepare
from cladapter_core.model import build_model
from cladapter_core.params import load_params, model_kwargs


def make_photos(out: Path, n: int, size: int, seed: int = 0) -> Path:
    """n JPEG photos (10 classes) of size x 3/4 size from the digits, with colour and texture."""
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    rng = np.random.default_rng(seed)
    h, w = size * 3 // 4, size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i in range(n):
        label = int(digits.target[i])
        img = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        base = np.asarray(img, dtype=np.float32)[..., None] / 255.0
        tint = rng.uniform(0.3, 1.0, size=3)
        grad = np.stack([xx, yy, 1 - xx], axis=-1).astype(np.float32)
        noise = rng.normal(0, 0.08, size=(h, w, 3)).astype(np.float32)
        arr = np.clip(0.6 * base * tint + 0.3 * grad + noise, 0, 1)
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((arr * 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return out


def decoders(files: list[Path], repeats: int = 3) -> dict:
    """ms per file: PIL (what the loader used before) vs the loader's decoder, interleaved."""
    from cladapter_core.data import images

    def pil():
        for f in files:
            images._channels_last_2d(images._decode_pil(f))

    def ours():
        for f in files:
            images.decode_image(f)
    times = C.time_interleaved({"PIL": pil, "torchvision.io": ours}, 1, repeats, torch.device("cpu"))
    ms = {k: C.median(v) / len(files) * 1e3 for k, v in times.items()}
    return {"ms_per_file": ms, "speedup": ms["PIL"] / ms["torchvision.io"]}


def loader_ips(prepared: Path, config: dict, params: dict, workers: int, threads: int | None = None) -> float:
    """Images/s of one training epoch after a warm-up epoch. `threads` limits torch's
    intra-op threads in this process while loading (workers always use one)."""
    params = {**params, "train": {**params["train"], "num_workers": workers}}
    loader = make_loader(prepared, "train", config, True, params)  # workers persist (data.loader_options)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        for _ in loader:  # warm-up epoch: worker start-up, file cache
            pass
        t0 = time.perf_counter()
        n = sum(len(y) for _, y in loader)
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--src-size", type=int, default=1024, help="width of the source photos (height 3/4 of it)")
    p.add_argument("--resize", type=int, default=224, help="data.resize for the prepared copy")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="loader batch (train.batch_size)")
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--model-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    device = C.pick_device(args.device)
    info = C.banner(f"data loader vs model: {args.images} photos of {args.src_size} px, "
                    f"with and without data.resize={args.resize}", device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cladapter-bench-loader-"))
    t0 = time.time()
    make_photos(work / "photos", args.images, args.src_size)
    print(f"# wrote {args.images} photos in {time.time() - t0:.1f} s")
    base = [f"model.backbone={args.backbone}", "model.backbone_kwargs={}", "model.rank=256", "model.pretrained=false",
            f"train.batch_size={args.batch_size}", "data.val_fraction=0.05", "data.test_fraction=0.05"]
    prepared = {}
    prep_s = {}
    for label, extra in (("as is", []), (f"resized to {args.resize} at prepare", [f"data.resize={args.resize}"])):
        params = load_params(None, base + extra)
        t0 = time.time()
        prepare(work / "photos", work / f"prepared-{len(prepared)}", params)
        prep_s[label] = time.time() - t0
        prepared[label] = (work / f"prepared-{len(prepared)}", params)

    torch.manual_seed(0)
    params = load_params(None, base)
    model = build_model(num_classes=10, **model_kwargs(params)).to(device)
    config = model.config_dict()
    rows, results = [], {"loader": [], "model": []}
    for label, (pdir, prm) in prepared.items():
        for workers, threads in ((0, None), (0, 1), (args.workers, None), ("auto", None)):
            ips = loader_ips(pdir, config, prm, workers, threads)
            how = (f"num_workers auto ({loader_workers('auto', device.type)} here)" if workers == "auto"
                   else f"{workers} workers") + (f", {threads} torch thread" if threads else "")
            rows.append(["loader", f"{label}, {how}", f"{ips:.1f}"])
            results["loader"].append({"data": label, "workers": workers, "torch_threads": threads or
                                      torch.get_num_threads(), "images_per_s": ips, "prepare_s": prep_s[label]})

    x = torch.randn(args.model_batch, *config["input_size"], device=device)
    y = torch.randint(0, 10, (args.model_batch,), device=device)

    def step(stage, fwd):
        opt = torch.optim.Adam([q for q in model.parameters()], lr=1e-5)

        def run():
            model.set_stage(stage).train()
            opt.zero_grad(set_to_none=True)
            with C.autocast(device):
                loss = F.cross_entropy(fwd(x).float(), y)
            loss.backward()
            opt.step()
        return run
    fns = {"stage 1 uncached (CLAdapter)": step(1, model),
           "full fine-tuning": step(2, lambda t: model.head(model.backbone.forward_pooled(t)))}
    times = C.time_interleaved(fns, 1, args.steps, device)
    for name, ts in times.items():
        ips = args.model_batch / C.median(ts)
        rows.append(["model", f"{args.backbone} {name}", f"{ips:.1f}"])
        results["model"].append({"variant": name, "images_per_s": ips, "times_s": ts})
    fastest_model = max(r["images_per_s"] for r in results["model"])
    for r in results["loader"]:
        r["over_fastest_model"] = r["images_per_s"] / fastest_model
    for row, r in zip(rows, results["loader"]):
        row.append(f"{r['over_fastest_model']:.1f}x")
    for row in rows[len(results["loader"]):]:
        row.append("-")
    print(f"# loader: batch {args.batch_size}, augmentation on, a full epoch after a warm-up epoch; "
          f"model: batch {args.model_batch}, forward + backward + Adam")
    print(C.fmt_table(["side", "configuration", "images/s", "loader / fastest model"], rows))
    print("# prepare time: " + ", ".join(f"{k}: {v:.1f} s" for k, v in prep_s.items()))
    jpegs = sorted((work / "photos").rglob("*.jpg"))[:50]
    pngs = sorted((work / "prepared-1").rglob("*.png"))[:50]
    results["decoders"] = {"jpeg": decoders(jpegs), "png": decoders(pngs)}
    print(C.fmt_table(["files", "PIL ms/file", "torchvision.io ms/file", "speed-up"], [
        [f"{len(fs)} {kind.upper()} ({'photos' if kind == 'jpeg' else 'prepared copies'})",
         f"{d['ms_per_file']['PIL']:.2f}", f"{d['ms_per_file']['torchvision.io']:.2f}", f"{d['speedup']:.2f}x"]
        for kind, fs, d in (("jpeg", jpegs, results["decoders"]["jpeg"]), ("png", pngs, results["decoders"]["png"]))]))
    C.write_json("loader", {"command": C.command_line(), "device": info, "args": vars(args),
                            "results": results}, args.json)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
