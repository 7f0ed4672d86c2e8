"""The CLAdapter Kubeflow pipeline: params -> prepare -> [tune_trials > 0: plan -> N
workers in parallel -> finish] -> stage-1 training -> stage-2 training -> evaluation ->
[metric >= min_metric] register -> [auto_promote] promote; an exit handler closes the
MLflow parent run (FAILED when a step died).

- `build_pipeline(train_gpus, params_file)`: the pipeline; its parameters are what a user
  sets in the KFP UI, their defaults come from the params file it is compiled from
  (`pipelines/params/production.yaml` by default; the demo is `pipelines/params/demo.yaml`),
  and its steps start from the same resolved params.
- `compile_pipeline()`: writes `pipelines/cladapter_pipeline.yaml`, the file to upload.
- `submit(host, ...)`: compiles and starts a run through the KFP API (kfp.Client).
- `run_local(...)`: the same pipeline on this machine with `kfp.local` (each step a
  subprocess in the current Python environment; Kubernetes settings are ignored).

Backend compatibility: the compiled YAML's Kubernetes settings use only fields that the
kfp-kubernetes proto `KFP_KUBERNETES_PROTO` knows, the proto the driver of the oldest
supported KFP backend (`OLDEST_KFP_BACKEND`) parses them with; its driver rejects any
field it does not know, so every step of a newer-only YAML would fail before it starts.
tests/test_kfp_backend.py parses the platform spec with that published proto.

Cluster settings: tuning workers, training and evaluation request `nvidia.com/gpu`
(tolerating the usual GPU-node taint), a memory-backed /dev/shm, and a scratch volume
onto which they fetch the files of the splits they read (the Dataset artifact holds only
the manifest and points to the files); every step has CPU/memory requests and limits and
a timeout (`TIMEOUTS`); tuning and training retry failures of their main container,
training resuming from its checkpoint mirrored under the install's checkpoint root (see
pipelines/README.md for what is and is not retried); prepare is cached; MLflow, S3 and
study-storage credentials come from the Secrets `cladapter-mlflow`, `cladapter-s3` and
`cladapter-tune`, the checkpoint root from the ConfigMap `cladapter-pipeline`
(infra/k8s/README.md); pods carry the labels the install's NetworkPolicies select.
"""

import inspect
import json
import os
import tempfile
from pathlib import Path

import yaml
from kfp import compiler, dsl, kubernetes

from cladapter_core.errors import CLAdapterError
from cladapter_core.params import load_params
from components import multinode, pipeline_params, stages

PIPELINE_NAME = "cladapter-pipeline"
PIPELINE_FILE = Path(__file__).with_name("cladapter_pipeline.yaml")
PARAMS_DIR = Path(__file__).with_name("params")
PRODUCTION_PARAMS = PARAMS_DIR / "production.yaml"   # the compiled defaults (the KFP UI's)
DEMO_PARAMS = PARAMS_DIR / "demo.yaml"               # run-local's: the digits on a tiny ViT
GPU = "nvidia.com/gpu"
RUNNER_SERVICE_ACCOUNT = "cladapter-pipeline-runner"
DEFAULT_EXPERIMENT = "cladapter"

# The oldest KFP backend the compiled pipeline runs on, and the kfp-kubernetes proto its
# driver parses each executor's Kubernetes config with (the backend builds the proto of its
# own tree: 2.14.0's is kfp-kubernetes 2.14.0). Newer backends accept what this proto
# accepts (they parse older SDKs' pipelines). Not lower: the exit handler's status input
# and retries of steps inside the exit handler first run on 2.14.0; 2.5.0 refuses every
# run ("task final status not supported yet") - backend_check.FEATURES has the sources.
OLDEST_KFP_BACKEND = "2.14.0"
KFP_KUBERNETES_PROTO = "2.14.0"

