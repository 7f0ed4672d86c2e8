"""The Kubeflow pipeline: the compiled YAML (stages in order, GPU requests, retries, cache,
secrets, gate, image), the committed YAML equal to a fresh compile, the components'
runtime (parameters -> params, datasets from S3 / DVC / folders, the checkpoint that
survives a killed step, tuning), and `cladapter pipeline run-local` end to end on the
demo digits with its artifacts and MLflow runs.

No Kubernetes or KFP API here: the YAML is compiled and inspected, the pipeline runs
with kfp.local, and `submit` is only shown to fail clearly without a server.
"""
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

from cladapter_core.errors import CLAdapterError, DataError, ParamsError
from cladapter_core.params import defaults
from components import runtime
from pipelines import cladapter_pipeline as kp

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_IMAGE = "ghcr.io/cladapter/cladapter:0.1.0"
STAGE_ORDER = ["resolve-params", "prepare", "tune", "train-stage1", "train-stage2", "evaluate",
               "register", "promote"]
GPU_EXECUTORS = ["exec-tune", "exec-train-stage1", "exec-train-stage2", "exec-evaluate"]
TINY_KWARGS = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
TINY_ARGS = {
    "backbone": "vit_tiny_patch16_224", "backbone_kwargs": TINY_KWARGS, "num_centers": 4,
    "batch_size": 16, "stage1_epochs": 2, "stage2_epochs": 1,
    "params_overrides": "model.rank=8; train.warmup_epochs=1; data.shots_per_class=12; "
                        "data.val_fraction=0.1; data.test_fraction=0.1",
}
CLEAN_ENV = ("MLFLOW_TRACKING_URI", "CLADAPTER_PIPELINE_ID", "CLADAPTER_TRACKING",
             "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "CLADAPTER_IMAGE")


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


def test_stages_are_wired_in_order(compiled):
    tasks = all_tasks(compiled["spec"])
    assert set(STAGE_ORDER) <= set(tasks), sorted(tasks)
    root = compiled["spec"]["root"]["dag"]["tasks"]

    def producers(name):
        inputs = tasks[name].get("inputs") or {}
        found = set(tasks[name].get("dependentTasks") or [])
        for kind in ("artifacts", "parameters"):
            for spec in (inputs.get(kind) or {}).values():
                for key in ("taskOutputArtifact", "taskOutputParameter"):
                    if key in spec:
                        found.add(spec[key]["producerTask"])
        return found

    # Each stage consumes the one before it (data flow, not just ordering).
    def artifact_from(task, name):
        return tasks[task]["inputs"]["artifacts"][name]["taskOutputArtifact"]

    def parameter_from(task, name):
        return tasks[task]["inputs"]["parameters"][name]["taskOutputParameter"]

    assert parameter_from("prepare", "data_params")["producerTask"] == "resolve-params"
    assert artifact_from("tune", "dataset")["producerTask"] == "prepare"
    assert parameter_from("tune", "params")["producerTask"] == "resolve-params"
    for stage in ("train-stage1", "train-stage2", "evaluate"):
        assert artifact_from(stage, "dataset")["producerTask"] == "prepare"
        assert parameter_from(stage, "params")["producerTask"] == "tune"
    assert artifact_from("train-stage2", "stage1_model") == {"outputArtifactKey": "model",
                                                               "producerTask": "train-stage1"}
    assert artifact_from("evaluate", "model") == {"outputArtifactKey": "model", "producerTask": "train-stage2"}
    # register/promote sit in the gate's sub-DAG, fed from the root through its inputs
    assert parameter_from("promote", "version") == {"outputParameterKey": "version", "producerTask": "register"}
    gate = [t for t in root.values() if t.get("triggerPolicy")]
    assert len(gate) == 1 and {"evaluate", "train-stage2"} <= set(gate[0]["dependentTasks"])
    # a topological order of the root DAG follows the stages
    order, done = [], set()
    pending = {name: producers(name) & set(root) for name in root}
    while pending:
        ready = sorted(n for n, deps in pending.items() if deps <= done)
        assert ready, f"cycle among {pending}"
        order += ready
        done |= set(ready)
        for n in ready:
            del pending[n]
    assert [n for n in order if n in STAGE_ORDER] == STAGE_ORDER[:6]
    assert root[order[-1]] is gate[0]  # the gate comes last


def test_gate_registers_and_promotes_only_when_evaluation_passes(compiled):
    spec = compiled["spec"]
    root = spec["root"]["dag"]["tasks"]
    (gate_name, gate), = [(n, t) for n, t in root.items() if t.get("triggerPolicy")]
    cond = gate["triggerPolicy"]["condition"]
    assert "pipelinechannel--evaluate-Output" in cond and ">=" in cond and "pipelinechannel--min_macro_f1" in cond
    inner = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"register", "promote"}
    assert not {"register", "promote"} & set(root)
    assert spec["root"]["inputDefinitions"]["parameters"]["min_macro_f1"]["defaultValue"] == 0.0


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
    for name in ("train-stage1", "train-stage2", "tune"):
        policy = tasks[name]["retryPolicy"]
        assert policy["maxRetryCount"] >= 2 and policy["backoffDuration"], name
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
    assert tasks["prepare"]["cachingOptions"] == {"enableCache": True}
    # steps that log to MLflow or change the registry are never skipped by the cache
    for name in ("evaluate", "register", "promote"):
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
        assert "retryPolicy" not in tasks[name]


