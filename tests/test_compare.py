"""`compare`: every method through the same loop, a table over seeds."""
import csv
import json
import statistics
import subprocess
import sys

import pytest
from tiny import TINY


def test_compare_writes_table_over_seeds(prepared, tmp_path):
    out = tmp_path / "cmp"
    (tmp_path / "p.yaml").write_text("")
    flags = [f"--set={o}" for o in TINY + ["stage1.epochs=1", "stage2.epochs=1"]]
    proc = subprocess.run([sys.executable, "-m", "cladapter_core.cli", "compare", "--params",
                           str(tmp_path / "p.yaml"), "--prepared", str(prepared), "--out", str(out),
                           "--seeds", "0", "1", *flags], capture_output=True, text=True, timeout=900,
                          env={"CLADAPTER_TRACKING": "0", **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [
        (m, s) for s in ("0", "1") for m in ("linear", "linear-mean", "full", "lp-ft", "cla-stage1", "cla-sft")]
    summary = json.loads((out / "compare.json").read_text())["summary"]
    by = {r["method"]: r for r in summary}
    # the trainable-parameter column follows the methods' freezing
    assert by["linear"]["trainable_params"] < by["cla-stage1"]["trainable_params"] < by["full"]["trainable_params"]
    assert by["cla-sft"]["trainable_params"] == by["full"]["trainable_params"] + by["cla-stage1"]["trainable_params"] - by["linear"]["trainable_params"]
    assert by["full"]["trainable_pct"] == 100.0
    for r in summary:
        f1s = [float(x["macro_f1"]) for x in rows if x["method"] == r["method"]]
        assert abs(r["macro_f1_mean"] - sum(f1s) / 2) < 1e-9
        assert r["macro_f1_std"] == pytest.approx(statistics.stdev(f1s))  # the sample std
    assert "| cla-sft | 2 |" in proc.stdout and (out / "summary.md").is_file()
    assert (out / "compare.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".cmp.tmp-*"))
    # the equal budget, stated in the output: 2 epochs for every method, the two lrs
    report = json.loads((out / "compare.json").read_text())
    assert report["budget"]["epochs"] == 2 and all(int(r["epochs"]) == 2 for r in rows)
    assert report["budget"]["backbone_lr"] == report["budget"]["head_lr"] * 0.1
    assert "Equal budget: 2 epochs per method" in proc.stdout
    for r in summary:  # the paper's F1 is summarised the same way
        prs = [float(x["f1_macro_pr"]) for x in rows if x["method"] == r["method"]]
        assert r["f1_macro_pr_mean"] == pytest.approx(statistics.mean(prs))


def test_compare_in_mlflow_parent_and_a_child_per_method_and_seed(prepared, embedded_mlflow, tmp_path):
    """compare(track=True): one parent run with the budget, the datasets, the table and the
    plot; a child per method and seed with its test scores. A failed comparison leaves its
    parent FAILED, not RUNNING."""
    import pytest
    from mlflow import MlflowClient

    from cladapter_core.experiments.compare import compare
    from tiny import tiny_params
    params = tiny_params("stage1.epochs=1", "stage2.epochs=1", "tracking.experiment=compare-runs")
    compare(params, prepared, tmp_path / "cmp", seeds=(0,), methods=["linear", "cla-stage1"], track=True)
    client = MlflowClient()
    exp = client.get_experiment_by_name("compare-runs").experiment_id
    (parent,) = client.search_runs([exp], "tags.`cladapter.compare` != ''")
    assert parent.info.status == "FINISHED" and parent.data.params["compare.budget.epochs"] == "2"
    assert {"summary.md", "compare.csv", "compare.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert sorted(i.tags[0].value for i in client.get_run(parent.info.run_id).inputs.dataset_inputs) == \
        ["test", "train", "val"]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))}
    assert sorted(c.data.params["method"] for c in children) == ["cla-stage1", "linear"]
    for c in children:
        assert c.data.metrics["test_macro_f1"] == pytest.approx(float(rows[c.data.params["method"]]["macro_f1"]))

    from cladapter_core.errors import CLAdapterError
    with pytest.raises(CLAdapterError, match="not a prepared folder"):
        compare(params, tmp_path / "no-such-prepared", tmp_path / "cmp2", seeds=(0,), methods=["linear"], track=True)
    assert not (tmp_path / "cmp2").exists()
    runs = client.search_runs([exp], "tags.`cladapter.compare` != ''")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
