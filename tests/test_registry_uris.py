"""Registered models wherever a model is taken (`predict`, `evaluate`, `serve` accept
models:/<name>@<alias> and models:/<name>/<version>), and commands that read the registry
refuse to create a new, empty store. Real stores: the embedded SQLite store of the session,
and empty folders where there is none."""
import uuid
from pathlib import Path

import numpy as np
import pytest

from cladapter_core import cli, identity, registry, tracking
from cladapter_core.serving import pyfunc as serving
from cladapter_core.errors import TrackingError
from fixtures_services import tracked_params, write_metrics


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def images(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture
def champion(embedded_mlflow, tiny_model_dirs, tmp_path):
    """A registered model whose v1 (tiny_model_dirs[0]) is champion and v2 challenger."""
    name = _name("uri")
    params = tracked_params(name)
    registry.register(tiny_model_dirs[0], write_metrics(tmp_path / "ev0", macro_f1=0.7), params)
    registry.promote(params)
    registry.register(tiny_model_dirs[1], write_metrics(tmp_path / "ev1", macro_f1=0.5), params)
    embedded_mlflow.monkeypatch.setenv(registry.MODEL_CACHE_ENV, str(tmp_path / "model-cache"))
    return name


# -- a store that is not there is not created ----------------------------------------------
READERS = [["lineage", "models:/m@champion"], ["promote"],
           ["predict", "--model", "models:/m@champion", "x.png"],
           ["evaluate", "--model", "models:/m/3", "--no-track"], ["serve", "--dry-run"]]


@pytest.mark.parametrize("argv", READERS, ids=[a[0] for a in READERS])
def test_readers_refuse_to_create_the_default_store(argv, clean_mlflow_env, tmp_path, capsys):
    clean_mlflow_env.chdir(tmp_path)  # no mlflow.db here, MLFLOW_TRACKING_URI unset
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"no MLflow store at sqlite:///mlflow.db" in err, err
    assert f"the database file {tmp_path / 'mlflow.db'} does not exist" in err
    assert "does not create an empty store" in err and "MLFLOW_TRACKING_URI" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no mlflow.db, no mlruns


def test_a_missing_folder_store_is_named_and_not_created(clean_mlflow_env, tmp_path, capsys):
    clean_mlflow_env.chdir(tmp_path)
    clean_mlflow_env.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    assert cli.main(["lineage", "models:/m/1"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store at ./mlruns ($MLFLOW_TRACKING_URI)" in err
    assert f"the folder {tmp_path / 'mlruns'} does not exist" in err
    assert not (tmp_path / "mlruns").exists()
    with pytest.raises(TrackingError, match="nowhere.db does not exist"):
        tracking.check_tracking(f"sqlite:///{tmp_path}/nowhere.db", existing=True)
    assert tracking.check_tracking(f"sqlite:///{tmp_path}/new.db") == f"sqlite:///{tmp_path}/new.db"


def test_an_existing_store_without_the_model_says_which_store_and_what_it_holds(
        champion, embedded_mlflow, capsys):
    assert cli.main(["lineage", "models:/no-such-model@champion"]) == 2
    err = capsys.readouterr().err
    assert f"no registered model 'no-such-model' in the store {embedded_mlflow.uri}" in err
    assert champion in err  # what is registered there
    assert cli.main(["lineage", f"models:/{champion}@gold"]) == 2
    err = capsys.readouterr().err
    assert f"has no alias 'gold' (its aliases: challenger (v2), champion (v1))" in err
    assert cli.main(["lineage", f"models:/{champion}/9"]) == 2
    assert "has no version 9" in capsys.readouterr().err


# -- predict, evaluate, serve from the registry ----------------------------------------------
def test_predict_from_the_champion_equals_predict_from_its_folder(champion, tiny_model_dirs, images,
                                                                  tmp_path, capsys):
    by_folder, by_alias, by_version = (tmp_path / f"{n}.csv" for n in ("folder", "alias", "version"))
    assert cli.main(["predict", "--model", str(tiny_model_dirs[0]), str(images), "--out", str(by_folder)]) == 0
    assert cli.main(["predict", "--model", f"models:/{champion}@champion", str(images),
                     "--out", str(by_alias), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"models:/{champion}@champion is {champion} version 1" in out and "5 predictions" in out
    assert by_alias.read_text() == by_folder.read_text()
    assert len(by_folder.read_text().splitlines()) == 6
    # The version pinned: the same model, from the cache (downloaded once).
    folder, mv = registry.resolve_model(f"models:/{champion}/1")
    assert mv["version"] == 1 and tmp_path / "model-cache" in folder.parents
    assert identity.content_hash(folder) == identity.content_hash(tiny_model_dirs[0])
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["predict", "--model", f"models:/{champion}/1", str(images), "--out", str(by_version)]) == 0
    assert by_version.read_text() == by_folder.read_text()
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # The challenger is another model: other numbers.
    other = tmp_path / "challenger.csv"
    assert cli.main(["predict", "--model", f"models:/{champion}@challenger", str(images), "--out", str(other)]) == 0
    assert other.read_text() != by_folder.read_text()


def test_evaluate_takes_a_registered_version(champion, tiny_model_dirs, tmp_path, capsys):
    """evaluate resolves the URI before checking the data: the class names of the registered
    model are compared with the prepared data's (here: another dataset, so refused)."""
    from cladapter_core.data import make_demo_data, prepare
    from tiny import tiny_params
    make_demo_data(tmp_path / "digits")
    prepare(tmp_path / "digits", tmp_path / "prepared",
            tiny_params("data.shots_per_class=3", "data.val_fraction=0.2", "data.test_fraction=0.2"))
    code = cli.main(["evaluate", "--model", f"models:/{champion}@champion", "--prepared",
                     str(tmp_path / "prepared"), "--out", str(tmp_path / "eval"), "--no-track"])
    captured = capsys.readouterr()
    assert f"models:/{champion}@champion is {champion} version 1" in captured.out
    assert code == 2 and "classes" in captured.err and not (tmp_path / "eval").exists()


def test_serve_takes_a_model_folder_or_a_registered_version(champion, tiny_model_dirs, capsys):
    assert cli.main(["serve", "--model-uri", f"models:/{champion}@champion", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # The verified copy serves: `mlflow models serve` downloads nothing the check did not see.
    served = Path(out.split("verified copy: ")[1].split()[0])
    assert f"is {champion} version 1" in out and f"--model-uri {served}" in out
    assert served.parent == Path(registry.model_cache_dir()) and (served / "MLmodel").is_file()
    assert cli.main(["serve", "--model-uri", str(tiny_model_dirs[2]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "is a model folder, served as the MLflow model" in out
    served = Path(out.split("served as the MLflow model ")[1].split(" ")[0])
    assert (served / "MLmodel").is_file()
    assert identity.content_hash(serving.model_dir_in(served)) == identity.content_hash(tiny_model_dirs[2])
