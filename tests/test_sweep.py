"""The K-sensitivity study on the demo digits: 3 values x 2 seeds, resumable, in MLflow."""
import csv
import json

from cladapter_core.experiments.sweep import parse_grid, sweep
from tiny import tiny_params


def test_k_study_table_plot_mlflow_and_resume(prepared, embedded_mlflow, tmp_path, caplog):
    from mlflow import MlflowClient
    name, values = parse_grid("model.num_centers=2,4,8")
    assert (name, values) == ("model.num_centers", [2, 4, 8])
    params = tiny_params("stage1.epochs=1", "stage2.epochs=1", "tracking.experiment=k-study")
    out = tmp_path / "k"
    table = sweep(params, prepared, out, name, values, seeds=(0, 1))
    assert [r["value"] for r in table] == [2, 4, 8] and all(r["seeds"] == 2 for r in table)
    cells = list(csv.DictReader(open(out / "sweep.csv")))
    assert sorted((int(c["value"]), int(c["seed"])) for c in cells) == [(v, s) for v in values for s in (0, 1)]
    for row in table:  # the table is the mean of its cells
        mine = [float(c["macro_f1"]) for c in cells if int(c["value"]) == row["value"]]
        assert abs(row["macro_f1_mean"] - sum(mine) / 2) < 1e-9 and row["macro_f1_std"] >= 0
    assert "| model.num_centers | seeds | val macro-F1" in (out / "summary.md").read_text()
    assert (out / "sweep.png").stat().st_size > 2000
    assert json.loads((out / "sweep.json").read_text())["split"] == "val"

    client = MlflowClient()
    exp = client.get_experiment_by_name("k-study").experiment_id
    parents = client.search_runs([exp], "tags.`cladapter.sweep` != ''")
    assert len(parents) == 1
    parent = parents[0].info.run_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 6 and all("val_macro_f1" in c.data.metrics for c in children)
    assert {"sweep.png", "summary.md", "sweep.csv"} <= {a.path for a in client.list_artifacts(parent)}
    inputs = client.get_run(parent).inputs.dataset_inputs  # trained on train, scored on val
    assert sorted(i.tags[0].value for i in inputs) == ["train", "val"]
    assert all(i.dataset.name.endswith(("/train", "/val")) for i in inputs)

    # Rerun: every cell is finished, nothing trains again, nothing is logged twice.
    caplog.set_level("INFO", logger="cladapter_core")
    again = sweep(params, prepared, out, name, values, seeds=(0, 1))
    assert caplog.text.count("done before, reused") == 6
    assert [r["macro_f1_mean"] for r in again] == [r["macro_f1_mean"] for r in table]
    assert len(client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")) == 6