# Secret -> env vars it must hold. Every key is required: kfp-kubernetes <= 2.14 protos have
# no `optional` on secretAsEnv, so the Secrets hold every key and an empty value means
# "not set" (components.runtime.drop_empty_env unsets it in the step).
MLFLOW_SECRET, S3_SECRET = "cladapter-mlflow", "cladapter-s3"
# MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false: artifacts download through the MLflow server;
# otherwise MLflow 3 clients fetch presigned URLs signed for the server's S3 endpoint
# (mlflow/store/artifact/mlflow_artifacts_repo.py, _download_file), which pods outside the
# server's namespace may not resolve.
SECRET_KEYS = {
    MLFLOW_SECRET: ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "CLADAPTER_OUTER_RUN"],
    S3_SECRET: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION"],
}
# The promote step's MLflow identity: only a promoter may move `champion` when the server
# runs cladapter-auth (every other step is the `pipeline` user of cladapter-mlflow). The
# same keys; without authentication it may hold the same values.
MLFLOW_PROMOTER_SECRET = "cladapter-mlflow-promoter"
SECRET_KEYS[MLFLOW_PROMOTER_SECRET] = list(SECRET_KEYS[MLFLOW_SECRET])
# The tuning steps' study storage (a PostgreSQL URL with its password): a Secret, never a
# run parameter. Needed only when a run tunes (tune_trials > 0).
TUNE_SECRET = "cladapter-tune"
SECRET_KEYS[TUNE_SECRET] = ["CLADAPTER_TUNE_STORAGE"]
# Keys that must hold a value (the others may be empty).
REQUIRED_KEYS = {MLFLOW_SECRET: ["MLFLOW_TRACKING_URI"], MLFLOW_PROMOTER_SECRET: ["MLFLOW_TRACKING_URI"],
                 S3_SECRET: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
                 TUNE_SECRET: ["CLADAPTER_TUNE_STORAGE"]}
# Not secret: the install's settings for its runs (created by each install overlay in the
# runs' namespace): where training checkpoints go (run-scoped below it).
SETTINGS_CONFIG_MAP = "cladapter-pipeline"
CONFIG_MAP_KEYS = {SETTINGS_CONFIG_MAP: ["CLADAPTER_CHECKPOINT_ROOT", "CLADAPTER_WEIGHTS_MIRROR"]}
# Pod labels the install's NetworkPolicies select on (infra/k8s/base/networkpolicy.yaml).
POD_LABELS = {"app.kubernetes.io/part-of": "cladapter"}
MLFLOW_CLIENT_LABEL = "cladapter.io/mlflow-client"
DATABASE_CLIENT_LABEL = "cladapter.io/database-client"
# CPU / memory (request, limit) per step.
RESOURCES = {
    "params": (("0.5", "1"), ("512Mi", "1Gi")),
    "prepare": (("2", "4"), ("4Gi", "8Gi")),
    "train": (("4", "8"), ("16Gi", "32Gi")),
    "tune": (("4", "8"), ("16Gi", "32Gi")),
    "evaluate": (("2", "4"), ("8Gi", "16Gi")),
    "registry": (("1", "2"), ("2Gi", "4Gi")),
}
# Seconds a step's pod may run (activeDeadlineSeconds) before Kubernetes stops it.
TIMEOUTS = {"params": 600, "prepare": 4 * 3600, "tune": 24 * 3600, "train": 24 * 3600,
            "evaluate": 4 * 3600, "registry": 1800}
TRAIN_RETRIES = 3
TRAIN_BACKOFF_S, BACKOFF_FACTOR = 60, 2


def retry_max_duration(kind: str) -> int:
    """Seconds for the retry policy's backoff_max_duration (KFP's default: 3600). KFP hands
    it to Argo as `backoff.maxDuration`, and Argo retries no more once the first attempt
    started more than that long ago, and cuts a retry's deadline to it
    (workflow/controller/operator.go, processNodeRetries): so every attempt's full timeout
    plus the backoffs between them."""
    waits = sum(TRAIN_BACKOFF_S * BACKOFF_FACTOR ** i for i in range(TRAIN_RETRIES))
    return (TRAIN_RETRIES + 1) * TIMEOUTS[kind] + waits


def _retry(task, kind: str):
    return task.set_retry(num_retries=TRAIN_RETRIES, backoff_duration=f"{TRAIN_BACKOFF_S}s",
                          backoff_factor=float(BACKOFF_FACTOR),
                          backoff_max_duration=f"{retry_max_duration(kind)}s")
