"""DVC, as a user drives it, on a fresh copy of the repository in a temporary directory:
`dvc repro` runs everything, a second one does nothing, a params change reruns only what
depends on it, metrics/plots/experiments work, data goes through an S3 remote and back."""
import json
import os
import shutil
import subprocess

import pytest
import yaml
from helpers import BIN, REPO

# Tiny settings so the whole pipeline takes seconds per stage.
TINY = {
    "data": {"shots_per_class": 8, "val_fraction": 0.05, "test_fraction": 0.05},
    "model": {"backbone": "vit_tiny_patch16_224",
              "backbone_kwargs": {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 32,
                                  "num_heads": 2},
              "rank": 8, "num_centers": 4},
    "train": {"batch_size": 32},
    "stage1": {"epochs": 1},
    "stage2": {"epochs": 1},
}


def _deep_update(d, u):
    for k, v in u.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict) and k != "backbone_kwargs":
            _deep_update(d[k], v)
        else:
            d[k] = v
    return d


def run(cmd, cwd, env, check=True, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}")
    return out


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The tracked files of this working tree, committed into a new git repository."""
    root = tmp_path_factory.mktemp("dvcrepo") / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / f)
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(_deep_update(params, TINY), sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root.parent / 'mlflow.db'}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    env.pop("CLADAPTER_PIPELINE_ID", None)
    run(["git", "init", "-q", "-b", "main"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "fresh clone"], root, env)
    return root, env


def dvc(args, root, env, **kw):
    return run([str(BIN / "dvc"), *args], root, env, **kw)


@pytest.fixture(scope="module")
def built(clone):
    """The clone after its first `dvc repro`, and what that printed. Every test that reads
    the pipeline's outputs asks for it, so none depends on which test of this module ran
    first (or on this module staying on one xdist worker)."""
    root, env = clone
    return root, env, dvc(["repro"], root, env, timeout=900)


def test_repro_runs_everything_then_nothing(built):
    root, env, out = built
    for stage in ("demo_data", "prepare", "tune", "train_stage1", "train_stage2", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out, out[-3000:]
    # the evaluation scored every test scan, and metrics.json is what its predictions give
    metrics = json.loads((root / "outputs/eval/metrics.json").read_text())
    report = json.loads((root / "outputs/eval/classification_report.json").read_text())
    summary = json.loads((root / "outputs/prepared/summary.json").read_text())
    assert report["macro avg"]["support"] == summary["totals"]["test"] > 0
    assert metrics["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    reg = json.loads((root / "outputs/registry.json").read_text())
    assert reg["registration"]["version"] == "1" or str(reg["registration"]["version"]) == "1"
    assert reg["promotion"]["champion_after"] in ("1", 1)
    again = dvc(["repro"], root, env)
    assert "Running stage" not in again
    assert "Data and pipelines are up to date" in again


def test_dvc_and_kfp_paths_tag_the_same_data_hash(built, tmp_path):
    """One identity of the data: every stage run of `dvc repro` (and the registered
    version) is tagged with the hash of the prepared manifest, the same value the KFP
    pipeline's prepare step gives the same data (identity.data_hash of its artifact), not DVC's md5 of
    the data folder."""
    from mlflow import MlflowClient

    from cladapter_core import identity
    from cladapter_core.params import load_params
    from components import runtime
    root, env, _ = built
    expected = identity.data_hash(root / "outputs" / "prepared")
    params = load_params(str(root / "params.yaml"), use_best=False)
    runtime.prepare_task(str(root / "data" / "demo"), "", "", params, tmp_path / "kfp-dataset")
    assert identity.data_hash(runtime.artifact_prepared(tmp_path / "kfp-dataset")) == expected
    assert expected != identity.source_hash(root / "data" / "demo")  # not DVC's md5 of the folder
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    stages = {r.data.tags.get("stage"): r.data.tags["data_hash"] for r in runs
              if r.data.tags.get("cladapter.role") == "stage"}
    assert {"train_stage1", "train_stage2", "evaluate", "register"} <= set(stages), stages
    assert set(stages.values()) == {expected}, stages
    version = client.get_model_version(params["register"]["model_name"], "1")
    assert version.tags["data_hash"] == expected


def test_code_change_marks_the_stages_that_run_it_changed(built):
    """Editing the library makes `dvc status` name the stages that run it; the metrics
    live outside DVC's cache, for git (`dvc metrics diff` across commits needs no cache)."""
    root, env, _ = built
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert stages["evaluate"]["metrics"] == [{"metrics/evaluate.json": {"cache": False}}]
    assert json.loads((root / "metrics/evaluate.json").read_text()) == \
        json.loads((root / "outputs/eval/metrics.json").read_text())
    assert run(["git", "check-ignore", "-q", "metrics/evaluate.json"], root, env, check=False) == ""
    train = root / "cladapter_core" / "training" / "trainer.py"
    original = train.read_text()
    try:
        train.write_text(original + "\n# an edit\n")
        status = dvc(["status"], root, env)
        for stage in ("tune", "train_stage1", "train_stage2", "evaluate"):
            assert f"{stage}:" in status, status
        assert "prepare:" not in status and "register:" not in status, status
        assert "cladapter_core" in status
    finally:
        train.write_text(original)
    for code in ("serving/pyfunc.py", "serving/model_code.py"):  # the logged model's code: register reruns
        path = root / "cladapter_core" / code
        original = path.read_text()
        try:
            path.write_text(original + "\n# an edit\n")
            status = dvc(["status"], root, env)
            assert "register:" in status and "cladapter_core/serving" in status, status
        finally:
            path.write_text(original)
    (root / "cladapter_core" / "__pycache__").mkdir(exist_ok=True)
    (root / "cladapter_core" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"compiled")
    assert "Data and pipelines are up to date" in dvc(["status"], root, env)  # .pyc files do not count


