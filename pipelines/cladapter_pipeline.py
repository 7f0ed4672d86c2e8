"""The CLAdapter Kubeflow pipeline: params -> prepare -> tune (optional search) ->
stage-1 training -> stage-2 training -> evaluation -> (gate) register -> promote.

- `cladapter_pipeline`: the pipeline; its parameters are what a user sets in the KFP UI
  (defaults: the embedded params, i.e. params.yaml's values).
- `compile_pipeline()`: writes `pipelines/cladapter_pipeline.yaml`, the file to upload.
- `submit(host, ...)`: compiles and starts a run through the KFP API (kfp.Client).
- `run_local(...)`: the same pipeline on this machine with `kfp.local` (each step a
  subprocess in the current Python environment; Kubernetes settings are ignored).

Cluster settings: tuning, training and evaluation request one `nvidia.com/gpu`
(tolerating the usual GPU-node taint) with CPU and memory; tuning and training retry
(preempted nodes), training resuming from its checkpoint when `checkpoint_prefix` is set; prepare is cached; MLflow and S3
credentials come from the Secrets `cladapter-mlflow` and `cladapter-s3`
(infra/k8s/README.md); register and promote run only when evaluation passes the gate
`macro_f1 >= min_macro_f1`.
"""

import inspect
import os
import tempfile
from pathlib import Path

import yaml
from kfp import compiler, dsl, kubernetes

from cladapter_core.errors import CLAdapterError
from cladapter_core.params import defaults
from components import stages

PIPELINE_NAME = "cladapter-pipeline"
PIPELINE_FILE = Path(__file__).with_name("cladapter_pipeline.yaml")
GPU = "nvidia.com/gpu"
RUNNER_SERVICE_ACCOUNT = "cladapter-pipeline-runner"
DEFAULT_EXPERIMENT = "cladapter"

# Secret -> {key: env var}; required keys must exist in the Secret, optional ones may not
# (a server without basic auth; AWS S3 itself needs no endpoint).
MLFLOW_SECRET, S3_SECRET = "cladapter-mlflow", "cladapter-s3"
SECRET_KEYS = {
    MLFLOW_SECRET: {"required": ["MLFLOW_TRACKING_URI"],
                    "optional": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]},
    S3_SECRET: {"required": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
                "optional": ["AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION"]},
}
# CPU / memory (request, limit) per step.
RESOURCES = {
    "params": (("0.5", "1"), ("512Mi", "1Gi")),
    "prepare": (("2", "4"), ("4Gi", "8Gi")),
    "train": (("4", "8"), ("16Gi", "32Gi")),
    "evaluate": (("2", "4"), ("8Gi", "16Gi")),
    "registry": (("1", "2"), ("2Gi", "4Gi")),
}
TRAIN_RETRIES = 3
TRAIN_BACKOFF = "60s"

_D = defaults()


def _resources(task, kind: str):
    (cpu_req, cpu_lim), (mem_req, mem_lim) = RESOURCES[kind]
    return (task.set_cpu_request(cpu_req).set_cpu_limit(cpu_lim)
            .set_memory_request(mem_req).set_memory_limit(mem_lim))


def _secrets(task, *names: str):
    for name in names:
        keys = SECRET_KEYS[name]
        kubernetes.use_secret_as_env(task, name, {k: k for k in keys["required"]})
        kubernetes.use_secret_as_env(task, name, {k: k for k in keys["optional"]}, optional=True)
    return task


def _gpu(task, count: int):
    task.set_accelerator_type(GPU).set_accelerator_limit(count)
    kubernetes.add_toleration(task, key=GPU, operator="Exists", effect="NoSchedule")
    # DataLoader workers and NCCL exchange tensors through /dev/shm (64 MiB by default).
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    return task


