"""Does a compiled pipeline run on a given KFP backend? The backend's driver parses each
executor's Kubernetes config (the YAML's second document, `platforms.kubernetes`) with the
kfp-kubernetes proto it was built with and rejects any field it does not know, so every
step of a pipeline that uses a newer field fails before it starts.

    python -m pipelines.backend_check pipelines/cladapter_pipeline.yaml --proto 2.14.0

fetches that kfp-kubernetes sdist from PyPI once (`pip download --no-deps`, kept under
the cache folder), and parses every executor's config with its
`kubernetes_executor_config_pb2.KubernetesExecutorConfig`
(`google.protobuf.json_format.ParseDict`, unknown fields refused), each proto version in
a process of its own (two versions of one proto cannot share a descriptor pool). Prints
one line per problem; exit code 1 when there is one.

    python -m pipelines.backend_check --features [pipeline.yaml]

lists the pipeline-spec features the compiled YAML uses (`FEATURES`: each with the first
KFP backend release that runs it and the upstream change that added it) and fails when
one is newer than the oldest backend the docs claim (`OLDEST_KFP_BACKEND`).
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


# -- pipeline-spec features and the first backend that runs them ---------------------------
# Checked against kubeflow/pipelines at its release tags (`git show <tag>:<file>`): the
# first tag whose backend reads the field. KFP has no releases between 2.5.0 and 2.14.0.
UPSTREAM = "https://github.com/kubeflow/pipelines"
ARGO = "backend/src/v2/compiler/argocompiler"
DRIVER = "backend/src/v2/driver/driver.go"
FEATURES = {  # name -> (first backend release or None: no release yet, what shows it)
    "exit handler": ("2.0.0", f"{ARGO}/dag.go, ALL_UPSTREAM_TASKS_COMPLETED ({UPSTREAM}/pull/7642)"),
    "exit handler status (PipelineTaskFinalStatus input)": (
        "2.14.0", f"{ARGO}/dag.go at 2.5.0 returns 'task final status not supported yet'; "
                  f"support {UPSTREAM}/pull/11953"),
    "condition (dsl.If / dsl.Else)": ("2.0.0", f"{ARGO}/dag.go, triggerPolicy.condition ({UPSTREAM}/pull/7173)"),
    "ParallelFor": ("2.0.0", f"{ARGO}/dag.go, parameterIterator ({UPSTREAM}/pull/7173)"),
    "ParallelFor parallelism": ("2.4.0", f"{ARGO}/dag.go, iteratorPolicy.parallelismLimit ({UPSTREAM}/pull/10798)"),
    "dsl.OneOf (valueFromOneof)": ("2.4.0", f"{DRIVER}, sub-DAG output resolution ({UPSTREAM}/pull/11196)"),
    "retry policy, task of the root DAG": ("2.5.0", f"{ARGO}/container.go ({UPSTREAM}/pull/11673)"),
    "retry policy, task inside a DAG (exit handler, condition)": (
        "2.14.0", f"{ARGO}/container.go at 2.5.0 reads retryPolicy of root-DAG tasks only; "
                  f"nested: {UPSTREAM}/pull/11908"),
    "retry policy, task inside ParallelFor": (
        None, f"ignored by every release so far ({UPSTREAM}/issues/13897, {UPSTREAM}/issues/12389)"),
    "k8s secretAsEnv": ("2.0.0", f"{DRIVER} ({UPSTREAM}/pull/9178)"),
    "k8s secretAsEnv.secretNameParameter": ("2.5.0", f"{DRIVER} ({UPSTREAM}/pull/11770)"),
    "k8s configMapAsEnv": ("2.1.0", f"{DRIVER} ({UPSTREAM}/pull/10483)"),
    "k8s configMapAsEnv.configMapNameParameter": ("2.5.0", f"{DRIVER} ({UPSTREAM}/pull/11770)"),
    "k8s tolerations": ("2.1.0", f"{DRIVER} ({UPSTREAM}/pull/10471)"),
    "k8s podMetadata": ("2.1.0", f"{ARGO}/container.go ({UPSTREAM}/pull/10393)"),
    "k8s activeDeadlineSeconds": ("2.1.0", f"{DRIVER} ({UPSTREAM}/pull/10481)"),
    "k8s genericEphemeralVolume": ("2.2.0", f"{DRIVER} ({UPSTREAM}/pull/10605)"),
    "k8s emptyDirMounts": ("2.3.0", f"{DRIVER} ({UPSTREAM}/pull/10913)"),
    "k8s emptyDirMounts.sizeLimit": ("2.3.0", f"{DRIVER} ({UPSTREAM}/pull/10913)"),
    "k8s secretAsVolume": ("2.0.0", f"{DRIVER} ({UPSTREAM}/pull/9178)"),
    "k8s secretAsVolume.optional": ("2.2.0", f"{DRIVER} ({UPSTREAM}/pull/10550)"),
}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def _dag_tasks(spec: dict):
    """(task name, task, inside: 'root' | 'dag' | 'loop') of every DAG in the pipeline spec."""
    loops = set()
    for comp in [spec["root"], *spec["components"].values()]:
        for task in ((comp.get("dag") or {}).get("tasks") or {}).values():
            if "parameterIterator" in task or "artifactIterator" in task:
                loops.add(task["componentRef"]["name"])
    yield from (("root", n, t) for n, t in spec["root"]["dag"]["tasks"].items())
    for cname, comp in spec["components"].items():
        for n, t in ((comp.get("dag") or {}).get("tasks") or {}).items():
            yield ("loop" if cname in loops else "dag"), n, t


def _documents(pipeline_yaml) -> list:
    """The YAML's documents (pipeline spec, platform spec); libyaml's parser when present."""
    import yaml
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return list(yaml.load_all(Path(pipeline_yaml).read_text(), Loader=loader))


def features_used(pipeline_yaml) -> dict[str, list[str]]:
    """Feature name (a key of FEATURES) -> the tasks / executors of `pipeline_yaml` using it."""
    docs = _documents(pipeline_yaml)
    spec, used = docs[0], {}

    def add(feature, where):
        used.setdefault(feature, []).append(where)
    for inside, name, task in _dag_tasks(spec):
        params = (task.get("inputs") or {}).get("parameters") or {}
        if any("taskFinalStatus" in p for p in params.values()):
            add("exit handler status (PipelineTaskFinalStatus input)", name)
        policy = task.get("triggerPolicy") or {}
        if policy.get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED":
            add("exit handler", name)
        if policy.get("condition"):
            add("condition (dsl.If / dsl.Else)", name)
        if "parameterIterator" in task:
            add("ParallelFor", name)
        if (task.get("iteratorPolicy") or {}).get("parallelismLimit"):
            add("ParallelFor parallelism", name)
        if "retryPolicy" in task:
            add({"root": "retry policy, task of the root DAG",
                 "dag": "retry policy, task inside a DAG (exit handler, condition)",
                 "loop": "retry policy, task inside ParallelFor"}[inside], name)
    for cname, comp in spec["components"].items():
        outputs = ((comp.get("dag") or {}).get("outputs") or {}).get("parameters") or {}
        if any("valueFromOneof" in o for o in outputs.values()):
            add("dsl.OneOf (valueFromOneof)", cname)
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    for name, config in platform.items():
        for key, value in config.items():
            add(f"k8s {key}", name)
            for entry in value if isinstance(value, list) else []:
                for sub in entry if isinstance(entry, dict) else []:
                    if f"k8s {key}.{sub}" in FEATURES:
                        add(f"k8s {key}.{sub}", name)
    return {k: sorted(set(v)) for k, v in used.items()}


def backend_problems(pipeline_yaml, oldest: str, used: dict | None = None) -> list[str]:
    """What the KFP backend `oldest` would refuse or ignore in `pipeline_yaml` (or in the
    features `used`, from `features_used`): a feature newer than it, or one no table entry
    knows (add it to FEATURES with its source). A feature no release runs yet (version
    None) is not counted: the pipeline must work without it (see pipelines/README.md)."""
    problems = []
    for feature, where in (used or features_used(pipeline_yaml)).items():
        if feature not in FEATURES:
            problems.append(f"{feature} (used by {', '.join(where)}): not in the feature table; "
                            "find the first KFP backend release that supports it")
            continue
        first, source = FEATURES[feature]
        if first is not None and _version(first) > _version(oldest):
            problems.append(f"{feature} (used by {', '.join(where)}) needs KFP backend >= {first}, "
                            f"newer than {oldest}: {source}")
    return problems


def oldest_backend_needed(pipeline_yaml, used: dict | None = None) -> str:
    """The first KFP backend release that runs everything `pipeline_yaml` uses."""
    versions = [FEATURES[f][0] for f in (used or features_used(pipeline_yaml)) if FEATURES.get(f, (None,))[0]]
    return max(versions, key=_version, default="2.0.0")


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
    from pipelines.cladapter_pipeline import KFP_KUBERNETES_PROTO, OLDEST_KFP_BACKEND, PIPELINE_FILE
    ap = argparse.ArgumentParser(prog="python -m pipelines.backend_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline", nargs="?", default=str(PIPELINE_FILE))
    ap.add_argument("--proto", action="append", help=f"kfp-kubernetes version (default {KFP_KUBERNETES_PROTO})")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--features", action="store_true",
                    help=f"check the pipeline-spec features against KFP {OLDEST_KFP_BACKEND} instead")
    args = ap.parse_args(argv)
    if args.features:
        used = features_used(args.pipeline)
        for feature, where in sorted(used.items()):
            first = FEATURES.get(feature, ("?",))[0] or "no release (ignored)"
            print(f"{feature}: KFP >= {first} ({', '.join(where)})")
        problems = backend_problems(args.pipeline, OLDEST_KFP_BACKEND, used)
        print(f"needs KFP backend >= {oldest_backend_needed(args.pipeline, used)}; claimed: {OLDEST_KFP_BACKEND}")
        for line in problems:
            print(f"  {line}")
        return 1 if problems else 0
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
