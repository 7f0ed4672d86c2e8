"""Optuna search on the real demo digits with a tiny backbone: best params written and
used by training, MLflow study/trial runs, workers sharing a PostgreSQL study, pruning,
and clear errors."""
import json

import optuna
import pytest
import yaml

from cladapter_core import cli
from cladapter_core.data import make_demo_data, prepare
from cladapter_core.errors import ParamsError
from cladapter_core.params import load_params, parse_overrides
from cladapter_core.tune import (TuneError, check_space, finish_study, open_storage, open_study, suggest,
                                 trial_params, tune, tune_worker)
from tiny import SMALL

TINY = SMALL + [
    "model.backbone=vit_tiny_patch16_224",
    "model.backbone_kwargs={img_size: 16, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.rank=8", "model.num_centers=4", "train.batch_size=16", "train.warmup_epochs=0",
    "train.lr=0.01", "stage1.epochs=2", "stage2.epochs=1", "train.cache.views=0",
    "tune.startup_trials=2", "tune.pruner_startup_trials=2", "tune.pruner_warmup_steps=1",
    "tune.rerun_top=0",  # the re-runs have a test of their own
]
SPACE = ("tune.space=[{param: model.num_centers, choices: [2, 4, 8]}, "
         "{param: stage1.epochs, low: 1, high: 2}, {param: stage2.lr_factor, choices: [0.1, 0.3]}]")