def build_pipeline(train_gpus: int = 1):
    """The pipeline function; `train_gpus` GPUs of one node per training step (> 1: DDP
    through torchrun). A node shape is a cluster decision, so it is fixed at compile time."""
    if not isinstance(train_gpus, int) or train_gpus < 1:
        raise CLAdapterError(f"train_gpus must be an integer >= 1, got {train_gpus!r}")
    m, t, reg = _D["model"], _D["train"], _D["register"]

    @dsl.pipeline(name=PIPELINE_NAME, description=(
        "CLAdapter: adapt a pretrained vision backbone to a small dataset with a Cluster "
        "Attention Adapter and Staged Fine-Tuning; evaluate, register and promote in MLflow."))
    def cladapter_pipeline(
        dataset_uri: str = "demo",
        dataset_path: str = "",
        dataset_rev: str = "",
        backbone: str = m["backbone"],
        backbone_kwargs: dict = m["backbone_kwargs"],
        pretrained: bool = m["pretrained"],
        checkpoint_uri: str = m["checkpoint"] or "",
        num_centers: int = m["num_centers"],
        stage1_epochs: int = _D["stage1"]["epochs"],
        stage1_lr: float = t["lr"],
        stage2_epochs: int = _D["stage2"]["epochs"],
        stage2_lr: float = float(f"{t['lr'] * _D['stage2']['lr_factor']:.12g}"),
        batch_size: int = t["batch_size"],
        seed: int = _D["seed"],
        model_name: str = reg["model_name"],
        promotion_margin: float = float(reg["margin"]),
        min_macro_f1: float = 0.0,
        tune_trials: int = 0,
        checkpoint_prefix: str = "",
        params_overrides: str = "",
    ):
        """The CLAdapter pipeline (defaults: the embedded params, as in params.yaml).

        Args:
            dataset_uri: `demo`, an s3://bucket/prefix, a DVC repository (git URL) or a folder.
            dataset_path: Path inside the S3 prefix or the DVC repository (DVC: required).
            dataset_rev: DVC revision (branch, tag, commit); empty: the default branch.
            backbone: timm model name.
            backbone_kwargs: Arguments of timm.create_model for the backbone.
            pretrained: Download timm's pretrained weights (needs internet).
            checkpoint_uri: Backbone weights from s3://, file:// or a path instead; empty: none.
            num_centers: K, the number of cluster centers of the adapter.
            stage1_epochs: Epochs of stage 1 (frozen backbone).
            stage1_lr: Learning rate of stage 1.
            stage2_epochs: Epochs of stage 2 (everything trained).
            stage2_lr: Learning rate of stage 2.
            batch_size: Training batch size.
            seed: Seed of the splits, the initialisation and the sample order.
            model_name: MLflow registered model.
            promotion_margin: How much better on register.metric a new model must be than the champion.
            min_macro_f1: Register and promote only when the test macro-F1 reaches this.
            tune_trials: More than 0: an Optuna search of that many trials over tune.space first.
            checkpoint_prefix: s3:// prefix where training checkpoints are kept so a retried step resumes; empty: a retry starts over.
            params_overrides: Further params.yaml fields, `section.key=value` separated by `;` or new lines.
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        cfg = stages.resolve_params(
            dataset_uri=dataset_uri, seed=seed, backbone=backbone, backbone_kwargs=backbone_kwargs,
            pretrained=pretrained, checkpoint_uri=checkpoint_uri, num_centers=num_centers,
            batch_size=batch_size, stage1_epochs=stage1_epochs, stage1_lr=stage1_lr,
            stage2_epochs=stage2_epochs, stage2_lr=stage2_lr, model_name=model_name,
            promotion_margin=promotion_margin, params_overrides=params_overrides)
        cfg.set_display_name("params")
        _resources(cfg, "params")

        data = stages.prepare(dataset_uri=dataset_uri, dataset_path=dataset_path,
                              dataset_rev=dataset_rev, data_params=cfg.outputs["data_params"])
        data.set_display_name("prepare").set_caching_options(True)
        _secrets(_resources(data, "prepare"), S3_SECRET)

        tuned = stages.tune(params=cfg.outputs["params"], dataset=data.outputs["dataset"],
                            n_trials=tune_trials, pipeline_id=run_id)
        params = tuned.outputs["Output"]  # the params every later step uses

        s1 = stages.train_stage1(params=params, dataset=data.outputs["dataset"], pipeline_id=run_id,
                                 checkpoint_prefix=checkpoint_prefix, num_gpus=train_gpus)
        s2 = stages.train_stage2(params=params, dataset=data.outputs["dataset"],
                                 stage1_model=s1.outputs["model"], pipeline_id=run_id,
                                 checkpoint_prefix=checkpoint_prefix, num_gpus=train_gpus)
        # Tuning trials run one at a time on one GPU; training may take several (DDP).
        for task, name, gpus in ((tuned, "tune", 1), (s1, "train stage 1", train_gpus),
                                 (s2, "train stage 2", train_gpus)):
            task.set_display_name(name).set_caching_options(False)
            task.set_retry(num_retries=TRAIN_RETRIES, backoff_duration=TRAIN_BACKOFF, backoff_factor=2.0)
            _secrets(_gpu(_resources(task, "train"), gpus), MLFLOW_SECRET, S3_SECRET)

        ev = stages.evaluate(params=params, dataset=data.outputs["dataset"],
                             model=s2.outputs["model"], pipeline_id=run_id)
        ev.set_display_name("evaluate").set_caching_options(False)
        _secrets(_gpu(_resources(ev, "evaluate"), 1), MLFLOW_SECRET, S3_SECRET)

        with dsl.If(ev.outputs["Output"] >= min_macro_f1, name="macro_f1 >= min_macro_f1"):
            reg_task = stages.register(params=params, dataset=data.outputs["dataset"],
                                       model=s2.outputs["model"],
                                       evaluation=ev.outputs["evaluation"], pipeline_id=run_id)
            reg_task.set_display_name("register").set_caching_options(False)
            _secrets(_resources(reg_task, "registry"), MLFLOW_SECRET, S3_SECRET)
            pro = stages.promote(params=params, version=reg_task.outputs["version"])
            pro.set_display_name("promote").set_caching_options(False)
            _secrets(_resources(pro, "registry"), MLFLOW_SECRET)

    return cladapter_pipeline


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


def compile_pipeline(out=PIPELINE_FILE, train_gpus: int = 1) -> Path:
    """Compile to `out` (default pipelines/cladapter_pipeline.yaml), written atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = cladapter_pipeline if train_gpus == 1 else build_pipeline(train_gpus)
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
           enable_caching: bool | None = None, package=None, train_gpus: int = 1) -> str:
    """Start a run on the KFP API at `host`; returns the run id. Compiles the pipeline
    to a temporary file unless `package` (a compiled YAML) is given."""
    import kfp
    with tempfile.TemporaryDirectory(prefix="cladapter-kfp-") as tmp:
        path = Path(package) if package else compile_pipeline(Path(tmp) / "pipeline.yaml", train_gpus)
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


