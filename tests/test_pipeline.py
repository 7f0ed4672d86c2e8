"""The Kubeflow pipeline: the compiled YAML (stages in order, GPU requests, retries, cache,
secrets, gate, image), the committed YAML equal to a fresh compile, the components'
runtime (parameters -> params, datasets from S3 / DVC / folders, the checkpoint that
survives a killed step, tuning), and `cladapter pipeline run-local` end to end on the
demo digits with its artifacts and MLflow runs.

No Kubernetes or KFP API here: the YAML is compiled and inspected, the pipeline runs
with kfp.local, and `submit` is only shown to fail clearly without a server.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from cladapter_core import identity
from cladapter_core.errors import CLAdapterError, DataError, ParamsError
from cladapter_core.params import defaults
from components import runtime, stages
from pipelines import cladapter_pipeline as kp
from helpers import BIN, REPO

DEFAULT_IMAGE = "ghcr.io/cladapter/cladapter:0.1.0"
STAGE_ORDER = ["resolve-params", "prepare", "train-stage1", "train-stage2", "evaluate",
               "register", "promote"]
TUNE_STEPS = ["tune-plan", "tune-worker", "tune-finish"]
GPU_EXECUTORS = ["exec-tune-worker", "exec-tune-finish", "exec-train-stage1", "exec-train-stage2", "exec-evaluate"]
TINY_KWARGS = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
TINY_ARGS = {
    "backbone": "vit_tiny_patch16_224", "backbone_kwargs": TINY_KWARGS, "pretrained": False, "num_centers": 4,
    "batch_size": 16, "stage1_epochs": 2, "stage2_epochs": 1,
    "params_overrides": "model.rank=8; train.warmup_epochs=1; data.shots_per_class=12; "
                        "data.val_fraction=0.1; data.test_fraction=0.1",
}
CLEAN_ENV = ("MLFLOW_TRACKING_URI", "CLADAPTER_PIPELINE_ID", "CLADAPTER_TRACKING",
             "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "CLADAPTER_IMAGE",
             "CLADAPTER_TUNE_STORAGE", "CLADAPTER_CHECKPOINT_ROOT")


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg", DVC_NO_ANALYTICS="1",
               **extra)
    return env


# ---------------------------------------------------------------------------- compiled YAML

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = kp.compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return {"path": path, "spec": spec, "platform": platform}


def all_tasks(spec) -> dict:
    """Every task of the root DAG and of nested DAGs (the gate), by name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update((comp.get("dag") or {}).get("tasks") or {})
    return tasks


def test_committed_yaml_is_a_fresh_compile(compiled):
    committed = REPO / "pipelines" / "cladapter_pipeline.yaml"
    assert committed.is_file(), "pipelines/cladapter_pipeline.yaml is missing: run `cladapter pipeline compile`"
    assert os.environ.get("CLADAPTER_IMAGE") in (None, DEFAULT_IMAGE), "compare with the default image"
    assert committed.read_text() == compiled["path"].read_text(), (
        "pipelines/cladapter_pipeline.yaml is stale (the components, the pipeline or the "
        "default params changed): run `cladapter pipeline compile` and commit it")


def producers_of(tasks, name) -> set:
    inputs = tasks[name].get("inputs") or {}
    found = set(tasks[name].get("dependentTasks") or [])
    for kind in ("artifacts", "parameters"):
        for spec in (inputs.get(kind) or {}).values():
            for key in ("taskOutputArtifact", "taskOutputParameter"):
                if key in spec:
                    found.add(spec[key]["producerTask"])
    return found


def component_of(spec, dag_tasks, name) -> dict:
    return spec["components"][dag_tasks[name]["componentRef"]["name"]]


def test_stages_are_wired_in_order(compiled):
    spec = compiled["spec"]
    tasks = all_tasks(spec)
    assert set(STAGE_ORDER + TUNE_STEPS + ["untuned", "close-pipeline-run"]) <= set(tasks), sorted(tasks)

    def artifact_from(task, name):
        return tasks[task]["inputs"]["artifacts"][name]["taskOutputArtifact"]

    def parameter_from(task, name):
        return tasks[task]["inputs"]["parameters"][name]["taskOutputParameter"]

    assert parameter_from("prepare", "data_params")["producerTask"] == "resolve-params"
    for stage in ("train-stage1", "train-stage2", "evaluate"):
        assert artifact_from(stage, "dataset")["producerTask"] == "prepare"
    for stage in ("train-stage1", "train-stage2", "evaluate"):
        assert parameter_from(stage, "data_hash") == {"outputParameterKey": "Output", "producerTask": "prepare"}
    # register reads no data: it gets the model, the evaluation and prepare's data hash
    assert set(tasks["register"]["inputs"].get("artifacts", {})) == {"model", "evaluation"}
    assert artifact_from("train-stage2", "stage1_model") == {"outputArtifactKey": "model",
                                                               "producerTask": "train-stage1"}
    assert artifact_from("evaluate", "model") == {"outputArtifactKey": "model", "producerTask": "train-stage2"}
    # the exit handler wraps every step; the closing step runs however the run ends
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "close-pipeline-run"}
    assert root["close-pipeline-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    inner = component_of(spec, root, "exit-handler-1")["dag"]["tasks"]
    # training takes the params of whichever tuning branch ran (dsl.OneOf)
    (cond_name,) = [n for n, t in inner.items() if n.startswith("condition-branches")]
    for stage in ("train-stage1", "train-stage2", "evaluate"):
        src = inner[stage]["inputs"]["parameters"]["params"]["taskOutputParameter"]
        assert src["producerTask"] == cond_name
    order, done = [], set()
    pending = {name: producers_of(inner, name) & set(inner) for name in inner}
    while pending:
        ready = sorted(n for n, deps in pending.items() if deps <= done)
        assert ready, f"cycle among {pending}"
        order += ready
        done |= set(ready)
        for n in ready:
            del pending[n]
    assert [n for n in order if n in STAGE_ORDER] == STAGE_ORDER[:5]
    assert order.index("prepare") < order.index(cond_name) < order.index("train-stage1")
    assert inner[order[-1]].get("triggerPolicy", {}).get("condition")  # the gate comes last


def test_tuning_runs_parallel_workers_only_when_asked(compiled):
    spec = compiled["spec"]
    tasks = all_tasks(spec)
    conds = {n: t["triggerPolicy"]["condition"] for n, t in tasks.items()
             if t.get("triggerPolicy", {}).get("condition")}
    tuning = [c for c in conds.values() if "pipelinechannel--tune_trials" in c and "> 0" in c]
    assert tuning, conds
    loops = [t for t in tasks.values() if "parameterIterator" in t]
    assert len(loops) == 1
    assert loops[0]["parameterIterator"]["items"]["inputParameter"].endswith("tune-plan-Output")
    # at most TUNE_PARALLELISM GPU pods at once, whatever tune_workers asks for
    assert loops[0]["iteratorPolicy"] == {"parallelismLimit": kp.TUNE_PARALLELISM}
    assert [d for d in tasks["tune-finish"]["dependentTasks"] if d.startswith("for-loop")]
    assert tasks["tune-worker"]["inputs"]["parameters"]["worker_index"]["componentInputParameter"]


def test_gate_registers_and_promotes_only_when_evaluation_passes(compiled):
    spec = compiled["spec"]
    tasks = all_tasks(spec)
    conds = {n: t["triggerPolicy"]["condition"] for n, t in tasks.items()
             if t.get("triggerPolicy", {}).get("condition")}
    (gate,) = [n for n, c in conds.items() if "pipelinechannel--min_metric" in c]
    assert "pipelinechannel--evaluate-Output" in conds[gate] and ">=" in conds[gate]
    inner = component_of(spec, tasks, gate)["dag"]["tasks"]
    assert "register" in inner
    (auto,) = [n for n in inner if inner[n].get("triggerPolicy", {}).get("condition")]
    assert "pipelinechannel--auto_promote" in inner[auto]["triggerPolicy"]["condition"]
    assert set(component_of(spec, inner, auto)["dag"]["tasks"]) == {"promote"}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["min_metric"]["defaultValue"] == 0.0 and "min_macro_f1" not in params
    assert params["auto_promote"]["defaultValue"] is True


def test_the_gate_reads_register_metric_on_validation_never_test(tmp_path):
    # evaluate's output is register.metric on the validation split (decision_metrics.json),
    # not always macro-F1, and never the test split's value (metrics.json)
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 0.99, "macro_f1": 0.99}))
    (tmp_path / "decision_metrics.json").write_text(json.dumps(
        {"split": "val", "data_hash": "d", "metrics": {"accuracy": 0.7, "macro_f1": 0.2}}))
    assert runtime.gate_value({"register": {"metric": "accuracy"}}, tmp_path) == 0.7
    assert runtime.gate_value({"register": {"metric": "macro_f1"}}, tmp_path) == 0.2


