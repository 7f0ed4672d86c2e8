"""Stage 2 of a large model on many GPU nodes, as a Kubeflow Trainer TrainJob.

A pipeline step with `train_nodes > 1` calls `stage2_task` (`launch` inside the step's
MLflow stage run): `launch` renders the TrainJob from `components/templates/trainjob-stage2.yaml`
(package data: it is in the wheel and the image), validates it against the Trainer's
published API models, creates it as the ServiceAccount `cladapter-trainjob-launcher` (its
token mounted in this step only: infra/k8s/training), waits for it and fetches the trained
model into the step's output.
Single-node training (one GPU, or several through torchrun) stays in `runtime.train_task`.

Every node of the TrainJob runs `python -m components.multinode node --spec-json ...`
(`node`): it fetches the prepared dataset and the stage-1 model by URI (`s3://` or a
path), restores the checkpoint mirrored under `checkpoint_prefix` (a retried TrainJob
resumes), runs `torchrun` with a c10d rendezvous at the address the Trainer's torch
runtime gives every node (PET_MASTER_ADDR:PET_MASTER_PORT, PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK), and the node whose process had global rank 0 (the
one that saved the model) uploads it to `out_uri`. tests/test_multinode.py runs two such
nodes on loopback (gloo) and compares them with one process.

    python -m components.multinode render --nodes 4 --gpus-per-node 8 --image IMG ...
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cladapter_core.settings import settings, var
from cladapter_core import storage
from cladapter_core.errors import CLAdapterError, ParamsError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).with_name("templates") / "trainjob-stage2.yaml"
# The token of the ServiceAccount that may create TrainJobs (infra/k8s/training): a Secret
# mounted into the stage-2 step only, so the runs' other steps cannot create pods' owners.
LAUNCHER_SECRET = "cladapter-trainjob-launcher-token"
LAUNCHER_TOKEN_DIR = Path("/var/run/secrets/cladapter.io/trainjob-launcher")
GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RDZV_PORT = "29400"
STAGE = "train_stage2"
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


# -- the manifest ----------------------------------------------------------------------------
def job_name(pipeline_id: str) -> str:
    """A DNS-1035 label (TrainJob names are), unique per pipeline run, at most 63 chars."""
    tail = re.sub(r"[^a-z0-9-]+", "-", str(pipeline_id).lower()).strip("-") or "run"
    return f"cladapter-stage2-{tail}"[:63].rstrip("-")


def render(spec: dict, *, name: str, namespace: str, image: str, nodes: int, gpus_per_node: int,
           template: Path = TEMPLATE) -> dict:
    """The TrainJob for one multi-node stage-2 run: the template with its rendered fields
    filled in. `spec` is what every node reads (see `node`)."""
    if nodes < 2:
        raise ParamsError(f"train_nodes={nodes}: a multi-node TrainJob needs 2 or more nodes")
    if gpus_per_node < 1:
        raise ParamsError(f"gpus_per_node={gpus_per_node}: each node needs at least one GPU")
    doc = copy.deepcopy(yaml.safe_load(Path(template).read_text()))
    doc["metadata"].update(name=name, namespace=namespace)
    trainer = doc["spec"]["trainer"]
    trainer.update(image=image, numNodes=int(nodes), numProcPerNode=int(gpus_per_node))
    gpus = str(int(gpus_per_node))
    for part in ("requests", "limits"):
        trainer["resourcesPerNode"][part]["nvidia.com/gpu"] = gpus
    trainer["args"] = ["--spec-json", json.dumps(spec, sort_keys=True)]
    return doc


def validate(doc: dict) -> list[str]:
    """Problems of a TrainJob against the Kubeflow Trainer's published API models (PyPI
    `kubeflow-trainer-api`, generated from the Trainer's OpenAPI spec, the same Go types as
    its CRD): every key at every level must be a field of its model (the generated models
    drop unknown keys silently, the API server would prune or refuse them), and pydantic
    checks each value's type and the required fields; plus apiVersion/kind and the name
    rule (DNS-1035 label) the CRD states."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    problems = []
    if doc.get("apiVersion") != f"{GROUP}/{VERSION}" or doc.get("kind") != KIND:
        problems.append(f"apiVersion/kind: must be {GROUP}/{VERSION} {KIND}, got "
                        f"{doc.get('apiVersion')} {doc.get('kind')}")
    name = (doc.get("metadata") or {}).get("name", "")
    if not (isinstance(name, str) and len(name) <= 63 and _NAME.fullmatch(name)):
        problems.append(f"metadata.name: {name!r} is not a DNS-1035 label (a-z, 0-9, '-', <= 63)")
    problems += _unknown_keys(doc, TrainerV1alpha1TrainJob, "")
    from pydantic import ValidationError
    try:
        TrainerV1alpha1TrainJob.from_dict(doc)
    except ValidationError as e:  # raised by the innermost model whose value is wrong
        problems += [f"{e.title}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    except (AttributeError, TypeError) as e:  # a list where a mapping belongs, and the like
        problems.append(f"shape: {e}")
    return problems


def _model_of(annotation):
    """The pydantic model inside Optional[...] / List[...] / Dict[str, ...], and how it nests."""
    import typing

    from pydantic import BaseModel
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _model_of(inner[0]) if len(inner) == 1 else (None, None)
    if origin in (list, typing.List):
        model, how = _model_of(args[0])
        return model, ("list", how)
    if origin in (dict, typing.Dict):
        model, how = _model_of(args[1])
        return model, ("dict", how)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, None
    return None, None


def _unknown_keys(value, model, where: str) -> list[str]:
    if not isinstance(value, dict):
        return []
    if "actual_instance" in model.model_fields:  # oneOf wrappers (Quantity, IntOrString)
        return []
    fields = {(f.alias or n): f for n, f in model.model_fields.items()}
    problems = [f"{where}{key}: not a field of {model.__name__} (known: {', '.join(sorted(fields))})"
                for key in value if key not in fields]
    for key, field in fields.items():
        if key in value:
            sub, how = _model_of(field.annotation)
            if sub is not None:
                problems += _walk(value[key], sub, how, f"{where}{key}")
    return problems


def _walk(value, model, how, where: str) -> list[str]:
    if how is None:
        return _unknown_keys(value, model, where + ".")
    kind, inner = how
    if kind == "list" and isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _walk(v, model, inner, f"{where}[{i}]")]
    if kind == "dict" and isinstance(value, dict):
        return [p for k, v in value.items() for p in _walk(v, model, inner, f"{where}.{k}")]
    return []