def run_local(out_dir="outputs/kfp-local", arguments: dict | None = None) -> Path:
    """Run the pipeline here with kfp.local (SubprocessRunner in this Python environment)
    on the demo data unless `arguments` say otherwise; returns the run's output folder
    (`<out_dir>/<pipeline name>-<timestamp>/<task>/<output>`). MLflow runs go to
    $MLFLOW_TRACKING_URI (default sqlite:///mlflow.db in the working directory);
    training checkpoints are mirrored under `<out_dir>/checkpoints`.
    """
    from kfp import local
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args = {"checkpoint_prefix": str(out / "checkpoints"), **(arguments or {})}
    unknown = set(args) - set(parameters())
    if unknown:
        raise CLAdapterError(f"unknown pipeline argument(s): {', '.join(sorted(unknown))}")
    before = {p.name for p in out.iterdir()}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out),
               raise_on_error=True)
    try:
        cladapter_pipeline(**args)
    except RuntimeError as e:  # kfp.local: "Pipeline ... finished with status FAILURE"
        raise CLAdapterError(f"local pipeline run failed: {e} (the failing step's output is above)") from e
    runs = sorted((p for p in out.iterdir() if p.is_dir() and p.name not in before
                   and p.name.startswith(PIPELINE_NAME)), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise CLAdapterError(f"the local run left no output folder in {out}")
    return runs[-1]