def test_gpu_cpu_memory_requests(compiled):
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    for name, ex in executors.items():
        res = ex["container"].get("resources") or {}
        assert res.get("resourceCpuLimit") and res.get("resourceMemoryLimit"), f"{name}: no CPU/memory limit"
        assert res.get("resourceCpuRequest") and res.get("resourceMemoryRequest"), f"{name}: no request"
        if name in GPU_EXECUTORS:
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            assert res["accelerator"]["resourceCount"] == "1", name
            assert compiled["platform"][name]["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert compiled["platform"][name]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        else:
            assert "accelerator" not in res, f"{name} should not hold a GPU"


def test_training_retries_prepare_is_cached(compiled):
    tasks = all_tasks(compiled["spec"])
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    for name in ("train-stage1", "train-stage2", "tune-worker"):
        policy = tasks[name]["retryPolicy"]
        assert policy["maxRetryCount"] >= 2 and policy["backoffDuration"], name
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
        # Argo stops retrying once the first attempt started backoffMaxDuration ago (KFP's
        # default: 3600s): it must cover every attempt's full timeout and the backoffs
        timeout = int(compiled["platform"][f"exec-{name}"]["activeDeadlineSeconds"])
        attempts = policy["maxRetryCount"] + 1
        waits = sum(int(policy["backoffDuration"].rstrip("s")) * policy["backoffFactor"] ** i
                    for i in range(policy["maxRetryCount"]))
        assert int(policy["backoffMaxDuration"].rstrip("s")) >= attempts * timeout + waits, (name, policy)
        assert f"exec-{name}" in executors
    assert tasks["prepare"]["cachingOptions"] == {"enableCache": True}
    # prepare's cache key holds the data's version, found by an uncached step each run
    assert tasks["prepare"]["inputs"]["parameters"]["data_version"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "dataset-version"}
    assert not tasks["dataset-version"]["cachingOptions"].get("enableCache")
    for name in ("dataset_uri", "dataset_path", "dataset_rev"):
        assert tasks["dataset-version"]["inputs"]["parameters"][name]["componentInputParameter"] == \
            f"pipelinechannel--{name}"
    # steps that log to MLflow or change the registry are never skipped by the cache
    for name in ("evaluate", "register", "promote", "tune-plan", "tune-finish", "close-pipeline-run"):
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
        assert "retryPolicy" not in tasks[name]
    # every step has a timeout (the pod's activeDeadlineSeconds)
    for name in compiled["spec"]["deploymentSpec"]["executors"]:
        assert int(compiled["platform"][name]["activeDeadlineSeconds"]) > 0, name


def test_secrets_come_from_kubernetes(compiled):
    platform = compiled["platform"]

    def secret_keys(executor):
        out = {}
        for s in platform.get(executor, {}).get("secretAsEnv", []):
            assert "optional" not in s, f"{executor}: `optional` is unknown to the oldest supported backend"
            out.setdefault(s["secretName"], set()).update(k["secretKey"] for k in s["keyToEnv"])
        return out

    mlflow_keys, s3_keys = set(kp.SECRET_KEYS["cladapter-mlflow"]), set(kp.SECRET_KEYS["cladapter-s3"])
    tune_keys = set(kp.SECRET_KEYS["cladapter-tune"])
    mlflow, s3, tune = {"cladapter-mlflow": mlflow_keys}, {"cladapter-s3": s3_keys}, {"cladapter-tune": tune_keys}
    for ex in ("exec-train-stage1", "exec-train-stage2", "exec-evaluate", "exec-register"):
        assert secret_keys(ex) == {**mlflow, **s3}, ex
    # promote: the promoter's MLflow identity, the only one that may move champion; S3 for
    # the validation files when it re-evaluates a champion
    assert secret_keys("exec-promote") == {"cladapter-mlflow-promoter": mlflow_keys, **s3}
    for ex in ("exec-tune-worker", "exec-tune-finish"):  # the study storage from its Secret
        assert secret_keys(ex) == {**mlflow, **s3, **tune}, ex
    assert secret_keys("exec-tune-plan") == {**mlflow, **tune}
    assert secret_keys("exec-prepare") == s3
    assert secret_keys("exec-dataset-version") == s3  # lists the S3 prefix
    assert secret_keys("exec-close-pipeline-run") == mlflow
    assert not platform["exec-resolve-params"].get("secretAsEnv")  # no credentials where none are needed
    # the checkpoint root and the weights mirror: the install's ConfigMap, on the steps that train
    for ex, config in platform.items():
        maps = {c["configMapName"]: {k["configMapKey"] for k in c["keyToEnv"]}
                for c in config.get("configMapAsEnv", [])}
        assert all("optional" not in c for c in config.get("configMapAsEnv", [])), ex
        assert maps == ({"cladapter-pipeline": {"CLADAPTER_CHECKPOINT_ROOT", "CLADAPTER_WEIGHTS_MIRROR"}}
                        if ex in ("exec-train-stage1", "exec-train-stage2", "exec-tune-worker",
                                  "exec-tune-finish") else {}), ex
        # the labels the install's NetworkPolicies select on
        labels = config["podMetadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "cladapter", ex
        mlflow_client = {"cladapter-mlflow", "cladapter-mlflow-promoter"} & set(secret_keys(ex))
        assert (labels.get(kp.MLFLOW_CLIENT_LABEL) == "true") == bool(mlflow_client), ex
        assert (labels.get(kp.DATABASE_CLIENT_LABEL) == "true") == ("cladapter-tune" in secret_keys(ex)), ex
    # Every key is in both install modes' Secret templates (a missing key would stop the
    # pod), the required ones documented.
    readme = (REPO / "infra" / "k8s" / "README.md").read_text()
    for overlay in ("standalone", "multi-user"):
        folder = REPO / "infra" / "k8s" / "overlays" / overlay / "secrets"
        for secret, template, keys in (("cladapter-mlflow", "mlflow.env.example", mlflow_keys),
                                       ("cladapter-mlflow-promoter", "mlflow-promoter.env.example", mlflow_keys),
                                       ("cladapter-s3", "s3.env.example", s3_keys),
                                       ("cladapter-tune", "tune.env.example", tune_keys)):
            lines = (folder / template).read_text().splitlines()
            defined = {ln.split("=", 1)[0] for ln in lines if "=" in ln and not ln.startswith("#")}
            assert keys <= defined, f"{overlay}/{template} lacks {keys - defined}"
            assert f"`{secret}`" in readme and all(f"`{k}`" in readme for k in kp.REQUIRED_KEYS[secret])


# The server's own name for S3 (the dev install's MinIO Service): it resolves inside the
# server's namespace, not in the run's. The server process here resolves it to loopback
# (a sitecustomize on its PYTHONPATH); this test process cannot resolve it at all.
IN_CLUSTER_S3 = "cladapter-minio"
_RESOLVER = f"""
import socket
_real = socket.getaddrinfo
def _getaddrinfo(host, *args, **kwargs):
    return _real("127.0.0.1" if host == {IN_CLUSTER_S3!r} else host, *args, **kwargs)
socket.getaddrinfo = _getaddrinfo
"""
_DOWNLOAD = ("import sys, mlflow; print(open(mlflow.artifacts.download_artifacts("
             "run_id=sys.argv[1], artifact_path='note.txt', dst_path=sys.argv[2])).read())")


def test_artifact_downloads_work_where_the_servers_s3_name_does_not_resolve(s3_server, tmp_path):
    """MLflow 3 clients download artifacts of an S3-backed server through presigned URLs
    signed for the server's MLFLOW_S3_ENDPOINT_URL, a host a pipeline pod may not resolve;
    MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false (in every Secret template and SECRET_KEYS)
    makes the client download through the server instead."""
    import boto3
    from fixtures_services import _stop, _wait_http
    from helpers import free_port
    import socket
    port = int(s3_server.rsplit(":", 1)[1])
    with pytest.raises(OSError):  # the premise: this machine cannot resolve the server's S3 name
        socket.getaddrinfo(IN_CLUSTER_S3, port)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="presigned")
    (tmp_path / "resolver").mkdir()
    (tmp_path / "resolver" / "sitecustomize.py").write_text(_RESOLVER)
    env = {k: v for k, v in child_env().items() if not k.startswith(("AWS_", "MLFLOW_"))}
    server_env = dict(env, PYTHONPATH=str(tmp_path / "resolver"), AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      MLFLOW_S3_ENDPOINT_URL=f"http://{IN_CLUSTER_S3}:{port}",
                      MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE="path")  # as with MinIO
    mport = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport),
                                 "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
                                 "--artifacts-destination", "s3://presigned/mlflow", "--serve-artifacts"],
                                stdout=fh, stderr=subprocess.STDOUT, env=server_env, cwd=tmp_path,
                                start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{mport}"
        _wait_http(uri + "/health", proc, log)
        client_env = dict(env, MLFLOW_TRACKING_URI=uri)
        log_one = ("import mlflow\nwith mlflow.start_run() as r:\n    mlflow.log_text('hello', 'note.txt')\n"
                   "print(r.info.run_id)")
        made = subprocess.run([sys.executable, "-c", log_one], env=client_env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert made.returncode == 0, made.stderr[-2000:]  # the upload goes through the server
        run_id = made.stdout.strip().splitlines()[-1]
        before = subprocess.run([sys.executable, "-c", _DOWNLOAD, run_id, str(tmp_path / "a")],
                                env=dict(client_env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"),
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
        # the presigned URL names the server's S3 host, which this client cannot resolve
        assert before.returncode != 0 and "Failed to download artifacts" in before.stderr, before.stderr[-2000:]
        (secret,) = [k for k in kp.SECRET_KEYS[kp.MLFLOW_SECRET] if k == "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"]
        after = subprocess.run([sys.executable, "-c", _DOWNLOAD, run_id, str(tmp_path / "b")],
                               env=dict(client_env, **{secret: "false"}), capture_output=True, text=True,
                               timeout=300, cwd=tmp_path)
        assert after.returncode == 0 and after.stdout.strip() == "hello", after.stderr[-2000:]
    finally:
        _stop(proc)
    # every Secret template sets it, so every step's pod gets it
    for overlay in ("standalone", "multi-user"):
        text = (REPO / "infra" / "k8s" / "overlays" / overlay / "secrets" / "mlflow.env.example").read_text()
        assert "\nMLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false\n" in f"\n{text}", overlay


def test_git_commit_outside_a_checkout_is_the_images(tmp_path):
    """The image has no .git: every run's git commit is the one it was built from
    ($CLADAPTER_GIT_COMMIT, the Dockerfile's GIT_COMMIT), not "unknown"."""
    code = "from cladapter_core import identity; print(identity.git_commit())"
    sha = "0123456789abcdef0123456789abcdef01234567"
    for value, expected in ((sha, f"('{sha}', False)"), ("unknown", "(None, False)"), ("", "(None, False)")):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              env=child_env(CLADAPTER_GIT_COMMIT=value, GIT_CEILING_DIRECTORIES=str(tmp_path.parent)))
        assert proc.stdout.strip() == expected, proc.stderr
    inside = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env=child_env(CLADAPTER_GIT_COMMIT=sha))
    assert sha not in inside.stdout  # a checkout's own commit wins


def test_empty_optional_secret_values_are_unset(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")
    monkeypatch.setenv("AWS_DEFAULT_REGION", " ")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://minio:9000")
    assert set(runtime.drop_empty_env()) == {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}
    assert "AWS_ENDPOINT_URL" not in os.environ and os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_every_step_runs_in_the_project_image_without_installing(compiled):
    light = {f"exec-{s.replace('_', '-')}" for s in stages.LIGHT_STEPS}
    for name, ex in compiled["spec"]["deploymentSpec"]["executors"].items():
        c = ex["container"]
        assert c["image"] == (DEFAULT_IMAGE.replace("/cladapter:", "/cladapter-light:") if name in light
                              else DEFAULT_IMAGE), name
        text = " ".join(c["command"] + c["args"])
        assert "pip install" not in text, f"{name} installs packages at run time"
        assert "from components import" in text and "runtime" in text, \
            f"{name} is not a shell over components.runtime"


def test_pipeline_parameters_default_to_the_production_params(compiled):
    """The KFP UI's defaults: a pretrained backbone at its native input size, no dataset."""
    from cladapter_core.params import load_params
    d = load_params(str(kp.PRODUCTION_PARAMS), use_best=False)
    params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    expected = {"backbone": d["model"]["backbone"], "pretrained": True,
                "num_centers": d["model"]["num_centers"], "stage1_epochs": d["stage1"]["epochs"],
                "stage1_lr": d["train"]["lr"], "stage2_epochs": d["stage2"]["epochs"],
                "batch_size": d["train"]["batch_size"], "model_name": d["register"]["model_name"],
                "promotion_margin": d["register"]["margin"], "tune_trials": 0}
    for name, value in expected.items():
        assert params[name]["defaultValue"] == value, name
    assert d["model"]["backbone"] != "test_vit" and d["model"]["pretrained"]
    assert params["backbone_kwargs"].get("defaultValue", {}) == {}  # the backbone's own input size
    assert "defaultValue" not in params["dataset_uri"] and not params["dataset_uri"].get("isOptional")
    assert params["stage2_lr"]["defaultValue"] == pytest.approx(d["train"]["lr"] * d["stage2"]["lr_factor"])
    for name in ("dataset_path", "dataset_rev", "weights_uri", "checkpoint_prefix",
                 "params_overrides", "min_metric", "seed", "auto_promote", "tune_workers"):
        assert name in params


def test_a_params_file_change_reaches_the_compiled_yaml_and_the_steps(tmp_path):
    """`cladapter pipeline compile --params FILE`: the defaults shown in the UI and the
    params every step starts from (fields without a pipeline parameter too)."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({
        "model": {"backbone": "vit_small_patch16_224", "backbone_kwargs": {}, "num_centers": 7},
        "train": {"lr": 3e-4, "augment": {"vflip": True}}, "stage1": {"epochs": 4},
        "data": {"source": "s3://team/cells", "shots_per_class": 9}}))
    out = tmp_path / "p.yaml"
    proc = subprocess.run([str(BIN / "cladapter"), "pipeline", "compile", "--params", str(params_file),
                           "--out", str(out)], capture_output=True, text=True, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["backbone"]["defaultValue"] == "vit_small_patch16_224"
    assert params["num_centers"]["defaultValue"] == 7 and params["stage1_epochs"]["defaultValue"] == 4
    assert params["stage1_lr"]["defaultValue"] == pytest.approx(3e-4)
    assert "defaultValue" not in params["dataset_uri"]  # required whatever the file says
    base = json.loads(all_tasks(spec)["resolve-params"]["inputs"]["parameters"]["base_params"]
                      ["runtimeValue"]["constant"])
    assert base["train"]["augment"]["vflip"] is True and base["data"]["shots_per_class"] == 9
    # the step resolves the run's values over that file: what the UI did not change stays
    p = runtime.resolve_params({"num_centers": 5}, "", base=base)
    assert p["model"]["num_centers"] == 5 and p["model"]["backbone"] == "vit_small_patch16_224"
    assert p["train"]["augment"]["vflip"] is True and p["data"]["shots_per_class"] == 9


def test_image_from_environment_and_gpus_per_training_step(tmp_path):
    out = tmp_path / "p.yaml"
    code = ("from pipelines.cladapter_pipeline import compile_pipeline; "
            f"compile_pipeline({str(out)!r}, train_gpus=2)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=child_env(CLADAPTER_IMAGE="registry.example.org/team/cladapter:7"))
    assert proc.returncode == 0, proc.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert {ex["container"]["image"] for ex in executors.values()} == {
        "registry.example.org/team/cladapter:7", "registry.example.org/team/cladapter-light:7"}
    assert executors["exec-train-stage1"]["container"]["image"] == "registry.example.org/team/cladapter:7"
    for name in ("exec-train-stage1", "exec-train-stage2"):
        assert executors[name]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    assert executors["exec-evaluate"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    tasks = all_tasks(spec)
    assert tasks["train-stage1"]["inputs"]["parameters"]["num_gpus"]["runtimeValue"]["constant"] == 2
    with pytest.raises(CLAdapterError, match="train_gpus"):
        kp.build_pipeline(0)


# ---------------------------------------------------------------------------- parameters

KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN", dict: "STRUCT"}


def declared_inputs(spec, P) -> None:
    """The compiled pipeline's inputs and the params step's are exactly the table's
    (components.pipeline_params.PIPELINE_PARAMS): names, types, defaults, descriptions."""
    from components import pipeline_params as pp
    compiled = spec["root"]["inputDefinitions"]["parameters"]
    assert list(compiled) == sorted(p.name for p in pp.PIPELINE_PARAMS)
    for p in pp.PIPELINE_PARAMS:
        got = compiled[p.name]
        assert got["parameterType"] == KFP_TYPES[pp.kind_of(p)], p.name
        if p.default is pp.REQUIRED:
            assert "defaultValue" not in got and not got.get("isOptional"), p.name
        else:
            assert got["defaultValue"] == pp.default_of(p, P) and got["isOptional"], p.name
        assert got["description"] == " ".join(pp.help_of(p).split()), p.name
        assert len(got["description"]) > 40, p.name
    step = spec["components"]["comp-resolve-params"]["inputDefinitions"]["parameters"]
    assert {n: v["parameterType"] for n, v in step.items()} == {
        "base_params": "STRING", **{n: KFP_TYPES[t] for n, t in pp.params_step_inputs()}}


def test_pipeline_parameters_are_declared_once(compiled):
    """One table: each parameter that sets a params field takes its type, bounds and help
    from param_models and its default from the compiled params file; the help says the
    unit and effect."""
    from cladapter_core.param_models import Model
    from components import pipeline_params as pp
    P = kp.load_pipeline_params()
    declared_inputs(compiled["spec"], P)
    (num_centers,) = [p for p in pp.PIPELINE_PARAMS if p.name == "num_centers"]
    text = pp.help_of(num_centers)
    assert text.startswith(Model.model_fields["num_centers"].description) and ">= 1" in text
    assert pp.kind_of(num_centers) is int and pp.default_of(num_centers, P) == P["model"]["num_centers"]
    assert pp.PARAM_FIELDS["stage1_lr"] == "train.lr" and pp.PARAM_FIELDS["dataset_uri"] == "data.source"


def test_adding_a_parameter_to_the_table_is_all_it_takes(monkeypatch, tmp_path):
    """A new entry reaches the compiled UI (name, type, default, description), the params
    step's inputs, the step's code that KFP serialises, and the params it resolves."""
    from components import pipeline_params as pp
    from components import stages
    rank = pp.UIParam("rank", "model.rank", "A count: larger, more adapter parameters.")
    monkeypatch.setattr(pp, "PIPELINE_PARAMS", pp.PIPELINE_PARAMS + (rank,))
    out = kp.compile_pipeline(tmp_path / "p.yaml", params_file=kp.DEMO_PARAMS)
    spec = next(yaml.safe_load_all(out.read_text()))
    P = kp.load_pipeline_params(kp.DEMO_PARAMS)
    declared_inputs(spec, P)
    assert spec["root"]["inputDefinitions"]["parameters"]["rank"]["defaultValue"] == P["model"]["rank"]
    assert all_tasks(spec)["resolve-params"]["inputs"]["parameters"]["rank"] == {
        "componentInputParameter": "pipelinechannel--rank"}
    container = spec["deploymentSpec"]["executors"]["exec-resolve-params"]["container"]
    code = " ".join(container["command"] + container["args"])
    assert "rank: int" in code and "rank=rank" in code
    # the step's function, as the pod runs it: the value lands in model.rank
    step = stages.make_resolve_params().python_func
    args = {n: kp.parameters()[n].default for n, _ in pp.params_step_inputs() if n != "rank"}
    params, _ = step(base_params=json.dumps(P), **{**args, "dataset_uri": "demo", "rank": 12})
    assert json.loads(params)["model"]["rank"] == 12
    with pytest.raises(ParamsError, match="model.rank is set by the pipeline parameter 'rank'"):
        runtime.resolve_params({"rank": 8}, "model.rank=3")


def test_dataset_uri_is_required(tmp_path):
    with pytest.raises(CLAdapterError, match="dataset_uri required"):
        kp.submit("http://127.0.0.1:9", {"num_centers": 10})



def test_pipeline_arguments_are_typed_and_checked():  # noqa: D103
    args = kp.parse_arguments(["num_centers=10", "stage1_lr=1e-3", "dataset_rev=1234",
                               "backbone_kwargs={img_size: 16}", "pretrained=true", "promotion_margin=1"])
    assert args == {"num_centers": 10, "stage1_lr": 0.001, "dataset_rev": "1234",
                    "backbone_kwargs": {"img_size": 16}, "pretrained": True, "promotion_margin": 1.0}
    with pytest.raises(CLAdapterError, match="no such parameter.*num_centers"):
        kp.parse_arguments(["K=10"])
    with pytest.raises(CLAdapterError, match="num_centers: expected int"):
        kp.parse_arguments(["num_centers=ten"])
    with pytest.raises(CLAdapterError, match="expected name=value"):
        kp.parse_arguments(["num_centers"])


def test_pipeline_parameters_become_params():
    p = runtime.resolve_params(
        {"dataset_uri": "s3://data/pets", "backbone": "vit_tiny_patch16_224",
         "backbone_kwargs": {"img_size": 16.0, "patch_size": 8.0, "drop_rate": 0.5},  # a KFP Struct
         "num_centers": 7, "stage1_lr": 1e-3, "stage2_lr": 1e-4, "weights_uri": "",
         "model_name": "pets", "promotion_margin": 0.01},
        "data.shots_per_class=5; train.augment.hflip=true\nmodel.rank=16")
    assert p["model"]["num_centers"] == 7 and p["model"]["weights"] is None
    assert p["model"]["backbone_kwargs"] == {"img_size": 16, "patch_size": 8, "drop_rate": 0.5}
    assert isinstance(p["model"]["backbone_kwargs"]["img_size"], int)
    assert p["stage2"]["lr_factor"] == 0.1 and p["train"]["lr"] == 1e-3
    assert p["data"]["source"] == "s3://data/pets" and p["data"]["shots_per_class"] == 5
    assert p["train"]["augment"]["hflip"] is True and p["model"]["rank"] == 16
    assert p["register"] == {**p["register"], "model_name": "pets", "margin": 0.01}
    assert runtime.data_part(p) == {"seed": p["seed"], "data": p["data"]}
    # steps pass params as JSON: the same dict comes back, validated again
    assert runtime.params_from_json(json.dumps(p)) == p
    with pytest.raises(ParamsError, match="model.num_centers is set by the pipeline parameter 'num_centers'"):
        runtime.resolve_params({"num_centers": 7}, "model.num_centers=3")
    with pytest.raises(ParamsError) as err:
        runtime.resolve_params({"num_centers": 0, "batch_size": -1}, "train.lr_typo=1")
    assert "model.num_centers" in str(err.value) or "train.lr_typo" in str(err.value)
    with pytest.raises(ParamsError, match="stage1_lr and stage2_lr"):
        runtime.resolve_params({"stage1_lr": 0.0, "stage2_lr": 1e-4})


def test_submit_without_a_server_fails_clearly():
    with pytest.raises(CLAdapterError, match=r"KFP API at http://127.0.0.1:9 failed.*Connection refused"):
        kp.submit("http://127.0.0.1:9", {"num_centers": 10, "dataset_uri": "s3://data/pets"})


# ---------------------------------------------------------------------------- datasets

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from cladapter_core.data import make_demo_data
    return make_demo_data(tmp_path_factory.mktemp("digits") / "digits")


def files_under(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_from_s3_prefix(digits, bucket, tmp_path):
    import boto3
    s3 = boto3.client("s3")
    subset = {p.relative_to(digits).as_posix(): p for c in ("0", "1") for p in sorted((digits / c).iterdir())[:5]}
    for rel, p in subset.items():
        s3.upload_file(str(p), bucket, f"sets/digits/images/{rel}")
    s3.put_object(Bucket=bucket, Key="sets/digits/README.txt", Body=b"two classes")
    s3.put_object(Bucket=bucket, Key="sets/digits-other/0/x.png", Body=b"not under the prefix")
    source = runtime.fetch_source(f"s3://{bucket}/sets/digits/", "images", "", tmp_path / "a")
    assert source == tmp_path / "a" / "images"
    got = files_under(source)
    assert got == {rel: p.read_bytes() for rel, p in subset.items()}
    assert (tmp_path / "a" / "README.txt").read_text() == "two classes"
    with pytest.raises(DataError, match=rf"no objects under s3://{bucket}/nothing"):
        runtime.fetch_source(f"s3://{bucket}/nothing", "", "", tmp_path / "b")
    with pytest.raises(DataError, match="dataset_path 'labels.csv': not found"):
        runtime.fetch_source(f"s3://{bucket}/sets/digits", "labels.csv", "", tmp_path / "c")


def test_a_changed_dataset_gets_a_new_version_and_no_stale_prepare(digits, bucket, tmp_path):
    """prepare is cached on its inputs; the data version among them changes with any object
    under the prefix (its ETag), so a changed dataset cannot reuse an old cache entry, and
    data that changed after the version step is refused rather than prepared."""
    import boto3
    s3 = boto3.client("s3")
    for c in ("0", "1"):
        for f in sorted((digits / c).iterdir())[:6]:
            s3.upload_file(str(f), bucket, f"v/{c}/{f.name}")
    uri = f"s3://{bucket}/v"
    first = runtime.data_version(uri, "", "")
    assert first.startswith("s3:sha256:") and runtime.data_version(uri, "", "") == first
    params = runtime.resolve_params({"dataset_uri": uri}, "data.val_fraction=0.2; data.test_fraction=0.2")
    runtime.prepare_task(uri, "", "", runtime.data_part(params), tmp_path / "a", data_version=first)
    s3.put_object(Bucket=bucket, Key="v/1/extra.txt", Body=b"a new file")
    second = runtime.data_version(uri, "", "")
    assert second != first
    with pytest.raises(DataError, match=r"changed while the run started"):
        runtime.prepare_task(uri, "", "", runtime.data_part(params), tmp_path / "b", data_version=first)
    assert runtime.data_version("demo", "", "") == "demo"
    folder = runtime.data_version(str(digits), "", "")
    assert folder.startswith("folder:sha256:") and folder == runtime.data_version(str(digits), "", "")


def test_dataset_from_a_dvc_repository(digits, tmp_path):
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    data = repo / "data" / "digits"
    for c in ("3", "7"):
        (data / c).mkdir(parents=True)
        for p in sorted((digits / c).iterdir())[:4]:
            (data / c / p.name).write_bytes(p.read_bytes())
    env = child_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
                    GIT_COMMITTER_EMAIL="t@example.org")

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout}{proc.stderr}"

    dvc = [sys.executable, "-m", "dvc"]
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "remote", "add", "-d", "local", str(remote))
    run(*dvc, "add", "-q", "data/digits")
    run(*dvc, "push", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "data v1")
    run("git", "tag", "v1")
    (data / "3" / sorted((data / "3").iterdir())[0].name).unlink()  # v2 drops a file
    run(*dvc, "add", "-q", "data/digits")
    run(*dvc, "push", "-q")
    run("git", "commit", "-q", "-am", "data v2")
    v1 = runtime.fetch_source(str(repo), "data/digits", "v1", tmp_path / "v1")
    head = runtime.fetch_source(str(repo), "data/digits", "", tmp_path / "head")
    assert len(files_under(v1)) == 8 and len(files_under(head)) == 7
    assert files_under(v1)["7/" + sorted((data / "7").iterdir())[0].name] == \
        sorted((data / "7").iterdir())[0].read_bytes()
    with pytest.raises(DataError, match="set dataset_path"):
        runtime.fetch_source(str(repo), "", "v1", tmp_path / "x")
    with pytest.raises(DataError, match="dvc get .* failed"):
        runtime.fetch_source(str(repo), "data/missing", "v1", tmp_path / "y")
    # by reference: the artifact names the commit v1 resolved to; a step fetches only its
    # split's files from the DVC remote at that commit, though the branch has moved on
    from cladapter_core.data import read_manifest
    params = runtime.resolve_params({}, "data.val_fraction=0.25; data.test_fraction=0.25")
    art = tmp_path / "art"
    runtime.prepare_task(str(repo), "data/digits", "v1", params, art)
    ref = runtime.read_source_ref(art)
    assert ref["kind"] == "dvc" and ref["rev"] == runtime.resolve_rev(str(repo), "v1") and ref["files"] == 8
    assert not (art / "source").exists()
    with runtime.local_data(art, ["val"]) as prepared:
        got = {split: read_manifest(prepared, split) for split in ("train", "val")}
        assert got["val"] and all(p.is_file() for p, _ in got["val"])
        assert not any(p.exists() for p, _ in got["train"])
        for p, _ in got["val"]:
            assert p.read_bytes() == (v1 / p.parent.name / p.name).read_bytes()


def test_the_dataset_artifact_points_to_its_files(digits, bucket, tmp_path):
    """Data by reference: prepare's artifact holds the manifest, classes, summary and the
    list of files, not the images; a step in another pod fetches only the files of the
    splits it reads, from S3 with the ETag prepare saw; the data hash needs no file and
    is the one a local prepare of the same files gives (the DVC path's)."""
    import shutil

    import boto3

    from cladapter_core import identity
    from cladapter_core.data import prepare, read_manifest
    s3 = boto3.client("s3")
    local = tmp_path / "local" / "images"
    for c in ("0", "1", "2"):
        for f in sorted((digits / c).iterdir())[:20]:
            s3.upload_file(str(f), bucket, f"sets/d/images/{c}/{f.name}")
            (local / c).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, local / c / f.name)
    params = runtime.resolve_params({}, "data.val_fraction=0.2; data.test_fraction=0.2")
    art = tmp_path / "pod-a" / "dataset"
    summary = runtime.prepare_task(f"s3://{bucket}/sets/d", "images", "", params, art)
    assert summary["num_classes"] == 3
    assert {p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file()} == {
        "source.json", "files.csv", "prepared/manifest.csv", "prepared/classes.json", "prepared/summary.json"}
    ref = runtime.read_source_ref(art)
    assert (ref["kind"], ref["root"], ref["files"], ref["by_reference"]) == ("s3", "images", 60, True)
    prepare(local, tmp_path / "local-prepared", params)  # `cladapter prepare` of the same files
    assert identity.data_hash(runtime.artifact_prepared(art)) == identity.data_hash(tmp_path / "local-prepared")

    moved = tmp_path / "pod-b" / "dataset"  # another pod: only the artifact travels
    shutil.copytree(art, moved)
    shutil.rmtree(tmp_path / "pod-a")
    with open(runtime.artifact_prepared(moved) / "manifest.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    rows = {split: [r["path"] for r in manifest if r["split"] == split] for split in ("train", "val", "test")}
    with runtime.local_data(moved, ["train", "val"]) as prepared:
        for split, expected in rows.items():
            got = read_manifest(prepared, split)
            assert [p.relative_to(prepared.parent / "source" / "images").as_posix() for p, _ in got] == expected
            assert all(p.is_file() == (split != "test") for p, _ in got), split
            assert all(p.read_bytes() == (local / p.relative_to(prepared.parent / "source" / "images")).read_bytes()
                       for p, _ in got if split != "test")
        fetched = [p for p in (prepared.parent / "source").rglob("*") if p.is_file()]
        assert len(fetched) == len(rows["train"]) + len(rows["val"])
        scratch = prepared.parent
    assert not scratch.exists()  # the fetched copy is removed with the step
    with runtime.local_data(moved, ["test"]) as prepared:  # evaluation's own split
        assert all(p.is_file() for p, _ in read_manifest(prepared, "test"))
    # an object changed after prepare is not silently other data
    s3.put_object(Bucket=bucket, Key=f"sets/d/images/{rows['train'][0]}", Body=b"other")
    with pytest.raises(DataError, match="changed since this run prepared it"):
        with runtime.local_data(moved, ["train"]):
            pass
    with pytest.raises(DataError, match="not .*demo.*an existing folder"):
        runtime.fetch_source(str(tmp_path / "nowhere"), "", "", tmp_path / "z")
    with pytest.raises(DataError, match="not a prepared Dataset artifact"):
        runtime.prepared_dir(tmp_path)


# ---------------------------------------------------------------------------- training steps

@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """A Dataset artifact of the demo digits (12 training scans per class)."""
    root = tmp_path_factory.mktemp("artifact") / "dataset"
    params = runtime.resolve_params({}, "data.shots_per_class=12; data.val_fraction=0.1; data.test_fraction=0.1")
    runtime.prepare_task("demo", "", "", params, root)
    return root


def tiny_params(**more):
    values = {k: v for k, v in TINY_ARGS.items() if k != "params_overrides"}
    values.update(more)
    return runtime.resolve_params(values, TINY_ARGS["params_overrides"] + "; train.cache.views=null")


def test_killed_training_step_resumes_from_the_s3_checkpoint(tiny_dataset, bucket, tmp_path, monkeypatch):
    """A retried step is a new pod: its checkpoint comes back from S3 and the result is
    the weights of an uninterrupted run. No checkpoint_prefix is given: the step mirrors
    under the install's root ($CLADAPTER_CHECKPOINT_ROOT, from the ConfigMap), run-scoped."""
    import torch
    monkeypatch.setenv("CLADAPTER_TRACKING", "0")
    params = tiny_params(stage1_epochs=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the steps below (OMP_NUM_THREADS=1): the same float sums
    try:
        reference = runtime.train_task(params, tiny_dataset, tmp_path / "ref", stage=1)
    finally:
        torch.set_num_threads(threads)
    prefix = f"s3://{bucket}/checkpoints"
    # The step holds still after its first epoch's checkpoint until SIGTERM arrives (no race
    # with a quick tiny model): the wrapped save waits for the S3 copy, then for the signal.
    script = ("import json, sys, time; from components import runtime; from cladapter_core import training as train\n"
              "save = train.Trainer.save_checkpoint\n"
              "def held(self, epoch, batch):\n"
              "    save(self, epoch, batch)\n"
              "    deadline = time.monotonic() + 240\n"
              "    while epoch == 1 and batch == 0 and not self.preempted and time.monotonic() < deadline:\n"
              "        time.sleep(0.05)\n"
              "train.Trainer.save_checkpoint = held\n"
              "p = json.loads(sys.argv[1])\n"
              "runtime.start_step()\n"
              "runtime.train_task(p, sys.argv[2], sys.argv[3], stage=1, pipeline_id='run-42', "
              "checkpoint_prefix=sys.argv[4])")
    env = child_env(CLADAPTER_TRACKING="0", CLADAPTER_CHECKPOINT_SYNC_S="0.2", CLADAPTER_CHECKPOINT_ROOT=prefix,
                    **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                  "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})

    def step(out):
        return subprocess.Popen([sys.executable, "-c", script, json.dumps(params), str(tiny_dataset),
                                 str(out), ""], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    import boto3
    s3 = boto3.client("s3")

    def mirrored():
        return s3.list_objects_v2(Bucket=bucket, Prefix="checkpoints/run-42/").get("KeyCount", 0) > 0

    first = step(tmp_path / "pod1" / "model")
    deadline = time.monotonic() + 300
    while not mirrored() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the step finished before it could be interrupted:\n" + first.stdout.read()
    first.send_signal(signal.SIGTERM)  # what the kubelet sends a preempted pod
    out1 = first.communicate(timeout=120)[0]
    assert first.returncode != 0 and "run again to resume" in out1, out1
    assert not (tmp_path / "pod1" / "model").exists()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="checkpoints/")["Contents"]]
    assert keys == ["checkpoints/run-42/train_stage1/last.pt"]

    retry = step(tmp_path / "pod2" / "model")  # another node: an empty disk
    out2 = retry.communicate(timeout=300)[0]
    assert retry.returncode == 0, out2
    assert f"checkpoint restored from {prefix}/run-42/train_stage1/last.pt" in out2 and "resuming" in out2
    ref_w, got = load_file(str(tmp_path / "ref" / "model.safetensors")), \
        load_file(str(tmp_path / "pod2" / "model" / "model.safetensors"))
    assert ref_w.keys() == got.keys() and all((ref_w[k] == got[k]).all() for k in ref_w)
    assert json.loads((tmp_path / "pod2" / "model" / "train_summary.json").read_text())["best_epoch"] \
        == reference["best_epoch"]
    assert not mirrored(), "the checkpoint should be removed once the stage is done"
    # where it goes: the run's parameter, else the install's root; `none` turns it off
    monkeypatch.setenv("CLADAPTER_CHECKPOINT_ROOT", prefix)
    assert runtime.checkpoint_root("") == prefix and runtime.checkpoint_root("s3://b/x") == "s3://b/x"
    assert runtime.checkpoint_root("none") is None
    monkeypatch.delenv("CLADAPTER_CHECKPOINT_ROOT")
    assert runtime.checkpoint_root("") is None


def test_tuning_workers_share_one_postgresql_study(tiny_dataset, tmp_path, monkeypatch):
    """The tuning steps as the pipeline runs them, the two workers as two processes at once
    on one PostgreSQL study; the finish step applies the best trial."""
    from fixtures_services import fresh_pg_database
    monkeypatch.setenv("CLADAPTER_TRACKING", "0")
    values = {k: v for k, v in TINY_ARGS.items() if k != "params_overrides"}
    values["stage2_epochs"] = 0  # trials of stage 1 alone: quicker, the same mechanics
    with fresh_pg_database("cladapter_kfp_tune") as storage:
        params = runtime.resolve_params(values, TINY_ARGS["params_overrides"] + "; "
                                        "tune.startup_trials=2; tune.space=[{param: model.num_centers, "
                                        "choices: [2, 3]}, {param: stage1.epochs, low: 1, high: 2}]")
        with pytest.raises(ParamsError, match="Secret cladapter-tune"):
            runtime.tune_plan_task(params, 3, 2, "run-7")  # no shared storage
        with pytest.raises(ParamsError, match="holds a password.*Secret cladapter-tune"):
            runtime.tune_plan_task(runtime.resolve_params(
                values, TINY_ARGS["params_overrides"] + "; tune.storage=postgresql://u:hunter2@db:5432/x"), 3, 2, "run-7")
        # the storage comes from the Secret cladapter-tune, as an env var of the tuning steps
        monkeypatch.setenv("CLADAPTER_TUNE_STORAGE", storage)
        assert runtime.tune_plan_task(params, 3, 2, "run-7") == [0, 1]
        script = ("import json, sys; from components import runtime; "
                  "print(json.dumps(runtime.tune_worker_task(json.loads(sys.argv[1]), sys.argv[2], "
                  "int(sys.argv[3]), 3, 2, 'run-7')))")
        workers = [subprocess.Popen([sys.executable, "-c", script, json.dumps(params), str(tiny_dataset), str(i)],
                                    env=child_env(CLADAPTER_TRACKING="0", CLADAPTER_TUNE_STORAGE=storage),
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
        outs = [w.communicate(timeout=600)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outs
        done = [json.loads(o.strip().splitlines()[-1]) for o in outs]
        assert sorted(len(d["trials"]) for d in done) == [1, 2]
        assert sorted(t for d in done for t in d["trials"]) == [0, 1, 2]  # one study, no trial twice
        tuned, summary = runtime.tune_finish_task(params, tmp_path / "finish", "run-7")
    assert summary["n_trials"] == 3 and summary["study_name"] == "cladapter-run-7"
    best = summary["best_params"]
    assert tuned["model"]["num_centers"] == best["model.num_centers"] in (2, 3)
    assert tuned["stage1"]["epochs"] == best["stage1.epochs"]
    assert {k: v for k, v in tuned.items() if k not in ("model", "stage1")} == \
        {k: v for k, v in params.items() if k not in ("model", "stage1")}


def test_a_rerun_tuning_worker_runs_only_what_its_earlier_attempt_left(tmp_path, monkeypatch):
    """A worker run again on the run's study (a retry; a run retried from the KFP UI keeps
    its run id): the trials of its share that finished count, the one its killed attempt
    left RUNNING becomes FAIL, and it runs only the rest - here nothing, so no training."""
    import optuna
    from components import tuning
    from optuna.distributions import IntDistribution
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    monkeypatch.setenv("CLADAPTER_TUNE_STORAGE", storage)
    params = runtime.resolve_params({}, "tune.space=[{param: model.num_centers, low: 2, high: 4}]")
    study = optuna.create_study(study_name=tuning.study_name(params, "run-9"), storage=storage,
                                direction="maximize")
    dist = {"model.num_centers": IntDistribution(2, 4)}
    for worker, value in ((0, 0.5), (0, 0.6), (1, 0.7)):  # worker 0 finished two, worker 1 one
        study.add_trial(optuna.trial.create_trial(params={"model.num_centers": 3}, distributions=dist,
                                                  value=value, user_attrs={"worker": worker, "epochs": 2}))
    dead = study.ask()  # worker 0's killed attempt
    dead.set_user_attr("worker", 0)
    # 5 trials over 2 workers: worker 0's share is 3, of which 2 finished
    todo, before = tuning.redo_share(study, 0, 3)
    assert todo == 1 and before["complete"] == 2 and before["epochs"] == 4
    assert study.get_trials()[dead.number].state == optuna.trial.TrialState.FAIL
    # worker 1 with a share of 1 that finished: runs nothing, reports the earlier attempt
    done = tuning.tune_worker(params, tmp_path / "unused", 1, 2, 2, "run-9", track=False)
    assert done["trials"] == [2] and done["complete"] == 1 and done["epochs"] == 2
    assert len(study.get_trials()) == 4  # no trial added


# ---------------------------------------------------------------------------- run-local

def executor_output(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def artifact_meta(run_dir: Path, task: str, name: str) -> dict:
    return executor_output(run_dir, task)["artifacts"][name]["artifacts"][0].get("metadata", {})


def run_local(tmp_path, uri, *params, env=None):
    out = tmp_path / "kfp"
    cmd = [str(BIN / "cladapter"), "pipeline", "run-local", "--out", str(out)]
    for name, value in TINY_ARGS.items():
        cmd += ["-p", f"{name}={json.dumps(value) if isinstance(value, dict) else value}"]
    for item in params:
        cmd += ["-p", item]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env=child_env(MLFLOW_TRACKING_URI=uri, **(env or {})))
    return proc, out


def mlflow_runs(uri):
    """The runs of the pipeline: those of the dataset's experiment (one per dataset, named
    cladapter-<dataset>; the promotion locks live apart)."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("cladapter-")
              and e.name != "cladapter-promotion-locks"]
    return client, client.search_runs([exp.experiment_id])


def by_stage(runs) -> dict:
    """Stage runs by their stage tag (their names say what ran: stage, backbone, K, data)."""
    return {r.data.tags["stage"]: r for r in runs if r.data.tags.get("cladapter.role") == "stage"}


def test_run_local_end_to_end_with_parallel_tuning(tmp_path):
    """The whole pipeline with kfp.local: tuning on (2 workers on a PostgreSQL study), both
    stages, evaluation, the gate, register, promote; artifacts, MLflow runs, lineage."""
    from fixtures_services import fresh_pg_database
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with fresh_pg_database("cladapter_kfp_run") as storage:
        proc, out = run_local(
            tmp_path, uri, "model_name=digits-kfp", "min_metric=0.0", "tune_trials=2", "tune_workers=2",
            "params_overrides=" + TINY_ARGS["params_overrides"] + f"; tune.storage={storage}; "
            "tune.startup_trials=1; tune.space=[{param: model.num_centers, choices: [3, 4]}]; "
            "tune.rerun_top=1; tune.rerun_seeds=2",
            env={"CLADAPTER_GIT_COMMIT": "0123456789abcdef0123456789abcdef01234567"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    run_dir = Path(log.split("local run finished: outputs in ")[1].split()[0])
    assert run_dir.parent == out and run_dir.name.startswith("cladapter-pipeline-")
    ran = {p.name for p in run_dir.iterdir()}
    assert set(STAGE_ORDER) | {"tune-plan", "tune-finish", "close-pipeline-run"} <= ran, ran
    assert "untuned" not in ran
    workers = [p for p in ran if p.startswith("for-loop")]  # kfp.local: one folder per iteration
    assert len(workers) == 2, ran
    for w in workers:
        assert [f for f in (run_dir / w).rglob("executor_output.json") if "tune-worker" in str(f)], w

    dataset = run_dir / "prepare" / "dataset"
    assert (dataset / "prepared" / "manifest.csv").is_file() and (dataset / "files.csv").is_file()
    assert not (dataset / "source").exists() and not list(dataset.rglob("*.png"))  # by reference
    meta = artifact_meta(run_dir, "prepare", "dataset")
    assert meta["num_classes"] == 10 and meta["train"] == 120
    data_hash = executor_output(run_dir, "prepare")["parameterValues"]["Output"]
    assert data_hash == identity.data_hash(runtime.artifact_prepared(dataset)) == meta["data_hash"]
    tuned = json.loads(executor_output(run_dir, "tune-finish")["parameterValues"]["Output"])
    best = artifact_meta(run_dir, "tune-finish", "tuning")["best_params"]
    assert tuned["model"]["num_centers"] == best["model.num_centers"]
    # the finish step re-ran the best trial on two other seeds, on the run's dataset
    reruns = json.loads(next((run_dir / "tune-finish").rglob("summary.json")).read_text())["reruns"]
    assert len(reruns) == 1 and len(reruns[0]["values"]) == 2
    for stage in (1, 2):
        model = run_dir / f"train-stage{stage}" / "model"
        assert {"model.safetensors", "config.json", "history.json"} <= {p.name for p in model.iterdir()}
        m = artifact_meta(run_dir, f"train-stage{stage}", "model")
        assert m["K"] == tuned["model"]["num_centers"]  # training took the tuned params

    evaluation = run_dir / "evaluate" / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    decision = json.loads((evaluation / "decision_metrics.json").read_text())
    assert decision["split"] == "val"  # the gate reads validation, never the test metrics
    assert executor_output(run_dir, "evaluate")["parameterValues"]["Output"] == \
        pytest.approx(decision["metrics"]["macro_f1"])
    cm = artifact_meta(run_dir, "evaluate", "confusion_matrix")["confusionMatrix"]
    assert sum(sum(r["row"]) for r in cm["rows"]) == metrics["n_samples"]
    promote = executor_output(run_dir, "promote")["parameterValues"]
    registered = executor_output(run_dir, "register")["parameterValues"]
    assert registered["model_name"] == "digits-kfp" and promote["decision"] == "promoted"
    assert promote["champion"] == registered["version"]
    assert not [p for p in (out / "checkpoints").rglob("*") if p.is_file()], "checkpoints left behind"

    client, runs = mlflow_runs(uri)
    by_name = by_stage(runs)
    parent = [r for r in runs if r.data.tags.get("cladapter.role") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    pid = parent[0].data.tags["cladapter.pipeline_id"]
    assert pid and "{{" not in pid
    assert parent[0].info.run_name == run_dir.name == parent[0].data.tags["kfp.run_name"]  # named after the KFP run
    assert parent[0].data.tags["kfp.final_state"] == "SUCCEEDED"
    trials = [r for r in runs if r.data.tags.get("stage") == "tune-trial"]
    assert len(trials) == 2 and {r.data.tags["cladapter.tune_worker"] for r in trials} == {"0", "1"}
    for name in ("train_stage1", "train_stage2", "evaluate", "register"):
        r = by_name[name]
        assert r.info.status == "FINISHED", name
        assert r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id, name
        tags = r.data.tags
        assert tags["cladapter.pipeline_id"] == pid and tags["kfp.run_id"] == pid, name
        assert tags["data_hash"] == data_hash, name  # one identity of the data in every step
        assert tags["git_commit"] == "0123456789abcdef0123456789abcdef01234567", name
        assert tags["image"] == DEFAULT_IMAGE, name
    assert by_name["evaluate"].data.metrics["test_macro_f1"] == pytest.approx(metrics["macro_f1"])
    version = client.get_model_version_by_alias("digits-kfp", "champion")
    assert str(version.version) == registered["version"] and version.tags["pipeline_id"] == pid
    assert version.tags["data_hash"] == data_hash and version.tags["kfp.run_name"] == run_dir.name


def test_run_local_without_tuning_a_killed_step_fails_the_parent_run(tmp_path, digits, bucket):
    """Tuning off: no tune step runs. The dataset is an S3 prefix, by reference: prepare's
    artifact holds no image, each training step fetches the train and validation files
    only, evaluation the test and validation files. Evaluation is SIGKILLed inside its
    MLflow run (a pod killed; evaluation is not retried, so the run fails at once): the
    exit handler closes the stage run and the parent run FAILED."""
    import boto3
    s3 = boto3.client("s3")
    for c in sorted(p.name for p in digits.iterdir()):
        for f in sorted((digits / c).iterdir())[:30]:
            s3.upload_file(str(f), bucket, f"digits/{c}/{f.name}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "a = sys.argv\n"
        "if '--function_to_execute' in a and a[a.index('--function_to_execute') + 1] == 'evaluate':\n"
        "    import killpoint\n"
        "    killpoint.arm('cladapter_core.evaluation.evaluate:evaluate', 1, 'before', '')\n")
    proc, out = run_local(tmp_path, uri, "model_name=digits-killed", f"dataset_uri=s3://{bucket}/digits",
                          env={"PYTHONPATH": os.pathsep.join([str(hook), str(REPO / "tests" / "faults")])})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "killpoint: SIGKILL" in log, log[-6000:]
    (run_dir,) = [p for p in out.iterdir() if p.name.startswith("cladapter-pipeline-")]
    dataset = run_dir / "prepare" / "dataset"
    assert not [p for p in dataset.rglob("*.png")] and (dataset / "files.csv").is_file()
    with open(dataset / "prepared" / "manifest.csv", newline="") as fh:
        splits = [r["split"] for r in csv.DictReader(fh)]
    n = {k: splits.count(k) for k in ("train", "val", "test")}
    assert n["train"] == 120 and n["val"] and n["test"]
    fetched = [line for line in log.splitlines() if line.strip().startswith("data: ")]
    assert sum(f"data: {n['train'] + n['val']} files" in line and "split(s) train, val (s3 s3://" in line
               for line in fetched) == 2, fetched  # stage 1 and stage 2
    assert [line for line in fetched if f"data: {n['test'] + n['val']} files" in line
            and "split(s) test, val" in line], fetched  # evaluation, before it was killed
    ran = {p.name for p in run_dir.iterdir()}
    assert not [p for p in ran if p.startswith("tune")], ran  # tuning off: no tune step
    assert {"resolve-params", "prepare", "untuned", "train-stage2", "close-pipeline-run"} <= ran
    assert "register" not in ran
    client, runs = mlflow_runs(uri)
    parent = [r for r in runs if r.data.tags.get("cladapter.role") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
    assert parent[0].data.tags["kfp.final_state"] != "SUCCEEDED"
    assert parent[0].info.run_name == run_dir.name
    by_name = by_stage(runs)
    assert by_name["train_stage2"].info.status == "FINISHED"
    assert by_name["evaluate"].info.status == "FAILED"  # it was RUNNING when its process died


def test_train_nodes_reaches_stage_2_which_launches_a_trainjob_above_1(compiled):
    spec = compiled["spec"]
    tasks = all_tasks(spec)
    nodes = tasks["train-stage2"]["inputs"]["parameters"]["nodes"]
    assert nodes["componentInputParameter"].endswith("train_nodes")  # through the exit handler
    assert spec["root"]["inputDefinitions"]["parameters"]["train_nodes"]["defaultValue"] == 1
    container = compiled["spec"]["deploymentSpec"]["executors"]["exec-train-stage2"]["container"]
    body = " ".join(container["command"] + container["args"])
    assert "multinode.stage2_task" in body and "if nodes > 1" in body