# -- the launcher (a pipeline step) -----------------------------------------------------------
def launch(params: dict, *, dataset, init_from, out_dir, nodes: int, gpus_per_node: int, image: str,
           namespace: str, pipeline_id: str, stage_prefix: str, checkpoint_prefix: str = "",
           run_id: str | None = None, timeout_s: float = 7 * 24 * 3600, poll_s: float = 30.0,
           api=None) -> dict:
    """Run stage 2 as a TrainJob of `nodes` x `gpus_per_node`; the model lands in `out_dir`.
    Returns the trainer's summary, as `runtime.train_task` does.

    `dataset`, `init_from`: the Dataset artifact and the stage-1 Model artifact, as `s3://`
    URIs the nodes can read, `file://` paths on a volume every node mounts, or local
    folders (the step's input paths), which are uploaded under `stage_prefix` first. `stage_prefix`: an `s3://` prefix the nodes read
    and write (the `cladapter-s3` Secret's credentials); the model comes back through
    `<stage_prefix>/<pipeline_id>/train_stage2/model`. `run_id`: the MLflow stage run that
    rank 0 logs epochs to. A TrainJob of the same name (the step retried) is waited for,
    not created again. `api`: a kubernetes CustomObjectsApi (default: in-cluster config,
    else kubeconfig)."""
    base = f"{stage_prefix.rstrip('/')}/{pipeline_id}/{STAGE}"
    spec = {"params": params, "stage": 2, "dataset_uri": _shared(dataset, f"{base}/dataset"),
            "init_from_uri": _shared(init_from, f"{base}/init_from"), "out_uri": f"{base}/model",
            "checkpoint_prefix": checkpoint_prefix, "pipeline_id": pipeline_id, "run_id": run_id}
    name = job_name(pipeline_id)
    doc = render(spec, name=name, namespace=namespace, image=image, nodes=nodes, gpus_per_node=gpus_per_node)
    with contextlib.suppress(ImportError):  # kubeflow-trainer-api: a dev dependency
        problems = validate(doc)
        if problems:
            raise CLAdapterError("the rendered TrainJob is not valid:\n" + "\n".join(f"  {p}" for p in problems))
    api = api or _custom_objects_api()
    submit(api, doc)
    wait(api, namespace, name, timeout_s, poll_s)
    fetch(spec["out_uri"], Path(out_dir))
    return json.loads((Path(out_dir) / "train_summary.json").read_text())


def _shared(where, uri: str) -> str:
    """A URI every node can read: `where` itself when it is `s3://` or `file://` (a path
    on a volume every node mounts), else the local folder uploaded to `uri`."""
    where = str(where)
    if storage.scheme(where) in ("s3", "file"):
        return where
    push(Path(where), uri)
    return uri


