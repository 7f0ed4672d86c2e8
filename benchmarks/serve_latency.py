"""Benchmark 9: the served champion over HTTP against `cladapter predict`, on the same images (CPU).

A CLAdapter model (ViT-S/16 at 224 px by default; K=20, r=256, random weights, 10 classes)
is registered and promoted in a throw-away MLflow store (SQLite) and served with
`cladapter serve` (`mlflow models serve`, one worker, this environment). The same N JPEG
files (256 x 256, resized by the model's own preprocessing) go to:

- the server, one image per request, one request at a time: latency p50/p95, images/s;
- the server, B images per request: latency per request, images/s;
- `cladapter predict` on all N files, as a command (process start, imports, model load,
  decoding, inference: what a user waits for), and its function `predict()` in a process
  of its own that has loaded the model and warmed up (the work a warm server does).

Rounds are interleaved, so load from other processes falls on all alike; medians are
reported. The served probabilities are checked against predict's (1e-5).

    python benchmarks/serve_latency.py [--backbone vit_small_patch16_224 --images 32 --batch 16 --rounds 3]
"""
from __future__ import annotations

import base64
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np
import requests
import torch

BIN = Path(sys.executable).parent
# predict() in a process of its own, as the server has one: load, warm up, then time a call.
PREDICT_FN = """
import json, sys, time
from pathlib import Path
from cladapter_core.evaluation.evaluate import predict
from cladapter_core.model import load_model
model, out, batch, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
t0 = time.perf_counter(); load_model(model); load = time.perf_counter() - t0
predict(model, files[:2], out, batch_size=batch)
t0 = time.perf_counter(); predict(model, files, out, batch_size=batch)
print(json.dumps({"load": load, "predict": time.perf_counter() - t0}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    files = []
    for i in range(n):
        f = rng.uniform(2, 9, 3)
        img = np.stack([np.sin(x * f[0] + i) * np.cos(y * f[1]), np.sin((x + y) * f[2]),
                        rng.random((size, size))], -1)
        path = folder / f"img{i:03d}.jpg"
        Image.fromarray(((img - img.min()) / np.ptp(img) * 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files


def register_champion(root: Path, backbone: str, num_classes: int) -> str:
    """Save a model, register and promote it in root/mlflow.db; returns the model name."""
    from cladapter_core import build_model, registry, save_model
    from cladapter_core.params import load_params
    torch.manual_seed(0)
    model = build_model(backbone, num_classes, mode="cla", num_centers=20, rank=256,
                        class_names=[f"c{i}" for i in range(num_classes)], pretrained=False)
    save_model(model, root / "model")
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text('{"macro_f1": 0.5}')
    params = load_params(None)
    params["register"]["model_name"] = "bench"
    registry.register(root / "model", root / "eval", params)
    registry.promote(params)
    return "bench"


def start_server(root: Path, port: int) -> subprocess.Popen:
    (root / "params.yaml").write_text("register:\n  model_name: bench\n")
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "cladapter"), "serve", "--params", "params.yaml", "--port",
                             str(port)], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cladapter serve exited:\n{(root / 'serve.log').read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit("cladapter serve did not answer within 300 s")


def post(port: int, blobs: list[str]) -> list[dict]:
    r = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=600,
                      json={"dataframe_split": {"columns": ["image"], "data": [[b] for b in blobs]}})
    r.raise_for_status()
    return r.json()["predictions"]


def percentile(xs, q) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def measure(args, root: Path, files: list[Path], port: int) -> dict:
    """Interleaved rounds of the four ways; returns the raw seconds and the last answers."""
    blobs = [base64.b64encode(f.read_bytes()).decode() for f in files]
    post(port, blobs[:2])  # warm-up: first request pays lazy imports
    t = {"single": [], "batch": [], "batch_total": [], "predict_cli": [], "predict_fn": [], "load": []}
    served = None
    for _ in range(args.rounds):
        for b in blobs:
            t0 = time.perf_counter()
            post(port, [b])
            t["single"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        served = []
        for i in range(0, len(blobs), args.batch):
            t1 = time.perf_counter()
            served += post(port, blobs[i:i + args.batch])
            t["batch"].append(time.perf_counter() - t1)
        t["batch_total"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "cladapter"), "predict", "--model", str(root / "model"),
                        *map(str, files), "--out", str(root / "cli.csv"),
                        "--batch-size", str(args.batch)], check=True, capture_output=True, cwd=root)
        t["predict_cli"].append(time.perf_counter() - t0)
        fn = subprocess.run([sys.executable, "-c", PREDICT_FN, str(root / "model"),
                             str(root / "fn.csv"), str(args.batch), *map(str, files)],
                            check=True, capture_output=True, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(C.REPO)})
        got = json.loads(fn.stdout.strip().splitlines()[-1])
        t["load"].append(got["load"])
        t["predict_fn"].append(got["predict"])
    with open(root / "cli.csv", newline="") as fh:
        cli = list(csv.DictReader(fh))
    classes = [k[5:] for k in cli[0] if k.startswith("prob_")]
    diff = max(abs(s[f"prob_{c}"] - float(r[f"prob_{c}"])) for s, r in zip(served, cli) for c in classes)
    same = all(s["label"] == r["predicted"] for s, r in zip(served, cli)) and diff <= 1e-5
    return {"seconds": t, "max_abs_prob_diff_vs_predict": diff, "same_answers": same}


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--image-size", type=int, default=256, help="side of the JPEG files (px)")
    p.add_argument("--batch", type=int, default=16, help="images per request (and predict's batch)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    info = C.banner(f"serving {args.backbone}: HTTP (cladapter serve) vs cladapter predict, "
                    f"{args.images} JPEGs of {args.image_size} px", torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        register_champion(root, args.backbone, args.classes)
        files = write_images(root / "images", args.images, args.image_size)
        port = free_port()
        proc = start_server(root, port)
        try:
            res = measure(args, root, files, port)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    t, n = res["seconds"], args.images
    summary = {
        "served_1_per_request": {"latency_p50_s": C.median(t["single"]),
                                 "latency_p95_s": percentile(t["single"], 95),
                                 "images_per_s": 1 / C.median(t["single"])},
        f"served_{args.batch}_per_request": {"latency_p50_s": C.median(t["batch"]),
                                             "images_per_s": n / C.median(t["batch_total"])},
        "predict_command": {"wall_s": C.median(t["predict_cli"]),
                            "images_per_s": n / C.median(t["predict_cli"])},
        "predict_function_model_loaded": {"wall_s": C.median(t["predict_fn"]),
                                          "images_per_s": n / C.median(t["predict_fn"]),
                                          "model_load_s": C.median(t["load"])},
    }
    rows = [["served, 1 image / request", f"{summary['served_1_per_request']['latency_p50_s'] * 1e3:.0f} ms "
             f"(p95 {summary['served_1_per_request']['latency_p95_s'] * 1e3:.0f} ms)",
             summary["served_1_per_request"]["images_per_s"]],
            [f"served, {args.batch} images / request",
             f"{summary[f'served_{args.batch}_per_request']['latency_p50_s'] * 1e3:.0f} ms",
             summary[f"served_{args.batch}_per_request"]["images_per_s"]],
            [f"`cladapter predict` command, {n} files", f"{summary['predict_command']['wall_s']:.1f} s",
             summary["predict_command"]["images_per_s"]],
            ["`predict()` with the model loaded", f"{summary['predict_function_model_loaded']['wall_s']:.2f} s",
             summary["predict_function_model_loaded"]["images_per_s"]]]
    print(f"# median of {args.rounds} interleaved rounds; served == predict: {res['same_answers']} "
          f"(max |dp| {res['max_abs_prob_diff_vs_predict']:.1e})")
    print(C.fmt_table(["way", "latency (per request / call)", "images/s"], rows))
    C.write_json("serve_latency", {"command": C.command_line(), "device": info, "args": vars(args),
                                   "summary": summary, **res}, args.json)


if __name__ == "__main__":
    main()
