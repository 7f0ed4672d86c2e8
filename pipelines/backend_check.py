"""Does a compiled pipeline run on a given KFP backend? The backend's driver parses each
executor's Kubernetes config (the YAML's second document, `platforms.kubernetes`) with the
kfp-kubernetes proto it was built with and rejects any field it does not know, so every
step of a pipeline that uses a newer field fails before it starts.

    python -m pipelines.backend_check pipelines/cladapter_pipeline.yaml --proto 1.5.0

fetches that kfp-kubernetes sdist from PyPI once (`pip download --no-deps`, kept under
the cache folder), and parses every executor's config with its
`kubernetes_executor_config_pb2.KubernetesExecutorConfig`
(`google.protobuf.json_format.ParseDict`, unknown fields refused), each proto version in
a process of its own (two versions of one proto cannot share a descriptor pool). Prints
one line per problem; exit code 1 when there is one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

PB2 = "kfp/kubernetes/kubernetes_executor_config_pb2.py"
DEFAULT_CACHE = Path(os.environ.get("CLADAPTER_TEST_CACHE", Path.home() / ".cache" / "cladapter-tests"))

# Run in a fresh interpreter that never imports the installed kfp.kubernetes.
_PARSE = r"""
import importlib.util, json, sys
from google.protobuf import json_format
spec = importlib.util.spec_from_file_location("kec_pb2", sys.argv[1])
pb2 = importlib.util.module_from_spec(spec); spec.loader.exec_module(pb2)
problems = []
for name, config in json.load(sys.stdin).items():
    try:
        json_format.ParseDict(config, pb2.KubernetesExecutorConfig(), ignore_unknown_fields=False)
    except json_format.ParseError as e:
        problems.append(f"{name}: {e}")
print(json.dumps(problems))
"""


def _download(version: str, folder: Path) -> Path:
    """The kfp-kubernetes `version` distribution from PyPI, without its dependencies: the
    wheel when there is one (nothing is built), else the sdist."""
    for how in (["--only-binary", ":all:"], ["--no-binary", ":all:", "--no-build-isolation"]):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *how,
                        f"kfp-kubernetes=={version}", "-d", str(folder)],
                       capture_output=True, text=True, timeout=600)
        found = sorted(folder.glob("kfp[_-]kubernetes-*"))
        if found:
            return found[0]
    raise RuntimeError(f"pip download kfp-kubernetes=={version}: no wheel or sdist could be fetched")


def fetch_proto(version: str, cache_dir=DEFAULT_CACHE) -> Path:
    """The `kubernetes_executor_config_pb2.py` of kfp-kubernetes `version` (cached)."""
    folder = Path(cache_dir) / f"kfp-kubernetes-{version}"
    pb2 = folder / "kubernetes_executor_config_pb2.py"
    if pb2.is_file():
        return pb2
    folder.mkdir(parents=True, exist_ok=True)
    dist = _download(version, folder)
    if dist.suffix == ".whl":
        import zipfile
        with zipfile.ZipFile(dist) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith(PB2)))
    else:
        with tarfile.open(dist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(PB2))
            data = tar.extractfile(member).read()
    tmp = pb2.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(pb2)
    return pb2


def executor_configs(pipeline_yaml) -> dict:
    """Executor name -> its Kubernetes config, from a compiled pipeline YAML."""
    import yaml
    docs = list(yaml.safe_load_all(Path(pipeline_yaml).read_text()))
    if len(docs) < 2:
        return {}
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def check(pipeline_yaml, version: str, cache_dir=DEFAULT_CACHE, configs: dict | None = None) -> list[str]:
    """Problems the driver with kfp-kubernetes proto `version` would report (empty: none)."""
    pb2 = fetch_proto(version, cache_dir)
    configs = executor_configs(pipeline_yaml) if configs is None else configs
    proc = subprocess.run([sys.executable, "-c", _PARSE, str(pb2)], input=json.dumps(configs),
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"parsing with kfp-kubernetes {version}'s proto failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    from pipelines.cladapter_pipeline import KFP_KUBERNETES_PROTO, PIPELINE_FILE
    ap = argparse.ArgumentParser(prog="python -m pipelines.backend_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline", nargs="?", default=str(PIPELINE_FILE))
    ap.add_argument("--proto", action="append", help=f"kfp-kubernetes version (default {KFP_KUBERNETES_PROTO})")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    args = ap.parse_args(argv)
    bad = 0
    for version in args.proto or [KFP_KUBERNETES_PROTO]:
        problems = check(args.pipeline, version, args.cache)
        print(f"kfp-kubernetes {version}: " + ("accepted" if not problems else f"{len(problems)} problem(s)"))
        for line in problems:
            print(f"  {line}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