IMAGE_ENV = var("image")  # the image the pipeline's steps run (the TrainJob's nodes run it too)
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def stage2_task(params: dict, dataset_dir, init_from, out_dir, *, nodes: int, gpus_per_node: int,
                pipeline_id: str, stage_prefix: str, checkpoint_prefix: str = "", pipeline_name: str = "",
                data_hash: str = "", image: str = "", namespace: str = "", dataset_uri: str = "",
                poll_s: float = 30.0, api=None) -> dict:
    """The pipeline's stage-2 step when `train_nodes > 1`: `runtime.train_task` for many
    nodes. The same MLflow stage run (rank 0 logs its epochs into it), the model directory
    in `out_dir`, the trainer's summary returned. `image`: default $CLADAPTER_IMAGE;
    `namespace`: default the step's own (its ServiceAccount's); `dataset_uri`: where the
    nodes read the dataset (`s3://` or `file://`; default: `dataset_dir` uploaded)."""
    from cladapter_core import tracking
    from components import runtime
    image = image or os.environ.get(IMAGE_ENV, "")
    if not image:
        raise ParamsError(f"multi-node training needs the image for its nodes: set {IMAGE_ENV} on the step")
    if not stage_prefix.startswith("s3://"):
        raise ParamsError(f"multi-node training needs an s3:// prefix the nodes share (checkpoint_prefix), "
                          f"got {stage_prefix!r}")
    namespace = namespace or (NAMESPACE_FILE.read_text().strip() if NAMESPACE_FILE.is_file() else "default")
    with runtime.stage_tracking(params, STAGE, pipeline_id, data_hash,
                                pipeline_name, dataset_dir) as run:
        summary = launch(params, dataset=dataset_uri or dataset_dir, init_from=init_from, out_dir=out_dir, nodes=nodes,
                         gpus_per_node=gpus_per_node, image=image, namespace=namespace, pipeline_id=pipeline_id,
                         stage_prefix=stage_prefix, checkpoint_prefix=checkpoint_prefix,
                         run_id=run.info.run_id if run is not None else None, poll_s=poll_s, api=api)
        if run is not None:
            tracking.log_artifacts_dir(Path(out_dir), "model_dir")
    return summary


def _custom_objects_api(token_dir: Path = LAUNCHER_TOKEN_DIR, environ=None):
    """The Kubernetes API as the TrainJob launcher: in a pod, with the launcher's token
    (`token_dir`: the mounted Secret LAUNCHER_SECRET, its `token` and `ca.crt`), never the
    pod's own identity (the runner's, which may not create TrainJobs); outside a cluster,
    the kubeconfig."""
    from kubernetes import client, config
    from kubernetes.config.incluster_config import (SERVICE_HOST_ENV_NAME, InClusterConfigLoader)
    environ = os.environ if environ is None else environ
    token, ca = Path(token_dir) / "token", Path(token_dir) / "ca.crt"
    if SERVICE_HOST_ENV_NAME not in environ:
        config.load_kube_config()
        return client.CustomObjectsApi()
    if not token.is_file():
        raise CLAdapterError(
            f"multi-node training: no launcher token at {token} (the Secret {LAUNCHER_SECRET}, "
            f"made by infra/k8s/training, which the install overlays include): apply the install "
            f"overlay in this namespace again, or run with train_nodes=1")
    configuration = client.Configuration()
    InClusterConfigLoader(token_filename=str(token), cert_filename=str(ca),
                          environ=environ).load_and_set(configuration)
    return client.CustomObjectsApi(client.ApiClient(configuration))


def submit(api, doc: dict) -> None:
    """Create the TrainJob; one that already exists (a retried step) is kept."""
    from kubernetes.client.exceptions import ApiException
    meta = doc["metadata"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, doc)
        print(f"TrainJob {meta['namespace']}/{meta['name']} created: {doc['spec']['trainer']['numNodes']} nodes")
    except ApiException as e:
        if e.status == 403:
            raise CLAdapterError(
                f"cannot create TrainJob {meta['name']} in {meta['namespace']}: forbidden. The Role "
                f"cladapter-trainjobs (infra/k8s/training, included by the install overlays) must be "
                f"bound there to the ServiceAccount cladapter-trainjob-launcher: {e.body}") from e
        if e.status != 409:
            raise CLAdapterError(f"cannot create TrainJob {meta['name']}: {e.status} {e.reason}: {e.body}") from e
        print(f"TrainJob {meta['namespace']}/{meta['name']} exists (a retried step): waiting for it")