def test_params_change_reruns_only_what_depends_on_it(built):
    root, env, _ = built
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["stage2"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(["status"], root, env)
    assert "train_stage2" in status and "train_stage1" not in status
    out = dvc(["repro"], root, env, timeout=900)
    ran = [s for s in ("demo_data", "prepare", "tune", "train_stage1", "train_stage2", "evaluate",
                       "register") if f"Running stage '{s}'" in out]
    assert ran == ["train_stage2", "evaluate", "register"], out[-3000:]
    hist = json.loads((root / "outputs/stage2/history.json").read_text())
    assert [r["stage"] for r in hist].count(2) == 2
    # the retrained model is a new registered version; the same one registered twice is not
    reg = json.loads((root / "outputs/registry.json").read_text())
    assert str(reg["registration"]["version"]) == "2"


def test_metrics_plots_and_experiments(built):
    root, env, _ = built
    shown = json.loads(dvc(["metrics", "show", "--json"], root, env))
    text = json.dumps(shown)
    assert "macro_f1" in text and "accuracy" in text
    plots_dir = root.parent / "plots"
    dvc(["plots", "show", "-o", str(plots_dir)], root, env)
    html = (plots_dir / "index.html").read_text()
    assert "training curves" in html or "history.json" in html
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "pipeline outputs"], root, env)
    out = dvc(["exp", "run", "-S", "stage2.epochs=3", "-n", "longer-stage2"], root, env, timeout=900)
    assert "Running stage 'train_stage2'" in out and "Running stage 'train_stage1'" not in out
    exps = dvc(["exp", "show", "--json"], root, env)
    assert "longer-stage2" in exps


def test_data_through_an_s3_remote(built, s3_env, bucket):
    root, env, _ = built
    env = {**env, **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                 "AWS_DEFAULT_REGION")}}
    env.pop("AWS_ENDPOINT_URL", None)  # DVC takes the endpoint from its remote config
    # a user's own dataset: a folder added to DVC, pushed, removed, pulled back
    src = root / "data" / "my_images"
    shutil.copytree(root / "data" / "demo" / "3", src / "three")
    shutil.copytree(root / "data" / "demo" / "7", src / "seven")
    dvc(["add", "data/my_images"], root, env)
    dvc(["remote", "add", "-d", "team", f"s3://{bucket}/dvc"], root, env)
    dvc(["remote", "modify", "team", "endpointurl", s3_env], root, env)
    dvc(["push", "data/my_images.dvc"], root, env)
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    digest = {p: (src / p).read_bytes() for p in before[:5]}
    shutil.rmtree(src)
    shutil.rmtree(root / ".dvc" / "cache")
    dvc(["pull", "data/my_images.dvc"], root, env)
    after = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    assert after == before and all((src / p).read_bytes() == b for p, b in digest.items())
    import boto3
    keys = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="dvc/")
    assert keys["KeyCount"] > 0