# At most this many tuning-worker pods (one GPU each) at once, whatever tune_workers says:
# more workers wait for a free slot (the ParallelFor's parallelism).
TUNE_PARALLELISM = 8
SCRATCH_MOUNT = "/scratch"
DEFAULT_SCRATCH = "100Gi"


def _resources(task, kind: str):
    (cpu_req, cpu_lim), (mem_req, mem_lim) = RESOURCES[kind]
    task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim)
    task.set_memory_request(mem_req).set_memory_limit(mem_lim)
    kubernetes.set_timeout(task, TIMEOUTS[kind])
    for key, value in POD_LABELS.items():
        kubernetes.add_pod_label(task, key, value)
    return task.set_env_variable("CLADAPTER_IMAGE", stages.IMAGE)


def _secrets(task, *names: str):
    for name in names:
        kubernetes.use_secret_as_env(task, name, {k: k for k in SECRET_KEYS[name]})
    if {MLFLOW_SECRET, MLFLOW_PROMOTER_SECRET} & set(names):  # the MLflow server's NetworkPolicy lets these in
        kubernetes.add_pod_label(task, MLFLOW_CLIENT_LABEL, "true")
    if TUNE_SECRET in names:  # ... and the study database's, these
        kubernetes.add_pod_label(task, DATABASE_CLIENT_LABEL, "true")
    return _no_optional(task)


def _settings(task):
    """The install's settings (ConfigMap cladapter-pipeline) as environment variables."""
    for name, keys in CONFIG_MAP_KEYS.items():
        kubernetes.use_config_map_as_env(task, name, {k: k for k in keys})
    return _no_optional(task)


def _no_optional(task):
    # kfp-kubernetes writes `optional: false` (its default) on every entry; the oldest
    # supported backend's proto has no such field and would refuse the step.
    config = task.platform_config["kubernetes"]
    for entry in config.get("secretAsEnv", []) + config.get("configMapAsEnv", []):
        if entry.get("optional") is False:
            del entry["optional"]
    return task


def _gpu(task, count: int, scratch: str):
    task.set_accelerator_type(GPU).set_accelerator_limit(count)
    kubernetes.add_toleration(task, key=GPU, operator="Exists", effect="NoSchedule")
    # DataLoader workers and NCCL exchange tensors through /dev/shm (64 MiB by default).
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    return _scratch(task, scratch)


def _scratch(task, size: str):
    """An emptyDir of at most `size` for the step's local copy of the data (deleted with
    the pod). Not a generic ephemeral volume: on block-storage CSI drivers its root is
    root-owned, the steps run as UID 10001 and KFP cannot set an fsGroup; an emptyDir is
    writable by any user (components/step.py stops a step whose scratch is not)."""
    kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path=SCRATCH_MOUNT, size_limit=size)
    return task.set_env_variable("CLADAPTER_SCRATCH", SCRATCH_MOUNT)


def load_pipeline_params(params_file=None) -> dict:
    """The resolved params a pipeline is compiled from (production defaults unless given)."""
    return load_params(str(params_file or PRODUCTION_PARAMS), use_best=False)


def build_pipeline(train_gpus: int = 1, params_file=None, scratch_size: str = DEFAULT_SCRATCH):
    """The pipeline function: parameter defaults from `params_file`; `train_gpus` GPUs of
    one node per training step (> 1: DDP through torchrun); `scratch_size` of ephemeral
    volume on the steps that copy data locally. Node shape and volume size are cluster
    decisions, fixed at compile time."""
    if not isinstance(train_gpus, int) or train_gpus < 1:
        raise CLAdapterError(f"train_gpus must be an integer >= 1, got {train_gpus!r}")
    P = load_pipeline_params(params_file)
    base_params = json.dumps(P, sort_keys=True)
    names = list(pipeline_params.signature(P).parameters)

    def cladapter_pipeline(*args):
        # KFP calls it with one channel per parameter, in the signature's order
        a = dict(zip(names, args))
        run_id, run_name = dsl.PIPELINE_JOB_ID_PLACEHOLDER, dsl.PIPELINE_JOB_NAME_PLACEHOLDER
        closer = stages.close_pipeline_run(pipeline_id=run_id, pipeline_name=run_name)
        closer.set_display_name("close MLflow run").set_caching_options(False)
        _secrets(_resources(closer, "params"), MLFLOW_SECRET)
        with dsl.ExitHandler(closer, name="pipeline"):
            _steps(a, base_params, train_gpus, scratch_size, run_id, run_name)

    # Signature, types, defaults and UI descriptions from the one table
    # (components.pipeline_params.PIPELINE_PARAMS); KFP reads them through inspect.
    cladapter_pipeline.__signature__ = pipeline_params.signature(P)
    cladapter_pipeline.__annotations__ = {n: p.annotation for n, p in
                                          cladapter_pipeline.__signature__.parameters.items()}
    cladapter_pipeline.__doc__ = pipeline_params.docstring(
        "The CLAdapter pipeline (defaults: the params file it was compiled from).")
    return dsl.pipeline(name=PIPELINE_NAME, description=(
        "CLAdapter: adapt a pretrained vision backbone to a small dataset with a Cluster "
        "Attention Adapter and Staged Fine-Tuning; evaluate, register and promote in MLflow."))(
        cladapter_pipeline)