def test_secrets_come_from_kubernetes(compiled):
    platform = compiled["platform"]

    def secret_keys(executor, optional):
        out = {}
        for s in platform.get(executor, {}).get("secretAsEnv", []):
            if bool(s.get("optional")) == optional:
                out.setdefault(s["secretName"], set()).update(k["secretKey"] for k in s["keyToEnv"])
        return out

    mlflow_req, s3_req = {"MLFLOW_TRACKING_URI"}, {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for ex in ("exec-train-stage1", "exec-train-stage2", "exec-tune", "exec-evaluate", "exec-register"):
        req = secret_keys(ex, optional=False)
        assert req == {"cladapter-mlflow": mlflow_req, "cladapter-s3": s3_req}, ex
        opt = secret_keys(ex, optional=True)
        assert {"AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"} <= opt["cladapter-s3"]
    assert secret_keys("exec-prepare", False) == {"cladapter-s3": s3_req}
    assert secret_keys("exec-promote", False) == {"cladapter-mlflow": mlflow_req}
    assert "exec-resolve-params" not in platform  # no credentials where none are needed
    # The keys the pipeline requires are in both overlays' Secret templates and documented.
    readme = (REPO / "infra" / "k8s" / "README.md").read_text()
    for overlay in ("dev", "prod"):
        folder = REPO / "infra" / "k8s" / "overlays" / overlay / "secrets"
        for secret, template, keys in (("cladapter-mlflow", "mlflow.env.example", mlflow_req),
                                       ("cladapter-s3", "s3.env.example", s3_req)):
            lines = (folder / template).read_text().splitlines()
            defined = {ln.split("=", 1)[0] for ln in lines if "=" in ln and not ln.startswith("#")}
            assert keys <= defined, f"{overlay}/{template} lacks {keys - defined}"
            assert f"`{secret}`" in readme and all(f"`{k}`" in readme for k in keys)


def test_every_step_runs_in_the_project_image_without_installing(compiled):
    for name, ex in compiled["spec"]["deploymentSpec"]["executors"].items():
        c = ex["container"]
        assert c["image"] == DEFAULT_IMAGE, name
        text = " ".join(c["command"] + c["args"])
        assert "pip install" not in text, f"{name} installs packages at run time"
        assert "from components import runtime" in text, f"{name} is not a shell over components.runtime"


def test_pipeline_parameters_default_to_params(compiled):
    d = defaults()
    params = compiled["spec"]["root"]["inputDefinitions"]["parameters"]
    expected = {"dataset_uri": "demo", "backbone": d["model"]["backbone"],
                "num_centers": d["model"]["num_centers"], "stage1_epochs": d["stage1"]["epochs"],
                "stage1_lr": d["train"]["lr"], "stage2_epochs": d["stage2"]["epochs"],
                "batch_size": d["train"]["batch_size"], "model_name": d["register"]["model_name"],
                "promotion_margin": d["register"]["margin"], "tune_trials": 0}
    for name, value in expected.items():
        assert params[name]["defaultValue"] == value, name
    assert params["stage2_lr"]["defaultValue"] == pytest.approx(d["train"]["lr"] * d["stage2"]["lr_factor"])
    for name in ("dataset_path", "dataset_rev", "checkpoint_uri", "pretrained", "checkpoint_prefix",
                 "params_overrides", "min_macro_f1", "backbone_kwargs", "seed"):
        assert name in params


def test_image_from_environment_and_gpus_per_training_step(tmp_path):
    out = tmp_path / "p.yaml"
    code = ("from pipelines.cladapter_pipeline import compile_pipeline; "
            f"compile_pipeline({str(out)!r}, train_gpus=2)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=child_env(CLADAPTER_IMAGE="registry.example.org/team/cladapter:7"))
    assert proc.returncode == 0, proc.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert {ex["container"]["image"] for ex in executors.values()} == {"registry.example.org/team/cladapter:7"}
    for name in ("exec-train-stage1", "exec-train-stage2"):
        assert executors[name]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    assert executors["exec-evaluate"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    tasks = all_tasks(spec)
    assert tasks["train-stage1"]["inputs"]["parameters"]["num_gpus"]["runtimeValue"]["constant"] == 2
    with pytest.raises(CLAdapterError, match="train_gpus"):
        kp.build_pipeline(0)


# ---------------------------------------------------------------------------- parameters

def test_pipeline_arguments_are_typed_and_checked():
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
         "num_centers": 7, "stage1_lr": 1e-3, "stage2_lr": 1e-4, "checkpoint_uri": "",
         "model_name": "pets", "promotion_margin": 0.01},
        "data.shots_per_class=5; train.augment.hflip=true\nmodel.rank=16")
    assert p["model"]["num_centers"] == 7 and p["model"]["checkpoint"] is None
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
        kp.submit("http://127.0.0.1:9", {"num_centers": 10})


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


def test_prepared_dataset_artifact_is_self_contained(digits, tmp_path):
    """Later steps run in other pods: the artifact must carry its images."""
    import shutil

    from cladapter_core.data import read_manifest
    params = runtime.resolve_params({}, "data.shots_per_class=3")
    art = tmp_path / "pod-a" / "dataset"
    summary = runtime.prepare_task(str(digits), "", "", params, art)
    assert summary["num_classes"] == 10 and (art / "source" / "0").is_dir()
    moved = tmp_path / "pod-b" / "dataset"
    shutil.copytree(art, moved)
    shutil.rmtree(tmp_path / "pod-a")
    rows = read_manifest(runtime.prepared_dir(moved))
    assert rows and all(str(path).startswith(str(moved)) and path.is_file() for path, _ in rows)
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
    the weights of an uninterrupted run."""
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
    script = ("import json, sys; from components import runtime; "
              "p = json.loads(sys.argv[1]); "
              "runtime.train_task(p, sys.argv[2], sys.argv[3], stage=1, pipeline_id='run-42', "
              "checkpoint_prefix=sys.argv[4])")
    env = child_env(CLADAPTER_TRACKING="0", CLADAPTER_CHECKPOINT_SYNC_S="0.2",
                    **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                  "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})

    def step(out):
        return subprocess.Popen([sys.executable, "-c", script, json.dumps(params), str(tiny_dataset),
                                 str(out), prefix], env=env, stdout=subprocess.PIPE,
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


def test_tune_step_applies_the_best_trial(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CLADAPTER_TRACKING", "0")
    values = {k: v for k, v in TINY_ARGS.items() if k != "params_overrides"}
    values["stage2_epochs"] = 0  # trials of stage 1 alone: quicker, the same mechanics
    params = runtime.resolve_params(
        values, TINY_ARGS["params_overrides"] + "; tune.startup_trials=2; "
        "tune.space=[{param: model.num_centers, choices: [2, 3]}, {param: stage1.epochs, low: 1, high: 2}]")
    same, none = runtime.tune_task(params, tiny_dataset, tmp_path / "off", 0)
    assert same == params and none is None
    assert yaml.safe_load((tmp_path / "off" / "best_params.yaml").read_text()) == {}
    tuned, summary = runtime.tune_task(params, tiny_dataset, tmp_path / "on", 2)
    assert summary["complete"] + summary["pruned"] == 2 and (tmp_path / "on" / "optuna.db").is_file()
    best = summary["best_params"]
    assert tuned["model"]["num_centers"] == best["model.num_centers"] in (2, 3)
    assert tuned["stage1"]["epochs"] == best["stage1.epochs"]
    assert {k: v for k, v in tuned.items() if k not in ("model", "stage1")} == \
        {k: v for k, v in params.items() if k not in ("model", "stage1")}


# ---------------------------------------------------------------------------- run-local

def executor_output(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def artifact_meta(run_dir: Path, task: str, name: str) -> dict:
    return executor_output(run_dir, task)["artifacts"][name]["artifacts"][0].get("metadata", {})


def test_run_local_end_to_end_on_the_demo_data(tmp_path):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    out = tmp_path / "kfp"
    cmd = [str(BIN / "cladapter"), "pipeline", "run-local", "--out", str(out)]
    for name, value in TINY_ARGS.items():
        cmd += ["-p", f"{name}={json.dumps(value) if isinstance(value, dict) else value}"]
    cmd += ["-p", "model_name=digits-kfp", "-p", "min_macro_f1=0.0"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                          env=child_env(MLFLOW_TRACKING_URI=uri))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    run_dir = Path(log.split("local run finished: outputs in ")[1].split()[0])
    assert run_dir.parent == out and run_dir.name.startswith("cladapter-pipeline-")
    assert {p.name for p in run_dir.iterdir()} == set(STAGE_ORDER)

    dataset = run_dir / "prepare" / "dataset"
    assert (dataset / "prepared" / "manifest.csv").is_file() and (dataset / "source" / "9").is_dir()
    meta = artifact_meta(run_dir, "prepare", "dataset")
    assert meta["num_classes"] == 10 and meta["train"] == 120
    for stage in (1, 2):
        model = run_dir / f"train-stage{stage}" / "model"
        assert {"model.safetensors", "config.json", "history.json"} <= {p.name for p in model.iterdir()}
        m = artifact_meta(run_dir, f"train-stage{stage}", "metrics")
        assert 0.0 <= m["best_val_macro_f1"] <= 1.0 and m["epochs_run"] == {1: 2, 2: 1}[stage]
    hist = json.loads((run_dir / "train-stage2" / "model" / "history.json").read_text())
    assert [(r["stage"], r["epoch"]) for r in hist] == [(1, 1), (1, 2), (2, 1)]

    evaluation = run_dir / "evaluate" / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert artifact_meta(run_dir, "evaluate", "metrics")["macro_f1"] == pytest.approx(metrics["macro_f1"])
    assert executor_output(run_dir, "evaluate")["parameterValues"]["Output"] == pytest.approx(metrics["macro_f1"])
    cm = artifact_meta(run_dir, "evaluate", "confusion_matrix")["confusionMatrix"]
    assert [a["displayName"] for a in cm["annotationSpecs"]] == [str(i) for i in range(10)]
    assert sum(sum(r["row"]) for r in cm["rows"]) == metrics["n_samples"]
    assert (run_dir / "evaluate" / "report").read_bytes() == (evaluation / "report.html").read_bytes()
    assert b"<html" in (evaluation / "report.html").read_bytes()[:500].lower()
    promote = executor_output(run_dir, "promote")["parameterValues"]
    registered = executor_output(run_dir, "register")["parameterValues"]
    assert registered["model_name"] == "digits-kfp" and promote["decision"] == "promoted"
    assert promote["champion"] == registered["version"]
    assert not [p for p in (out / "checkpoints").rglob("*") if p.is_file()], "checkpoints left behind"

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cladapter")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert {"train_stage1", "train_stage2", "evaluate", "register"} <= set(by_name)
    parent = [r for r in runs if r.data.tags.get("cladapter.role") == "pipeline"]
    assert len(parent) == 1
    pid = parent[0].data.tags["cladapter.pipeline_id"]
    assert pid and "{{" not in pid
    for name in ("train_stage1", "train_stage2", "evaluate", "register"):
        r = by_name[name]
        assert r.info.status == "FINISHED", name
        assert r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id, name
        assert r.data.tags["cladapter.pipeline_id"] == pid, name
    assert len(client.get_metric_history(by_name["train_stage1"].info.run_id, "train_loss")) == 2
    assert by_name["evaluate"].data.metrics["test_macro_f1"] == pytest.approx(metrics["macro_f1"])
    version = client.get_model_version_by_alias("digits-kfp", "champion")
    assert str(version.version) == registered["version"] and version.tags["pipeline_id"] == pid
    assert version.run_id == by_name["register"].info.run_id
