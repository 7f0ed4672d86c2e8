"""Bytes moved per pipeline step for one dataset: the Dataset artifact by reference (now)
against the copy-everything artifact (before), measured in the same run.

A dataset of N JPEG photos (default 2,000, 10 classes, 256x256) is put under an S3
prefix of an S3-compatible server (a local moto server unless AWS_ENDPOINT_URL is set),
then the real pipeline code runs:

- prepare (`runtime.prepare_task`): reads every object (it must decode every file) and
  writes the artifact that KFP uploads to the pipeline root;
- every step that takes the Dataset (`runtime.local_data` with the splits it reads):
  KFP's launcher downloads the artifact whole, then the step fetches its files.

"before" is what the same steps moved when the artifact carried the files: prepare
uploaded the dataset and its manifest as the artifact, and every consumer downloaded all
of it (computed from the same run's files: the objects prepare read plus the prepared
folder). Model artifacts and MLflow traffic are the same either way and are not counted.

    python benchmarks/kfp_bytes.py              # 2,000 images, 2 tuning workers
    python benchmarks/kfp_bytes.py -S data.shots_per_class=20 --json benchmarks/results/kfp_bytes_20shot.json
    python benchmarks/kfp_bytes.py --images 500 --tune-workers 0
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_photos(n: int, classes: int, size: int, seed: int = 0):
    """(key, JPEG bytes): smooth random colour fields with noise, photo-like in size."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = i % classes
        base = np.stack([np.sin(xx * rng.uniform(2, 9) + c), np.cos(yy * rng.uniform(2, 9) - c),
                         np.sin((xx + yy) * rng.uniform(2, 9))], axis=-1)
        img = ((base * 0.4 + 0.5) * 255 + rng.normal(0, 12, base.shape)).clip(0, 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        yield f"class_{c:02d}/{i:05d}.jpg", buf.getvalue()


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--tune-workers", type=int, default=2, help="parallel tuning workers (0: tuning off)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a params field over the production params, e.g. -S data.shots_per_class=20")
    ap.add_argument("--json", default=str(RESULTS / "kfp_bytes.json"))
    args = ap.parse_args(argv)

    moto = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        moto, endpoint = start_moto()
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1")
    os.environ["CLADAPTER_TRACKING"] = "0"
    try:
        return run(args)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(10)


def run(args) -> int:
    from cladapter_core.model.weights import s3_client
    from components import runtime
    from pipelines.cladapter_pipeline import load_pipeline_params

    s3, bucket = s3_client(), f"kfp-bytes-{os.getpid()}"
    s3.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=f"cells/{kv[0]}", Body=kv[1]),
                      make_photos(args.images, args.classes, args.size)))
    uri = f"s3://{bucket}/cells"
    objects = sum(o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="cells/")
                  for o in page.get("Contents", []))
    # the production params (their data splits), with -S over them
    params = runtime.resolve_params({}, "; ".join(args.overrides), base=load_pipeline_params())

    with tempfile.TemporaryDirectory(prefix="kfp-bytes-") as tmp:
        art = Path(tmp) / "dataset"
        t0 = time.perf_counter()
        runtime.prepare_task(uri, "", "", params, art)
        prepare_s = time.perf_counter() - t0
        artifact = folder_bytes(art)
        prepared = folder_bytes(art / "prepared")
        # the old artifact: every object prepare read (source/), the prepared folder, source.json
        old_artifact = objects + prepared + (art / "source.json").stat().st_size
        with open(art / "prepared" / "manifest.csv", newline="") as fh:
            splits = [row["split"] for row in csv.DictReader(fh)]
        steps = []
        consumers = [("tune worker", ("train", "val"))] * args.tune_workers + [
            ("train stage 1", ("train", "val")), ("train stage 2", ("train", "val")),
            ("evaluate", ("test", "val")), ("register", None), ("promote (same-data champion)", ()),
            ("promote (re-evaluates the champion)", ("val",))]
        steps.append({"step": "prepare", "before": objects + old_artifact, "after": objects + artifact,
                      "detail": f"reads {args.images} objects ({mb(objects)}); uploads the artifact"})
        for name, wanted in consumers:
            if wanted is None:  # register takes no Dataset (already so before this change)
                steps.append({"step": name, "before": 0, "after": 0, "detail": "no Dataset input"})
                continue
            fetched, files = 0, 0
            if wanted:
                with runtime.local_data(art, list(wanted)) as local:
                    fetched = folder_bytes(local.parent / "source")
                    files = sum(1 for p in (local.parent / "source").rglob("*") if p.is_file())
            steps.append({"step": name, "before": old_artifact, "after": artifact + fetched,
                          "detail": f"artifact {mb(artifact)} + {files} files of {', '.join(wanted) or 'no split'}"})

    total_before = sum(s["before"] for s in steps if "promote (re" not in s["step"])
    total_after = sum(s["after"] for s in steps if "promote (re" not in s["step"])
    lines = [f"{args.images} JPEGs {args.size}x{args.size}, {args.classes} classes, {mb(objects)} under {uri}; "
             f"splits {', '.join(f'{k} {splits.count(k)}' for k in ('train', 'val', 'test'))}; "
             f"artifact before {mb(old_artifact)}, after {mb(artifact)}; prepare took {prepare_s:.1f} s"
             + (f"; {' '.join(args.overrides)}" if args.overrides else ""),
             "", "| step | before | after | after / before | what moves now |", "|---|---:|---:|---:|---|"]
    for s in steps:
        ratio = f"{s['after'] / s['before']:.3f}" if s["before"] else "-"
        lines.append(f"| {s['step']} | {mb(s['before'])} | {mb(s['after'])} | {ratio} | {s['detail']} |")
    lines.append(f"| **run total** ({args.tune_workers} tuning workers, promote on same data) | "
                 f"**{mb(total_before)}** | **{mb(total_after)}** | **{total_after / total_before:.3f}** | |")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "command": " ".join(["python benchmarks/kfp_bytes.py", *sys.argv[1:]]), "images": args.images,
        "overrides": args.overrides, "lines": lines,
        "object_bytes": objects, "artifact_before": old_artifact, "artifact_after": artifact,
        "steps": steps, "total_before": total_before, "total_after": total_after}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