def job_state(obj: dict) -> tuple[str | None, str]:
    """('Complete' | 'Failed' | None, message) from a TrainJob's status conditions."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"], cond.get("message", "")
    return None, ""


def wait(api, namespace: str, name: str, timeout_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        state, message = job_state(api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
        if state == "Complete":
            return
        if state == "Failed":
            raise CLAdapterError(f"TrainJob {namespace}/{name} failed: {message} "
                                 f"(kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name})")
        if time.monotonic() > deadline:
            raise CLAdapterError(f"TrainJob {namespace}/{name} still running after {timeout_s:.0f} s")
        time.sleep(poll_s)


# -- moving folders by URI ---------------------------------------------------------------------
def fetch(uri: str, dest: Path) -> Path:
    """A folder at `uri` (`s3://bucket/prefix`, file:// or a path) copied to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    storage.copy_tree(uri, dest)
    return dest


def push(src: Path, uri: str) -> None:
    """The folder `src` copied to `uri` (`s3://bucket/prefix`, file:// or a path)."""
    storage.copy_tree(src, uri)


def _local(uri: str | None, dest: Path) -> Path | None:
    """A local folder for `uri`: downloaded when it is s3://, used in place otherwise."""
    if not uri:
        return None
    if storage.is_remote(uri):
        return fetch(uri, dest)
    return Path(storage.local_path(uri))


# -- what every node runs ----------------------------------------------------------------------
def torchrun_argv(env: dict, run_id: str) -> list[str]:
    """torchrun's flags from the Trainer's torch runtime variables: c10d rendezvous at
    PET_MASTER_ADDR:PET_MASTER_PORT, hosted by node 0 (`is_host`, so it does not depend on
    hostnames resolving to the address)."""
    nnodes, nproc = env.get("PET_NNODES", "1"), env.get("PET_NPROC_PER_NODE", "1")
    node_rank = env.get("PET_NODE_RANK", "0")
    endpoint = f"{env.get('PET_MASTER_ADDR', '127.0.0.1')}:{env.get('PET_MASTER_PORT', RDZV_PORT)}"
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={run_id}", f"--rdzv-conf=is_host={'true' if node_rank == '0' else 'false'}",
            "--max-restarts=0"]


def node(spec: dict, scratch: Path, env: dict | None = None) -> int:
    """One node of the TrainJob: fetch, torchrun, push (the node that held rank 0)."""
    from components.runtime import ResumeMirror, prepared_dir
    env = dict(os.environ if env is None else env)
    scratch.mkdir(parents=True, exist_ok=True)
    dataset = _local(spec["dataset_uri"], scratch / "dataset")
    init_from = _local(spec.get("init_from_uri"), scratch / "init_from")
    out = scratch / "model"
    ckpt = out.with_name(out.name + ".ckpt") / "last.pt"
    store = (ResumeMirror(spec["checkpoint_prefix"], spec["pipeline_id"], STAGE + "_multinode")
             if spec.get("checkpoint_prefix") else None)
    if store is not None and store.restore(ckpt):
        print(f"checkpoint restored from {store.uri}")  # every rank resumes from it
    params_file = scratch / "params.json"
    params_file.write_text(json.dumps(spec["params"]))
    cmd = torchrun_argv(env, spec.get("pipeline_id") or "cladapter") + [
        "-m", "components.torchrun_train", "--params-json", str(params_file),
        "--prepared", str(prepared_dir(dataset)), "--out", str(out), "--stage", str(spec["stage"])]
    if init_from:
        cmd += ["--init-from", str(init_from)]
    if spec.get("run_id"):
        cmd += ["--run-id", spec["run_id"]]
    with store.watch(ckpt) if store is not None else contextlib.nullcontext():
        code = subprocess.run(cmd, env=env, cwd=REPO).returncode
    if code == 0 and (out / "train_summary.json").is_file():  # this node held global rank 0
        push(out, spec["out_uri"])
        print(f"model pushed to {spec['out_uri']}")
    return code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m components.multinode", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    n = sub.add_parser("node", help="what each node of the TrainJob runs")
    n.add_argument("--spec-json", required=True, help="the spec the launcher rendered into the TrainJob")
    n.add_argument("--scratch", default=str(settings().scratch or "/scratch"))
    r = sub.add_parser("render", help="print a rendered TrainJob (YAML) and check it")
    r.add_argument("--nodes", type=int, default=4)
    r.add_argument("--gpus-per-node", type=int, default=8)
    r.add_argument("--image", default="cladapter:latest")
    r.add_argument("--namespace", default="cladapter")
    r.add_argument("--pipeline-id", default="example")
    args = ap.parse_args(argv)
    if args.command == "node":
        from components.step import check_writable
        # the data and the model go there: an unwritable folder is an error, not the container's disk
        return node(json.loads(args.spec_json), check_writable(args.scratch, create=True))
    doc = render({"params": {}, "stage": 2}, name=job_name(args.pipeline_id), namespace=args.namespace,
                 image=args.image, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    print(yaml.safe_dump(doc, sort_keys=False))
    problems = validate(doc)
    for p in problems:
        print(f"# problem: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
