"""What the MLflow UI shows of a run, read back through MlflowClient: the experiment is
the dataset's and marked as model training, runs are named for what ran, and every training
and evaluation run lists its data as dataset inputs (name, digest = the prepared data's
hash, source = where the data lives, context = the split). Real CLI commands on the
session's embedded store."""
import csv
import json

import pytest

from cladapter_core import cli, identity, tracking
from tiny import TINY

SOURCE = "s3://lab-data/datasets/cells"


def _flags(*more):
    out = []
    for item in [*TINY, "stage1.epochs=1", f"data.source={SOURCE}", *more]:
        out += ["-S", item]
    return out


def _client():
    from mlflow import MlflowClient
    return MlflowClient()


def _inputs(run):
    return {d.dataset.name: (d.dataset, {t.key: t.value for t in d.tags})
            for d in run.inputs.dataset_inputs}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The demo digits in a folder named `cells`, prepared as the session's `prepared` is:
    the name runs and experiments take is the prepared data's own."""
    from cladapter_core.data import make_demo_data, prepare
    from tiny import tiny_params
    root = tmp_path_factory.mktemp("named")
    make_demo_data(root / "cells", per_class=40)
    prepare(root / "cells", root / "prepared", tiny_params(
        "data.shots_per_class=12", "data.val_fraction=0.05", "data.test_fraction=0.05"))
    return root / "prepared"


@pytest.fixture
def trained(embedded_mlflow, prepared, tmp_path):
    """`cladapter train --stage 1` then `cladapter evaluate` on the digits, data.source an
    S3 URI whose last folder is `cells`."""
    model, ev = tmp_path / "stage1", tmp_path / "eval"
    assert cli.main(["train", "--stage", "1", "--prepared", str(prepared), "--out", str(model),
                     "--device", "cpu", *_flags()]) == 0
    assert cli.main(["evaluate", "--model", str(model), "--prepared", str(prepared), "--out", str(ev),
                     *_flags()]) == 0
    return model, ev


def _stage_runs(experiment_id, stage):
    runs = _client().search_runs([experiment_id], f"tags.stage = '{stage}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    assert runs, stage
    return runs[0]


def test_runs_their_names_their_experiment_and_their_data(trained, prepared):
    client = _client()
    exp = client.get_experiment_by_name("cladapter-cells")             # one per dataset
    assert exp is not None and exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    digest = identity.data_hash(prepared)
    with open(prepared / "manifest.csv", newline="") as fh:
        splits = [row["split"] for row in csv.DictReader(fh)]
    counts = {split: splits.count(split) for split in set(splits)}

    train_run = _stage_runs(exp.experiment_id, "train_stage1")
    assert train_run.info.run_name == "stage1 vit_tiny_patch16_224 K=4 cells"
    assert train_run.data.tags["data_hash"] == digest
    found = _inputs(train_run)
    assert sorted(found) == ["cells/train", "cells/val"]
    for split in ("train", "val"):
        ds, tags = found[f"cells/{split}"]
        assert tags == {"mlflow.data.context": split}
        assert ds.digest == digest[:32] and ds.source_type == "s3"  # MLflow keeps 36 characters
        assert json.loads(ds.source) == {"uri": SOURCE}
        assert json.loads(ds.profile) == {"num_files": counts[split], "num_classes": 10}

    eval_run = _stage_runs(exp.experiment_id, "evaluate")
    assert eval_run.info.run_name == "evaluate vit_tiny_patch16_224 K=4 cells"
    found = _inputs(eval_run)
    assert sorted(found) == ["cells/test", "cells/val"]
    assert {found[n][1]["mlflow.data.context"] for n in found} == {"test", "val"}
    assert all(ds.digest == digest[:32] for ds, _ in found.values())
    # Both stage runs hang under one pipeline parent, named for the dataset too.
    parent = client.get_run(train_run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name.startswith("pipeline cells ")
    assert eval_run.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_a_baseline_names_its_mode_and_a_path_source_is_local(embedded_mlflow, prepared, tmp_path):
    """data.source names another folder than the one `prepared` came from (the params'
    default, or a stale value): the run is named for the data it trained on."""
    out = tmp_path / "linear"
    assert cli.main(["train", "--prepared", str(prepared), "--out", str(out), "--mode", "linear",
                     *_flags("data.source=data/microscopy/plates/", "tracking.experiment=my-study")]) == 0
    exp = _client().get_experiment_by_name("my-study")                  # an explicit name holds
    run = _stage_runs(exp.experiment_id, "train_stage1")
    assert run.info.run_name == "stage1 linear vit_tiny_patch16_224 cells"
    ds, tags = _inputs(run)["cells/train"]
    assert ds.source_type == "local" and json.loads(ds.source) == {"uri": "data/microscopy/plates/"}
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_evaluate_from_the_registry_equals_evaluate_from_the_folder(trained, prepared, embedded_mlflow,
                                                                    tmp_path, capsys):
    model, ev = trained
    name = f"cells-{tmp_path.name[-8:]}"
    embedded_mlflow.monkeypatch.setenv("CLADAPTER_MODEL_CACHE", str(tmp_path / "cache"))
    assert cli.main(["register", "--model", str(model), "--eval", str(ev), "--prepared", str(prepared),
                     "--promote", *_flags(f"register.model_name={name}")]) == 0
    again = tmp_path / "eval-registry"
    assert cli.main(["evaluate", "--model", f"models:/{name}@champion", "--prepared", str(prepared),
                     "--out", str(again), *_flags()]) == 0
    assert f"models:/{name}@champion is {name} version 1" in capsys.readouterr().out
    assert json.loads((again / "metrics.json").read_text()) == json.loads((ev / "metrics.json").read_text())
    exp = _client().get_experiment_by_name("cladapter-cells")
    run = _stage_runs(exp.experiment_id, "evaluate")
    assert run.data.tags["cladapter.model_uri"] == f"models:/{name}@champion"


@pytest.mark.parametrize("source, name", [
    ("data/demo", "demo"), ("data/cells/", "cells"), ("s3://lab/sets/cells/", "cells"),
    ("data/cells/labels.csv", "cells"), ("/abs/My Cells (2024)", "My-Cells-2024"), ("", "dataset"),
    ("s3://bucket", "bucket")])
def test_dataset_and_experiment_names(source, name):
    params = {"data": {"source": source}, "tracking": {"experiment": None}}
    assert identity.dataset_name(params) == identity.name_of(source) == name
    assert identity.dataset_name(params, "no/prepared/folder/here") == name  # nothing recorded
    assert tracking.experiment_name(params) == f"cladapter-{name}"
    assert tracking.experiment_name({**params, "tracking": {"experiment": "mine"}}) == "mine"
