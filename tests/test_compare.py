"""`compare`: every method through the same loop, a table over seeds."""
import csv
import json
import statistics
import subprocess
import sys

import pytest
import scipy.stats
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
    order = ["linear", "linear-mean", "full", "lp-ft", "cla-stage1", "cla-sft"]
    # the run order rotates with the seed: no method always runs first on a busy machine
    assert [(r["method"], r["seed"]) for r in rows] == [(m, "0") for m in order] + \
        [(m, "1") for m in order[1:] + order[:1]]
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
    # every row carries its 95 % t interval; the paired comparisons and the verdict end the table
    for r in summary:
        f1s = [float(x["macro_f1"]) for x in rows if x["method"] == r["method"]]
        half = scipy.stats.t.ppf(0.975, 1) * statistics.stdev(f1s) / 2 ** 0.5
        assert (r["macro_f1_ci_low"], r["macro_f1_ci_high"]) == pytest.approx((r["macro_f1_mean"] - half,
                                                                               r["macro_f1_mean"] + half))
    report = json.loads((out / "compare.json").read_text())
    comps = report["comparisons"]
    baselines = [r for r in summary if r["method"] in ("linear", "linear-mean", "full", "lp-ft")]
    assert comps["reference"] == max(baselines, key=lambda r: r["macro_f1_mean"])["method"]
    assert sorted(c["name"] for c in comps["pairs"]) == sorted(set(order) - {comps["reference"]})
    for c in comps["pairs"]:
        assert c["n"] == 2 and c["seeds"] == [0, 1] and c["p_holm"] is None or c["p_holm"] >= c["p"]
        assert c["verdict"] in report["verdict"] and c["verdict"] in proc.stdout
        assert "better" not in c["verdict"] or c["ci_low"] > 0  # no claim beyond the interval
    lines = proc.stdout.splitlines()  # the printed table ends with the verdict, then where it was written
    last = next(i for i, line in enumerate(lines) if "written to" in line)
    assert lines[last - 1].endswith(comps["pairs"][-1]["verdict"])
    assert all(r["scored_stage"] in ("1", "2") for r in rows)
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


def _rows(values: dict) -> list[dict]:
    """compare's per-run rows for {method: [macro_f1 per seed]} (other scores alike)."""
    return [{"method": m, "seed": s, "macro_f1": v, "f1_macro_pr": v, "accuracy": v, "roc_auc": float("nan"),
             "trainable_params": 10, "total_params": 100, "epochs": 2, "tuned": False, "scored_stage": 1,
             "train_seconds": 1.0} for m, vs in values.items() for s, v in enumerate(vs)]


def test_one_seed_prints_no_spread_and_claims_nothing():
    from cladapter_core.experiments.compare import comparisons, format_table, summarise
    rows = _rows({"linear": [0.61], "cla-stage1": [0.74]})
    table = summarise(rows, ["linear", "cla-stage1"])
    stats = comparisons(rows, table)
    text = format_table(table, "test", None, stats)
    assert "±" not in text.split("\n\n")[1].split("\n", 2)[2]  # no ± in any row of the table
    assert "| cla-stage1 | 1 | 0.7400 | 0.7400 | 0.7400 |" in text
    assert table[1]["macro_f1_std"] is None and table[1]["macro_f1_ci_low"] is None
    assert stats["pairs"][0]["verdict"] == "cla-stage1 vs linear: +0.1300 on 1 seed: no interval, nothing established"
    assert text.endswith(stats["pairs"][0]["verdict"])


