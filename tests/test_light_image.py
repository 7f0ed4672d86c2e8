"""The light image: the pipeline steps that do not train run without torch.

infra/docker/Dockerfile's `light` target installs requirements-light.lock (the full lock
less torch, torchvision, timm and what only they need) and the project; the compiled
pipeline runs `components.stages.LIGHT_STEPS` in it. Here those steps' own component
functions run in a fresh interpreter where importing torch fails, on real inputs (a data
folder, an Optuna study, an MLflow store): what the light image's pods do.
"""
from __future__ import annotations

import json
import subprocess
import sys

import yaml

from components import stages
from components.pipeline_params import params_step_inputs
from helpers import REPO, child_env

NO_TORCH = '''
import sys
class NoTorch:
    """The light image has no torch: importing it (or what needs it) fails, as there."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ModuleNotFoundError(f"No module named {name!r} (the light image has no torch)")
sys.meta_path.insert(0, NoTorch())
'''

STEPS = NO_TORCH + '''
import json
from types import SimpleNamespace
from components import stages
args = json.loads(sys.argv[1])
out = {}
params, _ = stages.make_resolve_params().python_func(**args["resolve"])
out["params"] = json.loads(params)
out["version"] = stages.dataset_version.python_func(dataset_uri=args["data"], dataset_path="", dataset_rev="")
out["untuned"] = json.loads(stages.untuned.python_func(params=params))
out["plan"] = stages.tune_plan.python_func(params=params, n_trials=3, n_workers=2, pipeline_id=args["pid"],)
stages.close_pipeline_run.python_func(pipeline_id=args["pid"], pipeline_name="light-run",
                                      status=SimpleNamespace(state="FAILED", error_message="a step failed"))
from cladapter_core.backbone_names import check_backbone_name
check_backbone_name("vit_base_patch16_clip_224.laion2b")  # a pretrained tag after the architecture
try:
    check_backbone_name("vit_base_patch16_clip_224x")
except Exception as e:
    out["unknown"] = str(e)
out["torch_loaded"] = [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm")]
print("RESULT " + json.dumps(out))
'''


def test_the_light_steps_run_without_torch(tmp_path):
    from cladapter_core.data import make_demo_data
    from cladapter_core.params import load_params
    from mlflow import MlflowClient
    from pipelines import cladapter_pipeline as kp
    data = tmp_path / "digits"
    make_demo_data(data, per_class=3)
    base = load_params(str(kp.DEMO_PARAMS), use_best=False)
    resolve = {n: kp.parameters()[n].default for n, _ in params_step_inputs()}
    resolve.update(base_params=json.dumps(base), dataset_uri=str(data), num_centers=5,
                   params_overrides=f"tune.storage=sqlite:///{tmp_path / 'study.db'}")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = {"resolve": resolve, "data": str(data), "pid": "kfp-light-run"}
    proc = subprocess.run([sys.executable, "-c", STEPS, json.dumps(args)], capture_output=True, text=True,
                          cwd=tmp_path, env=child_env(MLFLOW_TRACKING_URI=store), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["torch_loaded"] == []
    assert out["params"]["model"]["num_centers"] == 5 and out["untuned"] == out["params"]
    assert out["version"].startswith("folder:")
    assert out["plan"] == [0, 1]
    assert "did you mean: vit_base_patch16_clip_224" in out["unknown"]
    # the plan opened the study's MLflow run; the exit handler closed the pipeline's runs
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`cladapter.pipeline_id` = 'kfp-light-run'")
    assert runs and all(r.info.status == "FAILED" for r in runs)
    assert {r.data.tags.get("kfp.final_state") for r in runs if r.data.tags.get("cladapter.role") == "pipeline"} \
        == {"FAILED"}


def test_a_training_step_needs_torch_and_says_so(tmp_path):
    """The guard above is real: the same interpreter cannot load a training step."""
    code = NO_TORCH + "from components import runtime\nruntime.train_task({}, '.', '.', stage=1)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=child_env(), timeout=300)
    assert proc.returncode != 0 and "the light image has no torch" in proc.stderr


def test_the_compiled_pipeline_runs_only_the_light_steps_in_the_light_image(tmp_path):
    from pipelines import cladapter_pipeline as kp
    out = kp.compile_pipeline(tmp_path / "p.yaml", params_file=kp.DEMO_PARAMS)
    executors = next(yaml.safe_load_all(out.read_text()))["deploymentSpec"]["executors"]
    light = {f"exec-{s.replace('_', '-')}" for s in stages.LIGHT_STEPS}
    assert light <= set(executors)
    for name, ex in executors.items():
        want = stages.LIGHT_IMAGE if name in light else stages.IMAGE
        assert ex["container"]["image"] == want, name
    assert stages.LIGHT_IMAGE == stages.IMAGE.replace("/cladapter:", "/cladapter-light:")


def test_the_light_lock_is_the_full_lock_less_torch_and_what_only_it_needs():
    from infra_helpers import script
    ll = script("light-lock.py")
    full, light = ll.lock_blocks(ll.LOCK.read_text()), ll.lock_blocks(ll.LIGHT_LOCK.read_text())
    assert ll.LIGHT_LOCK.read_text() == ll.light_lock(), "stale: run infra/scripts/light-lock.py"
    assert all(full[n] == block for n, block in light.items())  # same versions, same hashes
    dropped = set(full) - set(light)
    assert {"torch", "torchvision", "timm", "triton", "nvidia-cudnn-cu13", "sympy"} <= dropped
    assert {"mlflow", "kfp", "optuna", "dvc", "psycopg2-binary", "boto3", "pydantic-settings",
            "setuptools"} <= set(light)
    # nothing that something kept needs is dropped
    assert not dropped & ll.closure(["mlflow", "kfp", "kfp-kubernetes", "optuna", "dvc-s3", "s3fs"])


def test_the_backbone_names_the_light_image_reads_are_timms():
    """Without timm the params step checks names against timm_models.txt: timm's own list."""
    from cladapter_core import backbone_names as bn
    assert bn.NAMES_FILE.read_text() == bn.names_file_text(), \
        "stale: run python -m cladapter_core.backbone_names --write"


def test_the_dockerfile_builds_the_light_target_from_the_light_lock():
    from infra_helpers import DOCKERFILE, dockerfile_instructions
    text = DOCKERFILE.read_text()
    stages_ = [a.split() for kw, a in dockerfile_instructions(text) if kw == "FROM"]
    names = {s[-1]: s[0] for s in stages_ if len(s) == 3 and s[1].upper() == "AS"}
    assert names["light"] == "user" and names["runtime"] == "user"
    assert stages_[-1][-1] == "runtime", "the GPU image stays the default (last) target"
    assert "--require-hashes --no-deps -r requirements-light.lock" in text
    assert "COPY --from=build-light /opt/venv /opt/venv" in text
    assert "find_spec('torch') is None" in text