def _steps(a: dict, base_params: str, train_gpus: int, scratch: str, run_id, run_name) -> None:
    """The steps inside the exit handler; `a`: the pipeline's parameters (channels)."""
    cfg = stages.make_resolve_params()(base_params=base_params,
                                **{name: a[name] for name, _ in pipeline_params.params_step_inputs()})
    _resources(cfg.set_display_name("params"), "params")

    where = dict(dataset_uri=a["dataset_uri"], dataset_path=a["dataset_path"], dataset_rev=a["dataset_rev"])
    version = stages.dataset_version(**where)  # never cached: it is what makes prepare's cache right
    version.set_display_name("data version").set_caching_options(False)
    _secrets(_resources(version, "params"), S3_SECRET)
    data = stages.prepare(**where, data_version=version.output, data_params=cfg.outputs["data_params"])
    data.set_display_name("prepare").set_caching_options(True)
    _secrets(_scratch(_resources(data, "prepare"), scratch), S3_SECRET)
    dataset, data_hash = data.outputs["dataset"], data.outputs["Output"]
    common = dict(pipeline_id=run_id, pipeline_name=run_name, data_hash=data_hash)

    params = _tuning(a, cfg.outputs["params"], dataset, common, scratch)
    s1 = stages.train_stage1(params=params, dataset=dataset, checkpoint_prefix=a["checkpoint_prefix"],
                             num_gpus=train_gpus, **common)
    # train_nodes > 1: stage 2 launches a multi-node TrainJob and waits (its GPU request idles
    # meanwhile: kfp.local cannot join two branches' model artifacts, so one step does both).
    s2 = stages.train_stage2(params=params, dataset=dataset, stage1_model=s1.outputs["model"],
                             checkpoint_prefix=a["checkpoint_prefix"], num_gpus=train_gpus,
                             nodes=a["train_nodes"], **common)
    for task, name in ((s1, "train stage 1"), (s2, "train stage 2")):
        task.set_display_name(name).set_caching_options(False)
        _retry(task, "train")
        _settings(_secrets(_gpu(_resources(task, "train"), train_gpus, scratch), MLFLOW_SECRET, S3_SECRET))
    # train_nodes > 1: the TrainJob is created with the launcher's token (infra/k8s/training),
    # mounted in this step only; optional, so installs without it still train on one node.
    kubernetes.use_secret_as_volume(s2, secret_name=multinode.LAUNCHER_SECRET,
                                    mount_path=str(multinode.LAUNCHER_TOKEN_DIR), optional=True)
    model = s2.outputs["model"]

    ev = stages.evaluate(params=params, dataset=dataset, model=model, **common)
    ev.set_display_name("evaluate").set_caching_options(False)
    _secrets(_gpu(_resources(ev, "evaluate"), 1, scratch), MLFLOW_SECRET, S3_SECRET)

    with dsl.If(ev.outputs["Output"] >= a["min_metric"], name="metric >= min_metric"):
        reg_task = stages.register(params=params, model=model,
                                   evaluation=ev.outputs["evaluation"], **common)
        reg_task.set_display_name("register").set_caching_options(False)
        _secrets(_resources(reg_task, "registry"), MLFLOW_SECRET, S3_SECRET)
        with dsl.If(a["auto_promote"] == True, name="auto_promote"):  # noqa: E712 (a KFP condition)
            pro = stages.promote(params=params, version=reg_task.outputs["version"], dataset=dataset)
            pro.set_display_name("promote").set_caching_options(False)
            # the promoter's identity; S3: a champion re-evaluated
            _secrets(_resources(pro, "registry"), MLFLOW_PROMOTER_SECRET, S3_SECRET)