def test_verdicts_follow_the_interval_paired_on_seeds_with_holm():
    """README's demo numbers, 0.683 ± 0.060 vs 0.737 ± 0.016 over 3 seeds: not significant;
    a consistent gain over 5 seeds is, and Holm adjusts the family of pairs."""
    import scipy.stats as ss
    from cladapter_core.experiments.compare import comparisons, summarise
    rows = _rows({"full": [0.60, 0.62, 0.61, 0.63, 0.60], "cla-sft": [0.683 - 0.06, 0.683, 0.683 + 0.06, 0.62, 0.63],
                  "cla-stage1": [0.65, 0.66, 0.66, 0.67, 0.65], "linear": [0.5, 0.52, 0.5, 0.51, 0.49]})
    methods = ["linear", "full", "cla-stage1", "cla-sft"]
    table = summarise(rows, methods)
    full = [0.60, 0.62, 0.61, 0.63, 0.60]
    half = ss.t.ppf(0.975, 4) * statistics.stdev(full) / 5 ** 0.5
    assert table[1]["macro_f1_ci_low"] == pytest.approx(statistics.mean(full) - half)
    stats = comparisons(rows, table)
    assert stats["reference"] == "full"  # the best baseline
    by = {c["name"]: c for c in stats["pairs"]}
    raw = sorted(c["p"] for c in stats["pairs"])
    assert sorted(c["p_holm"] for c in stats["pairs"]) == pytest.approx(
        [min(1, 3 * raw[0]), max(min(1, 3 * raw[0]), min(1, 2 * raw[1])), max(min(1, 2 * raw[1]), raw[2])])
    assert by["cla-stage1"]["p"] == pytest.approx(ss.ttest_rel([0.65, 0.66, 0.66, 0.67, 0.65], full).pvalue)
    assert by["cla-stage1"]["verdict"].endswith("better with 5 seeds") and by["cla-stage1"]["ci_low"] > 0
    assert by["cla-sft"]["verdict"].endswith("not significant with 5 seeds")
    assert by["linear"]["verdict"].endswith("worse with 5 seeds")
    assert stats["verdict"].splitlines()[1:] == [c["verdict"] for c in stats["pairs"]]


def test_a_staged_method_keeps_the_stage_that_won_on_validation(tmp_path):
    import json as _json
    from cladapter_core.experiments.compare import best_stage

    def stage(n, value, history):
        d = tmp_path / f"s{n}"
        d.mkdir(exist_ok=True)
        (d / "history.json").write_text(_json.dumps(history))
        return (n, d, {"best_epoch": 1, "best_value": value, "select_metric": "macro_f1", "selected_by": "macro_f1"})

    one = stage(1, 0.8, [{"stage": 1, "epoch": 1, "val_loss": 0.5}])
    two = stage(2, 0.7, [{"stage": 1, "epoch": 1, "val_loss": 0.5}, {"stage": 2, "epoch": 1, "val_loss": 0.4}])
    assert best_stage([one, two])[0] == 1
    assert best_stage([one, stage(2, 0.8, _json.loads((two[1] / "history.json").read_text()))])[0] == 2  # tie: stage 2
    assert best_stage([one, stage(2, 0.9, [{"stage": 2, "epoch": 1}])])[0] == 2  # no validation: the last stage


def test_the_lr_grid_is_the_same_log_spaced_factors_for_every_method():
    from cladapter_core.experiments.compare import METHODS, budget, budget_line, lr_factors, method_params
    from tiny import tiny_params
    assert lr_factors(tiny_params()) == [1.0]  # the default: the role lrs alone
    params = tiny_params("compare.lr_grid=3", "compare.lr_span=10", "train.lr=0.01", "stage2.lr_factor=0.1")
    assert lr_factors(params) == [0.1, 1.0, 10.0]
    assert lr_factors(tiny_params("compare.lr_grid=5", "compare.lr_span=100")) == [0.01, 0.1, 1.0, 10.0, 100.0]
    for m in METHODS:  # both role lrs scale together; their ratio stays the params'
        p = method_params(params, m, 0, None, 10.0)
        assert p["train"]["lr"] == pytest.approx(0.1) and p["stage2"]["lr_factor"] == pytest.approx(0.1)
    line = budget_line(budget(params))
    assert "chosen on validation, per seed, from these times 0.1, 1, 10 (the same 3 points" in line


def test_each_method_picks_its_lr_on_validation_from_the_same_grid(prepared, tmp_path):
    """compare.lr_grid 3: every method trains at the three points, the best on validation is
    scored, and compare.json records the grid, each point's validation score and the pick."""
    from cladapter_core.experiments.compare import compare
    from tiny import tiny_params
    params = tiny_params("stage1.epochs=1", "stage2.epochs=1", "train.cache.views=0", "compare.lr_grid=3",
                         "train.lr=0.01")
    compare(params, prepared, tmp_path / "cmp", seeds=(0,), methods=["linear", "cla-sft"], track=False)
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["budget"]["lr_factors"] == [0.1, 1.0, 10.0]
    for r in report["runs"]:
        assert r["lr_grid"] == [0.1, 1.0, 10.0] and len(r["lr_grid_val"]) == 3
        vals = [v if v is not None else float("-inf") for v in r["lr_grid_val"]]
        assert r["lr_factor"] == r["lr_grid"][vals.index(max(vals))]  # the first best on validation
        assert r["head_lr"] == pytest.approx(0.01 * r["lr_factor"])
    assert "lr x (picked)" in (tmp_path / "cmp" / "summary.md").read_text()
