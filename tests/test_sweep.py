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
    report = json.loads((out / "sweep.json").read_text())
    assert report["split"] == "val"
    # per-row intervals, every value against the best one paired on seeds, the verdict
    best = max(table, key=lambda r: r["macro_f1_mean"])
    assert report["comparisons"]["reference"] == best["value"]
    assert sorted(c["name"] for c in report["comparisons"]["pairs"]) == sorted(
        f"model.num_centers={r['value']}" for r in table if r is not best)
    for r in report["summary"]:
        assert (r["macro_f1_ci_low"] is None) == (r["macro_f1_std"] == 0 or r["macro_f1_std"] is None) or \
            r["macro_f1_ci_low"] <= r["macro_f1_mean"] <= r["macro_f1_ci_high"]
    assert all(c["n"] == 2 and c["verdict"] in report["verdict"] for c in report["comparisons"]["pairs"])
    assert (out / "summary.md").read_text().rstrip().endswith(report["comparisons"]["pairs"][-1]["verdict"])

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


def test_a_parameter_the_compare_budget_overrides_is_refused():
    """Sweeping train.lr while compare.head_lr is set would train every cell alike."""
    import pytest

    from cladapter_core.errors import ParamsError
    from cladapter_core.experiments.sweep import check_not_overridden
    params = tiny_params("compare.head_lr=0.001")
    with pytest.raises(ParamsError, match=r"sweep train.lr=0.01: cla-sft would train with train.lr=0.001.*"
                                          r"compare.head_lr"):
        check_not_overridden(params, "train.lr", [0.01, 0.02], "cla-sft")
    check_not_overridden(tiny_params(), "train.lr", [0.01, 0.02], "cla-sft")  # head lr follows train.lr
    with pytest.raises(ParamsError, match="stage2.lr_factor.*compare.backbone_lr"):
        check_not_overridden(tiny_params("compare.backbone_lr=0.0001"), "stage2.lr_factor", [0.1, 0.5], "cla-sft")
    with pytest.raises(ParamsError, match="stage1.epochs.*one-stage method"):
        check_not_overridden(tiny_params(), "stage1.epochs", [1, 2], "cla-stage1")
    check_not_overridden(tiny_params(), "model.num_centers", [2, 4], "cla-sft")