def _tuning(a: dict, params, dataset, common: dict, scratch: str):
    """tune_trials > 0: plan, the workers in parallel, finish; else the params unchanged.
    Returns the params channel the training steps take (dsl.OneOf of the two branches)."""
    with dsl.If(a["tune_trials"] > 0, name="tuning"):
        plan = stages.tune_plan(params=params, n_trials=a["tune_trials"], n_workers=a["tune_workers"],
                                pipeline_id=common["pipeline_id"])
        plan.set_display_name("tune plan").set_caching_options(False)
        _secrets(_resources(plan, "params"), MLFLOW_SECRET, TUNE_SECRET)
        with dsl.ParallelFor(plan.output, name="tune workers", parallelism=TUNE_PARALLELISM) as index:
            worker = stages.tune_worker(params=params, dataset=dataset, worker_index=index,
                                        n_trials=a["tune_trials"], n_workers=a["tune_workers"], **common)
            worker.set_display_name("tune worker").set_caching_options(False)
            # Ignored by every KFP release so far inside a ParallelFor (kubeflow/pipelines#13897):
            # kept for backends that honour it; a worker is safe to rerun (pipelines/README.md).
            _retry(worker, "tune")
            _settings(_secrets(_gpu(_resources(worker, "tune"), 1, scratch), MLFLOW_SECRET, S3_SECRET, TUNE_SECRET))
        finish = stages.tune_finish(params=params, dataset=dataset, pipeline_id=common["pipeline_id"],
                                    pipeline_name=common["pipeline_name"]).after(worker)
        finish.set_display_name("tune finish").set_caching_options(False)
        # a GPU: the best trials train again on other seeds (tune.rerun_top) before the pick
        _settings(_secrets(_gpu(_resources(finish, "tune"), 1, scratch), MLFLOW_SECRET, S3_SECRET, TUNE_SECRET))
    with dsl.Else(name="no tuning"):
        same = stages.untuned(params=params)
        _resources(same.set_display_name("untuned").set_caching_options(False), "params")
    return dsl.OneOf(finish.outputs["Output"], same.output)


cladapter_pipeline = build_pipeline()


def parameters() -> dict[str, inspect.Parameter]:
    """The pipeline's parameters (name -> inspect.Parameter with type and default)."""
    return dict(inspect.signature(cladapter_pipeline.pipeline_func).parameters)


def parse_arguments(items) -> dict:
    """`["num_centers=10", "backbone_kwargs={img_size: 16}"]` -> typed pipeline arguments:
    numbers as Python reads them, booleans and mappings as YAML, text as it is."""
    known = parameters()
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise CLAdapterError(f"pipeline argument {item!r}: expected name=value")
        name, text = (s.strip() if i == 0 else s for i, s in enumerate(item.split("=", 1)))
        if name not in known:
            raise CLAdapterError(f"pipeline argument {name!r}: no such parameter; the "
                                 f"pipeline has: {', '.join(known)}")
        kind = known[name].annotation
        if kind is str:
            out[name] = text
            continue
        if kind in (int, float):  # Python's reading: YAML 1.1 takes 1e-3 for a string
            try:
                out[name] = kind(text.strip())
                continue
            except ValueError:
                raise CLAdapterError(f"pipeline argument {name}: expected {kind.__name__}, "
                                     f"got {text!r}") from None
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise CLAdapterError(f"pipeline argument {name}: {text!r} is not valid YAML ({e})") from e
        if not isinstance(value, kind):
            raise CLAdapterError(f"pipeline argument {name}: expected {kind.__name__}, got {text!r}")
        out[name] = value
    return out


