"""Benchmark 1: the cluster-attention mixing, this implementation against the reference's.

M = sum_k a_k T_k. The reference code repeats `a` and T to (B, K, r, r), multiplies and
sums over K; `cladapter_core.model.adapter.ClusterAttention` uses einsum('bk,kij->bij'), which
never builds the (B, K, r, r) tensors. Both are timed forward + backward at ViT-B shapes
(B=32, N=196, D=768, K=20, r=256) on the same parameters and inputs:

- `mixing`: forming M only (inputs a (B, K) and T), the step the two formulations differ in;
- `layer`:  the whole ClusterAttention layer (assignments, M, Down, bmm, Up).

Checks that outputs and every gradient agree (max |difference| / max |value| <= 1e-5),
and prints the time ratio (median of interleaved repeats) and the peak-memory ratio
(CPU: peak bytes of the allocator during one forward + backward, from torch.profiler's
memory events; CUDA: torch.cuda.max_memory_allocated).

    python benchmarks/adapter_op.py [--batch 32 --tokens 196 --dim 768 --centers 20 --rank 256]
"""
from __future__ import annotations

import _common as C
import torch

from cladapter_core.model.adapter import ClusterAttention
from cladapter_core.model.config import AdapterConfig


def reference_forward(attn: ClusterAttention, x: torch.Tensor) -> torch.Tensor:
    """The reference code's formulation of the same layer."""
    a = attn.assignments(x)
    b, k = a.shape
    t = attn.transforms.unsqueeze(0).repeat(b, 1, 1, 1)            # (B, K, r, r)
    m = (a.view(b, k, 1, 1).repeat(1, 1, attn.rank, attn.rank) * t).sum(dim=1)
    return attn.up(torch.bmm(attn.down(x), m))


def reference_mix(a: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    b, k = a.shape
    r = transforms.shape[-1]
    return (a.view(b, k, 1, 1).repeat(1, 1, r, r) * transforms.unsqueeze(0).repeat(b, 1, 1, 1)).sum(dim=1)


def einsum_mix(a: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bk,kij->bij", a, transforms)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=196)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--centers", type=int, default=20)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = C.pick_device(args.device)
    info = C.banner("adapter op: einsum (this) vs repeat-multiply-sum (reference), forward + backward", device)

    torch.manual_seed(0)
    B, N, D, K, R = args.batch, args.tokens, args.dim, args.centers, args.rank
    attn = ClusterAttention(D, AdapterConfig(num_centers=K, rank=R)).to(device)
    x = torch.randn(B, N, D, device=device, requires_grad=True)
    a0 = torch.softmax(torch.randn(B, K, device=device), dim=-1).requires_grad_(True)
    g_layer = torch.randn(B, N, D, device=device)
    g_mix = torch.randn(B, R, R, device=device)

    def layer_step(fwd):
        def run():
            attn.zero_grad(set_to_none=True)
            x.grad = None
            fwd(x).backward(g_layer)
        return run

    def mix_step(fn):
        def run():
            a0.grad = None
            attn.transforms.grad = None
            fn(a0, attn.transforms).backward(g_mix)
        return run

    variants = {
        ("layer", "einsum"): layer_step(attn),
        ("layer", "reference"): layer_step(lambda t: reference_forward(attn, t)),
        ("mixing", "einsum"): mix_step(einsum_mix),
        ("mixing", "reference"): mix_step(reference_mix),
    }

    # Same numbers: outputs and gradients of both formulations.
    agreement = {}
    for level in ("layer", "mixing"):
        got = {}
        for impl in ("einsum", "reference"):
            if level == "layer":
                attn.zero_grad(set_to_none=True)
                x.grad = None
                out = attn(x) if impl == "einsum" else reference_forward(attn, x)
                out.backward(g_layer)
                got[impl] = [out.detach().clone(), x.grad.clone()] + [
                    q.grad.clone() for q in attn.parameters()]
            else:
                a0.grad = None
                attn.transforms.grad = None
                out = (einsum_mix if impl == "einsum" else reference_mix)(a0, attn.transforms)
                out.backward(g_mix)
                got[impl] = [out.detach().clone(), a0.grad.clone(), attn.transforms.grad.clone()]
        agreement[level] = max(rel_diff(e, r) for e, r in zip(got["einsum"], got["reference"]))

    times = C.time_interleaved({f"{lv}/{im}": fn for (lv, im), fn in variants.items()},
                               warmup=1, repeats=args.repeats, device=device)
    peaks = {f"{lv}/{im}": C.peak_memory(fn, device) for (lv, im), fn in variants.items()}

    rows, results = [], []
    for level in ("mixing", "layer"):
        te, tr = C.median(times[f"{level}/einsum"]), C.median(times[f"{level}/reference"])
        me, mr = peaks[f"{level}/einsum"], peaks[f"{level}/reference"]
        ok = agreement[level] <= 1e-5
        rows.append([level, f"{te * 1e3:.1f}", f"{tr * 1e3:.1f}", f"{tr / te:.2f}x",
                     f"{me / 2**20:.1f}", f"{mr / 2**20:.1f}", f"{mr / max(me, 1):.1f}x",
                     f"{agreement[level]:.1e} ({'ok' if ok else 'FAIL'})"])
        results.append({"level": level, "einsum_ms": te * 1e3, "reference_ms": tr * 1e3,
                        "time_ratio": tr / te, "einsum_peak_bytes": me, "reference_peak_bytes": mr,
                        "memory_ratio": mr / max(me, 1), "max_rel_diff": agreement[level],
                        "same_numbers_1e-5": ok, "einsum_times_s": times[f"{level}/einsum"],
                        "reference_times_s": times[f"{level}/reference"]})
    print(f"# B={B} N={N} D={D} K={K} r={R}, forward + backward, median of {args.repeats} interleaved repeats")
    print(C.fmt_table(["part", "einsum ms", "reference ms", "speed-up", "einsum peak MiB",
                       "reference peak MiB", "memory ratio", "max rel. diff"], rows))
    print("# target: >= 2x faster and >= 5x less peak memory, same numbers to 1e-5")
    C.write_json("adapter_op", {"command": C.command_line(), "device": info, "shape": {
        "B": B, "N": N, "D": D, "K": K, "r": R}, "results": results}, args.json)
    if not all(r["same_numbers_1e-5"] for r in results):
        raise SystemExit("the two formulations disagree beyond 1e-5")


if __name__ == "__main__":
    main()
