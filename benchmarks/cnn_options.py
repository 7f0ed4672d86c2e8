"""The effect of `train.channels_last` and `train.compile` on a training step.

- channels_last: CNN full fine-tuning steps (batch 8, 224 px, forward + backward + Adam)
  with the model in NCHW and in NHWC (channels_last) memory format, interleaved. The
  trainer converts the model only; convolutions then give NHWC outputs from NCHW inputs.
- compile: `torch.compile` of the step's forward against eager, for the cached stage-1
  step (adapter + head on stored ViT-S tokens: what the trainer compiles when the cache
  is on) and for a CNN's full fine-tuning step. The first compiled step (compilation)
  is reported apart from the steady step time.

    python benchmarks/cnn_options.py [--cl-models convnext_base resnet50 --compile-models resnet18 --steps 2]
"""
from __future__ import annotations

import time

import _common as C
import torch
import torch.nn.functional as F

from cladapter_core.model import build_model


def step_fn(forward, params, x, y, device):
    opt = torch.optim.Adam(params, lr=1e-5)

    def run():
        opt.zero_grad(set_to_none=True)
        with C.autocast(device):
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        opt.step()
    return run


def full_ft(name, device, channels_last=False):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, mode="full", pretrained=False).to(device).set_stage(2).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--cl-models", nargs="+", default=["convnext_base", "resnet50"])
    p.add_argument("--compile-models", nargs="+", default=["resnet18"],
                   help="CNNs whose full fine-tuning step is compiled (compiling is slow on few cores)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--skip-compile", action="store_true")
    args = p.parse_args()
    device = C.pick_device(args.device)
    info = C.banner("channels_last and torch.compile: effect on a training step", device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    rows, results = [], []

    for name in args.cl_models:
        models = {"NCHW": full_ft(name, device), "channels_last": full_ft(name, device, True)}
        fns = {k: step_fn(m, m.parameters(), x, y, device) for k, m in models.items()}
        times = C.time_interleaved(fns, 1, args.steps, device)
        base, cl = C.median(times["NCHW"]), C.median(times["channels_last"])
        rows.append([name, "full fine-tuning step", "channels_last", f"{base:.2f}", f"{cl:.2f}",
                     f"{base / cl:.2f}x", "-"])
        results.append({"option": "channels_last", "model": name, "base_s": base, "option_s": cl,
                        "speedup": base / cl, "times": times})
        del models, fns

    if not args.skip_compile:
        targets = []
        # The cached stage-1 step: adapter + head on stored tokens (ViT-S: 196 x 384).
        torch.manual_seed(0)
        cla = build_model("vit_small_patch16_224", num_classes=10, mode="cla", num_centers=20,
                          rank=256, pretrained=False).to(device).set_stage(1).train()
        tokens = torch.randn(32, 196, cla.backbone.dim, device=device)
        targets.append(("vit_small_patch16_224", "cached stage-1 step (adapter + head on tokens, batch 32)",
                        cla.head_features,
                        [q for q in cla.parameters() if q.requires_grad], tokens, y.repeat(4)[:32]))
        for name in args.compile_models:
            m = full_ft(name, device)
            targets.append((name, "full fine-tuning step", m, list(m.parameters()), x, y))
        for model_name, label, fwd, params, inp, tgt in targets:
            eager = step_fn(fwd, params, inp, tgt, device)
            compiled = step_fn(torch.compile(fwd), params, inp, tgt, device)
            t0 = time.perf_counter()
            compiled()
            C.sync(device)
            first = time.perf_counter() - t0
            times = C.time_interleaved({"eager": eager, "compiled": compiled}, 1, args.steps, device)
            e, c = C.median(times["eager"]), C.median(times["compiled"])
            rows.append([model_name, label, "torch.compile", f"{e:.2f}", f"{c:.2f}",
                         f"{e / c:.2f}x", f"{first:.0f}"])
            results.append({"option": "compile", "model": model_name, "target": label, "base_s": e, "option_s": c,
                            "speedup": e / c, "first_compiled_step_s": first, "times": times})
    print(f"# median of {args.steps} interleaved steps after 1 warm-up (forward + backward + Adam)")
    print(C.fmt_table(["model", "step", "option", "off s", "on s", "speed-up", "first step s (compile)"], rows))
    C.write_json("cnn_options", {"command": C.command_line(), "device": info, "args": vars(args),
                                 "results": results}, args.json)


if __name__ == "__main__":
    main()