CLEAN_ENV = ("MLFLOW_TRACKING_URI", "CLADAPTER_PIPELINE_ID", "CLADAPTER_TRACKING",
             "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def tiny(*more):
    return load_params(None, TINY + [SPACE] + list(more))


def flags(*more):
    out = []
    for item in TINY + [SPACE] + list(more):
        out += ["-S", item]
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune_demo")
    make_demo_data(root / "digits")
    # 12 training scans per class keep an epoch to a fraction of a second.
    params = tiny("data.shots_per_class=12", "data.val_fraction=0.06", "data.test_fraction=0.03")
    prepare(root / "digits", root / "prepared", params)
    return root / "prepared"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """cwd = an empty folder (no params.yaml: the defaults apply), tracking variables unset."""
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import mlflow
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def pg_url():
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    from fixtures_services import fresh_pg_database
    # The bare postgresql:// scheme, as a user writes it: tune picks the psycopg2 driver.
    with fresh_pg_database("cladapter_tune", scheme="postgresql") as uri:
        yield uri


def test_small_study_best_params_are_written_tracked_and_used_by_training(prepared, workdir, monkeypatch, capsys):
    import mlflow
    from mlflow import MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    monkeypatch.setattr("tempfile.tempdir", str(workdir / "tmp"))  # where trials train
    (workdir / "tmp").mkdir()

    # The user's params.yaml: the tiny backbone and a small space.
    (workdir / "params.yaml").write_text(yaml.safe_dump(parse_overrides(TINY + [SPACE, "tune.pruner=none"])))
    rc = cli.main(["tune", "--prepared", str(prepared), "--n-trials", "3"])
    assert rc == 0, capsys.readouterr().err
    out = workdir / "outputs" / "tune"
    study = optuna.load_study(study_name="cladapter", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert best == {"model": {"num_centers": study.best_params["model.num_centers"]},
                    "stage1": {"epochs": study.best_params["stage1.epochs"]},
                    "stage2": {"lr_factor": study.best_params["stage2.lr_factor"]}}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_value"] == pytest.approx(study.best_value) and summary["complete"] == 3
    for name in ("optimization_history", "param_importances", "k_vs_f1", "intermediate_values"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    assert list((workdir / "tmp").iterdir()) == []  # trial outputs are deleted

    # MLflow: one study run with the pictures; each trial a run nested under it.
    client = MlflowClient()
    exp = client.get_experiment_by_name("cladapter-digits")  # the prepared data's name, not data.source's
    runs = client.search_runs([exp.experiment_id])
    study_runs = [r for r in runs if r.data.tags.get("optuna.study_name") == "cladapter"
                  and r.data.tags.get("cladapter.role") == "stage"]
    assert len(study_runs) == 1
    srun = study_runs[0]
    assert srun.info.status == "FINISHED"
    assert srun.data.metrics["best_value"] == pytest.approx(study.best_value)
    arts = {a.path for a in client.list_artifacts(srun.info.run_id, "tune")}
    assert {"tune/optimization_history.png", "tune/param_importances.png", "tune/k_vs_f1.png",
            "tune/best_params.yaml"} <= arts
    trials = [r for r in runs if r.data.tags.get("cladapter.role") == "trial"]
    assert len(trials) == 3
    by_number = {int(r.data.tags["optuna.trial"]): r for r in trials}
    for t in study.trials:
        r = by_number[t.number]
        assert r.data.tags["mlflow.parentRunId"] == srun.info.run_id
        assert r.data.params["model.num_centers"] == str(t.params["model.num_centers"])
        assert r.data.metrics["objective"] == pytest.approx(t.value)
        k = t.params["model.num_centers"]  # named for what it trained, on which data
        assert r.info.run_name == f"trial-{t.number} vit_tiny_patch16_224 K={k} digits"
        assert {d.dataset.name: d.dataset.digest for d in r.inputs.dataset_inputs} == \
            {"digits/train": r.data.tags["data_hash"][:32], "digits/val": r.data.tags["data_hash"][:32]}
        history = client.get_metric_history(r.info.run_id, "val_macro_f1")
        assert sorted(m.step for m in history) == list(range(1, t.params["stage1.epochs"] + 2))
    mlflow.set_tracking_uri(None)

    # Training with tune.use_best trains what the study found; a flag still wins over it.
    rc = cli.main(["train", "--prepared", str(prepared), "--out", "m1", "--no-track",
                   "-S", "tune.use_best=true"])
    assert rc == 0
    assert "tuned parameters from outputs/tune/best_params.yaml" in capsys.readouterr().out
    config = json.loads((workdir / "m1" / "config.json").read_text())
    history = json.loads((workdir / "m1" / "history.json").read_text())
    assert config["num_centers"] == best["model"]["num_centers"]
    assert len(history) == best["stage1"]["epochs"]
    p = load_params("params.yaml", ["tune.use_best=true", "model.num_centers=3"])
    assert p["model"]["num_centers"] == 3 and p["stage1"]["epochs"] == best["stage1"]["epochs"]
    assert p["stage2"]["lr_factor"] == best["stage2"]["lr_factor"]


def test_two_worker_processes_share_one_postgresql_study(prepared, workdir, pg_url):
    params = tiny("stage1.epochs=1")
    summary = tune(params, prepared, workdir / "out", n_trials=4, workers=2, study_name="shared",
                   storage=pg_url, track=False)
    study = optuna.load_study(study_name="shared", storage=open_storage(pg_url))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]
    assert {t.user_attrs["worker"] for t in study.trials} == {0, 1}
    per_worker = [w["trials"] for w in summary["workers"]]
    assert sorted(len(w) for w in per_worker) == [2, 2] and sorted(sum(per_worker, [])) == [0, 1, 2, 3]
    # Another worker (another machine, same URL) resumes the study by name.
    extra = tune_worker(params, prepared, "shared", pg_url, 1, worker_index=2, track=False)
    assert extra["trials"] == [4]
    summary = finish_study(params, workdir / "out", "shared", pg_url, track=False)
    assert summary["n_trials"] == 5
    assert yaml.safe_load((workdir / "out" / "best_params.yaml").read_text())["model"]["num_centers"] \
        == summary["best_params"]["model.num_centers"]


def test_median_pruner_stops_trials_that_cannot_win(prepared, workdir):
    # lr 1e-9 cannot learn: its macro-F1 stays at the untrained model's while lr 0.01 climbs.
    params = tiny("tune.space=[{param: train.lr, choices: [0.01, 1.0e-9]}]", "stage1.epochs=3",
                  "stage2.epochs=1", f"tune.storage=sqlite:///{workdir / 'study.db'}")
    study = open_study(params)
    for lr in (0.01, 0.01, 1.0e-9, 1.0e-9):
        study.enqueue_trial({"train.lr": lr})
    result = tune_worker(params, prepared, n_trials=4, track=False)
    trials = optuna.load_study(study_name="cladapter", storage=open_storage(params["tune"]["storage"])).trials
    states = [(t.params["train.lr"], t.state.name) for t in trials]
    assert states == [(0.01, "COMPLETE"), (0.01, "COMPLETE"), (1e-9, "PRUNED"), (1e-9, "PRUNED")]
    # pruned at the first step after warm-up (step 1: half of stage 1, its second epoch of 3)
    assert [t.user_attrs["epochs"] for t in trials] == [4, 4, 2, 2]
    assert all(max(t.intermediate_values) == 1 for t in trials[2:])
    # the completed trials reported the 4 quarters of stage 1 only: stage 2 never reaches the pruner
    assert sorted(trials[0].intermediate_values) == [0, 1, 2, 3]
    assert result["pruned"] == 2 and result["epochs"] == 12


def test_empty_space_and_bad_storage_give_clear_errors(prepared, workdir, capsys):
    with pytest.raises(TuneError, match=r"tune.space is empty"):
        tune(tiny("tune.space=[]"), prepared, workdir / "out", track=False)
    assert cli.main(["tune", "--prepared", str(prepared), "--no-track", *flags("tune.space=[]")]) == 2
    assert "tune.space is empty" in capsys.readouterr().err

    with pytest.raises(TuneError, match=r"'not a url' is not a database URL"):
        open_storage("not a url")
    with pytest.raises(TuneError, match=r"tune.storage postgresql://postgres@127.0.0.1:1/nowhere: cannot open"):
        open_storage("postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(TuneError, match=r"tune.storage redis://localhost/0: cannot open"):
        open_storage("redis://localhost/0")
    # the CLI: params validation names the field; the storage error names the URL
    assert cli.main(["tune", "--prepared", str(prepared), "--no-track", "--storage", "nonsense", *flags()]) == 2
    assert "tune.storage: must be a database URL" in capsys.readouterr().err
    url = "postgresql://someone:secret@127.0.0.1:1/db"
    assert cli.main(["tune", "--prepared", str(prepared), "--no-track", "--storage", url, *flags()]) == 2
    err = capsys.readouterr().err
    assert "tune.storage postgresql://someone:***@127.0.0.1:1/db: cannot open" in err and "secret" not in err

    # values the space can give that the trainer would refuse
    with pytest.raises(TuneError, match=r"model.rank\): the value 0 is invalid"):
        check_space(tiny("tune.space=[{param: model.rank, choices: [0, 8]}]"))
    with pytest.raises(ParamsError, match=r"\(data.val_fraction\): data.val_fraction cannot be searched"):
        tiny("tune.space=[{param: data.val_fraction, low: 0.1, high: 0.2}]")
    with pytest.raises(ParamsError, match=r"tune.space\[1\] \(model.nope\): model.nope is not a parameter"):
        tiny("tune.space=[{param: model.num_centers, choices: [5]}, {param: model.nope, low: 1, high: 2}]")


def test_best_params_precedence_and_the_dvc_placeholder(workdir, capsys, caplog):
    (workdir / "params.yaml").write_text("model:\n  num_centers: 30\nstage1:\n  epochs: 5\n")
    # dvc.yaml's tune stage with tune.use_best false: no search, an empty file
    assert cli.main(["tune", "--only-if-used", "--no-track", "--prepared", "nowhere"]) == 0
    best_file = workdir / "outputs" / "tune" / "best_params.yaml"
    assert yaml.safe_load(best_file.read_text()) == {}
    assert load_params("params.yaml", ["tune.use_best=true"])["model"]["num_centers"] == 30

    best_file.write_text("model: {num_centers: 20}\nstage1: {epochs: 3}\n")
    p = load_params("params.yaml")  # use_best false: params.yaml
    assert (p["model"]["num_centers"], p["stage1"]["epochs"]) == (30, 5)
    p = load_params("params.yaml", ["tune.use_best=true", "stage1.epochs=7"])
    assert (p["model"]["num_centers"], p["stage1"]["epochs"]) == (20, 7)  # file over params.yaml, flag over file
    assert load_params("params.yaml", ["tune.use_best=true"], use_best=False)["model"]["num_centers"] == 30

    best_file.write_text("model: {num_centres: 20}\n")
    with pytest.raises(ParamsError, match=r"outputs/tune/best_params.yaml: model.num_centres: unknown parameter"):
        load_params("params.yaml", ["tune.use_best=true"])
    best_file.unlink()
    capsys.readouterr()
    assert load_params("params.yaml", ["tune.use_best=true"])["model"]["num_centers"] == 30
    assert "tune.use_best is true but outputs/tune/best_params.yaml does not exist" in caplog.text


def test_space_choices_written_as_text_are_the_numbers_training_reads():
    # YAML 1.1 reads 1e-4 as text; the params read it as the float wherever a float is expected.
    params = tiny("tune.space=[{param: train.lr, choices: [1e-4, 1.0e-3]}, {param: model.rank, low: 4, high: 8}]")
    assert params["tune"]["space"][0]["choices"] == ["1e-4", 1e-3]  # as written
    space = check_space(params)
    assert space[0]["choices"] == [1e-4, 1e-3] and all(type(v) is float for v in space[0]["choices"])
    assert space[1] == {"param": "model.rank", "low": 4, "high": 8}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = suggest(study.ask(), space, params)
    assert type(values["train.lr"]) is float and type(values["model.rank"]) is int
    p = trial_params(params, values)
    assert p["train"]["lr"] in (1e-4, 1e-3) and load_params(None, p) == p


def test_the_pruner_compares_trials_at_the_same_fraction_of_stage_1():
    """Step k is the k-th quarter of each trial's own stage 1, whatever its length, and
    stage 2 never reports: a 12-epoch trial at its 2nd epoch (lr near the top of its cosine)
    is not held against a 4-epoch one at its 2nd (half-way down)."""
    from cladapter_core.tune.trial import PruningCallback, fraction_steps
    assert [fraction_steps(e, 12) for e in range(1, 13)] == \
        [[], [], [0], [], [], [1], [], [], [2], [], [], [3]]
    assert [fraction_steps(e, 2) for e in (1, 2)] == [[0, 1], [2, 3]]
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for s1 in (4, 12):  # both learn at the same pace per fraction of their schedule
        trial = study.ask()
        counter = {"epochs": 0}  # one per trial, shared by its stages (as run_trial does)
        stage1 = PruningCallback(trial, 0, counter=counter, epochs=s1)
        stage2 = PruningCallback(trial, s1, counter=counter, prune=False)
        for e in range(1, s1 + 1):  # TrialPruned here would fail the test
            stage1.on_epoch_end({"stage": 1, "epoch": e, "val_macro_f1": e / s1})
        for e in range(1, 3):
            stage2.on_epoch_end({"stage": 2, "epoch": e, "val_macro_f1": 0.01})
        study.tell(trial, 0.9)
    for t, s1 in zip(study.trials, (4, 12)):
        assert t.state.name == "COMPLETE"
        assert t.intermediate_values == {k: pytest.approx((k + 1) / 4) for k in range(4)}
        assert t.user_attrs["epochs"] == s1 + 2  # stage-2 epochs still count (and are logged)
    # Reported by epoch index, as before, the long trial would have been pruned at its 2nd epoch.
    old = optuna.create_study(direction="maximize", pruner=pruner)
    short = old.ask()
    for e in range(1, 5):
        short.report(e / 4, e - 1)
    old.tell(short, 0.9)
    long = old.ask()
    long.report(1 / 12, 0)
    long.report(2 / 12, 1)
    assert long.should_prune()


def test_failed_trials_count_as_the_worst_value_and_the_worker_goes_on(prepared, workdir):
    """A trial that diverges (a learning rate far too high) fails with the worst objective,
    0, and its reason; the sampler learns from it and the worker runs the next trial."""
    params = tiny("tune.space=[{param: train.lr, choices: [0.01, 1.0e+6]}]", "tune.pruner=none",
                  "train.grad_clip=0.0", f"tune.storage=sqlite:///{workdir / 'study.db'}")
    study = open_study(params)
    for lr in (1.0e6, 0.01):
        study.enqueue_trial({"train.lr": lr})
    result = tune_worker(params, prepared, n_trials=2, track=False)
    trials = optuna.load_study(study_name="cladapter", storage=open_storage(params["tune"]["storage"])).trials
    assert trials[0].value == 0.0 and "non-finite" in trials[0].user_attrs["failed"]
    assert trials[1].value > 0 and "failed" not in trials[1].user_attrs
    assert result["failed"] == 1 and result["complete"] == 1
    summary = finish_study(params, workdir / "out", track=False)
    assert summary["best_trial"] == 1 and summary["failed"] == 1


def test_the_best_trials_are_re_run_on_other_seeds_before_best_params_is_written(prepared, workdir):
    params = tiny("tune.pruner=none", "tune.rerun_top=2", "tune.rerun_seeds=3", "seed=5",
                  f"tune.storage=sqlite:///{workdir / 'study.db'}")
    summary = tune(params, prepared, workdir / "out", n_trials=3, track=False)
    reruns = summary["reruns"]
    assert len(reruns) == 2 and all(r["seeds"] == [6, 7, 8] and len(r["values"]) == 3 for r in reruns)
    for r in reruns:
        assert r["mean"] == pytest.approx(sum(r["values"]) / 3) and r["std"] is not None
    assert reruns[0]["mean"] >= reruns[1]["mean"] and summary["best_trial"] == reruns[0]["trial"]
    text = (workdir / "out" / "best_params.yaml").read_text()
    assert f"trial {reruns[0]['trial']}: search" in text and "seeds [6, 7, 8]: mean" in text
    study = optuna.load_study(study_name="cladapter", storage=open_storage(params["tune"]["storage"]))
    chosen = study.trials[summary["best_trial"]].params
    assert yaml.safe_load(text)["model"]["num_centers"] == chosen["model.num_centers"]


def test_trials_see_the_images_the_final_run_sees():
    """tune.cache_views null (the default): a trial trains as the final run does; V: a cache
    of at least one augmented view per stage-1 epoch; 0 (un-augmented features) is refused."""
    assert load_params(None)["tune"]["cache_views"] is None
    params = tiny("train.cache.views=null")
    assert trial_params(params, {"stage1.epochs": 6})["train"]["cache"]["views"] is None
    cached = tiny("train.cache.views=null", "tune.cache_views=2")
    assert trial_params(cached, {"stage1.epochs": 6})["train"]["cache"]["views"] == 6
    assert trial_params(cached, {"stage1.epochs": 1})["train"]["cache"]["views"] == 2
    with pytest.raises(ParamsError, match=r"tune.cache_views: must be null \(as the final run\)"):
        tiny("tune.cache_views=0")