def compile_pipeline(out=PIPELINE_FILE, train_gpus: int = 1, params_file=None,
                     scratch_size: str = DEFAULT_SCRATCH) -> Path:
    """Compile to `out` (default pipelines/cladapter_pipeline.yaml), written atomically;
    parameter defaults from `params_file` (default pipelines/params/production.yaml)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    default = train_gpus == 1 and params_file is None and scratch_size == DEFAULT_SCRATCH
    pipeline = cladapter_pipeline if default else build_pipeline(train_gpus, params_file, scratch_size)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".yaml", dir=out.parent)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline, package_path=tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def submit(host: str, arguments: dict | None = None, experiment: str = DEFAULT_EXPERIMENT,
           run_name: str | None = None, namespace: str | None = None,
           service_account: str | None = RUNNER_SERVICE_ACCOUNT,
           enable_caching: bool | None = None, package=None, train_gpus: int = 1,
           params_file=None) -> str:
    """Start a run on the KFP API at `host`; returns the run id. Compiles the pipeline
    (defaults from `params_file`) to a temporary file unless `package` (a compiled YAML)
    is given. `service_account`: `cladapter-pipeline-runner` by default, which both install
    overlays (infra/k8s/overlays/standalone for the `kubeflow` namespace, multi-user for a
    profile namespace) create with a least-privilege Role where the runs start; None or
    "" runs as the namespace's KFP default (`pipeline-runner`, `default-editor`)."""
    import kfp
    missing = [n for n, p in parameters().items()
               if p.default is inspect.Parameter.empty and n not in (arguments or {})]
    if missing and not package:
        raise CLAdapterError(f"pipeline argument(s) {', '.join(missing)} required: "
                             f"-p {missing[0]}=... (e.g. -p dataset_uri=s3://bucket/prefix)")
    with tempfile.TemporaryDirectory(prefix="cladapter-kfp-") as tmp:
        path = Path(package) if package else compile_pipeline(Path(tmp) / "pipeline.yaml", train_gpus, params_file)
        if not path.is_file():
            raise CLAdapterError(f"pipeline package {path}: no such file")
        try:
            client = kfp.Client(host=host, namespace=namespace) if namespace else kfp.Client(host=host)
            result = client.create_run_from_pipeline_package(
                str(path), arguments=arguments or {}, run_name=run_name,
                experiment_name=experiment, namespace=namespace, enable_caching=enable_caching,
                service_account=service_account or None)
        except CLAdapterError:
            raise
        except Exception as e:  # connection refused, 401/403, validation errors of the API
            raise CLAdapterError(f"submitting to the KFP API at {host} failed: "
                                 f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500] if str(e).strip() else ''}") from e
    return result.run_id


def run_local(out_dir="outputs/kfp-local", arguments: dict | None = None,
              params_file=DEMO_PARAMS) -> Path:
    """Run the pipeline here with kfp.local (SubprocessRunner in this Python environment),
    its defaults from `params_file` (the demo: the digits on a tiny ViT) and `arguments`
    over them; returns the run's output folder
    (`<out_dir>/<pipeline name>-<timestamp>/<task>/<output>`). MLflow runs go to
    $MLFLOW_TRACKING_URI (default sqlite:///mlflow.db in the working directory);
    training checkpoints are mirrored under `<out_dir>/checkpoints`.
    """
    from kfp import local
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # dataset_uri has no UI default; here the params file's data.source stands in (a folder too)
    source = str(load_pipeline_params(params_file)["data"]["source"])
    args = {"checkpoint_prefix": str(out / "checkpoints"), "dataset_uri": source, **(arguments or {})}
    pipeline = build_pipeline(1, params_file) if params_file else cladapter_pipeline
    unknown = set(args) - set(parameters())
    if unknown:
        raise CLAdapterError(f"unknown pipeline argument(s): {', '.join(sorted(unknown))}")
    before = {p.name for p in out.iterdir()}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out),
               raise_on_error=True)
    try:
        pipeline(**args)
    except RuntimeError as e:  # kfp.local: "Pipeline ... finished with status FAILURE"
        raise CLAdapterError(f"local pipeline run failed: {e} (the failing step's output is above)") from e
    runs = sorted((p for p in out.iterdir() if p.is_dir() and p.name not in before
                   and p.name.startswith(PIPELINE_NAME)), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise CLAdapterError(f"the local run left no output folder in {out}")
    return runs[-1]
