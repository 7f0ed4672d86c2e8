"""Honest experiments: the paper's F1, warm-up cap, NaN-safe selection, equal-budget compare,
cache semantics and the K study, on the real demo digits with the tiny backbone."""
import json
import math
import warnings

import numpy as np
import pytest

from cladapter_core.training import feature_cache as cache
from cladapter_core.experiments.compare import METHODS, PLANS, budget, method_params, train_method
from cladapter_core.errors import CLAdapterError
from cladapter_core.evaluation.metrics import classification_metrics
from cladapter_core.training import Trainer, stage_plan, warmup_steps
from tiny import tiny_params


# -- metrics -----------------------------------------------------------------------------
def test_paper_f1_is_2pr_over_p_plus_r_of_macro_precision_and_recall():
    # Worked by hand: per class (P, R, F1) = (1, 2/3, 0.8), (1/2, 1/2, 1/2), (1/2, 1, 2/3).
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(y_true, np.eye(3)[y_pred])
    P, R = 2 / 3, 13 / 18
    assert m["macro_precision"] == pytest.approx(P) and m["macro_recall"] == pytest.approx(R)
    assert m["f1_macro_pr"] == pytest.approx(2 * P * R / (P + R)) == pytest.approx(468 / 675)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # the mean of per-class F1
    assert abs(m["f1_macro_pr"] - m["macro_f1"]) > 0.03  # why both are reported



def test_a_class_absent_from_labels_and_predictions_counts_as_f1_zero():
    """What metrics.py's docstring says: macro-F1 averages over every class, an absent one as
    0 (the paper's formula), where scikit-learn's plain macro average skips it."""
    from sklearn.metrics import f1_score
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 0])  # class 2 never appears
    m = classification_metrics(y_true, np.eye(3)[y_pred], 3)
    per_class = f1_score(y_true, y_pred, labels=[0, 1], average=None)
    assert m["macro_f1"] == pytest.approx(sum(per_class) / 3)
    assert m["macro_f1"] < f1_score(y_true, y_pred, average="macro")

# -- schedule ----------------------------------------------------------------------------
def test_warmup_is_capped_to_a_fraction_of_the_stage(prepared, tmp_path):
    assert warmup_steps(2, 10, 20, 0.25) == 5  # 2 warm-up epochs in a 2-epoch stage: capped
    assert warmup_steps(1, 10, 80, 0.25) == 10  # short enough: as asked
    params = tiny_params("stage1.epochs=2", "train.warmup_epochs=2", "train.warmup_max_fraction=0.25")
    from cladapter_core.training import train
    s = train(params, prepared, tmp_path / "s1", stage=1, progress=False)
    hist = json.loads((tmp_path / "s1" / "history.json").read_text())
    total = 2 * math.ceil(120 / 16)  # 12 scans x 10 classes, batches of 16
    assert 0 < s["warmup_steps"] <= 0.25 * total
    assert hist[-1]["lr"] < hist[0]["lr"]  # the stage decays instead of warming up throughout


# -- selection ---------------------------------------------------------------------------
def test_nan_never_wins_selection_and_falls_back_to_validation_loss(prepared, tmp_path):
    t = Trainer(tiny_params("train.select_metric=roc_auc"), prepared, tmp_path / "m", stage=1)
    t.model = __import__("torch").nn.Linear(2, 2)
    epochs = [(float("nan"), 0.9), (float("nan"), 0.7), (0.6, 1.5), (float("nan"), 0.1), (0.55, 1.0)]
    chosen = []
    for e, (value, loss) in enumerate(epochs):
        record = {"epoch": e + 1, "val_loss": loss}
        t.state.history.append(record)
        if t.select(e, value):
            chosen.append(e + 1)
    assert chosen == [1, 2, 3]  # NaN epochs rank by loss; a defined value beats any NaN
    assert t.state.best_epoch == 3 and t.state.best_value == 0.6


@pytest.fixture(scope="module")
def prepared_val_missing_a_class(tmp_path_factory):
    """Digits 0-2 with a validation split that has no 2: ROC AUC is undefined there."""
    from cladapter_core.data import make_demo_data, prepare
    root = tmp_path_factory.mktemp("nan_val")
    make_demo_data(root / "digits")
    lines = ["path,label,split"]
    for label in ("0", "1", "2"):
        files = sorted((root / "digits" / label).iterdir())
        lines += [f"{f},{label},train" for f in files[:12]]
        lines += [f"{f},{label},val" for f in files[12:16] if label != "2"]
        lines += [f"{f},{label},test" for f in files[16:20]]
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    prepare(root / "list.csv", root / "prepared", tiny_params())
    return root / "prepared"


def test_a_stage_selected_on_an_undefined_metric_says_so(prepared_val_missing_a_class, tmp_path):
    from cladapter_core.training import train
    params = tiny_params("train.select_metric=roc_auc", "stage1.epochs=3")
    s = train(params, prepared_val_missing_a_class, tmp_path / "m", stage=1, progress=False)
    hist = json.loads((tmp_path / "m" / "history.json").read_text())
    assert all(math.isnan(r["val_roc_auc"]) for r in hist)
    assert all(r["selected_by"] == "neg_loss" for r in hist)
    assert s["selected_by"].startswith("neg_loss") and s["best_value"] is None
    assert s["best_epoch"] == min(hist, key=lambda r: r["val_loss"])["epoch"]


# -- compare -----------------------------------------------------------------------------
def test_every_method_gets_the_same_data_augmentation_seeds_and_epochs():
    params = tiny_params("stage1.epochs=3", "stage2.epochs=2", "train.lr=0.002", "stage2.lr_factor=0.1",
                         "train.cache.views=2")
    b = budget(params)
    assert b == {"epochs": 5, "head_lr": 0.002, "backbone_lr": pytest.approx(0.0002), "lr_factors": [1.0]}
    for seed in (0, 1):
        ps = {m: method_params(params, m, seed) for m in METHODS}
        for m, p in ps.items():
            assert p["seed"] == seed and p["data"] == params["data"]
            assert p["train"]["augment"] == params["train"]["augment"]
            epochs = sum(stage_plan(p, stage, mode)["epochs"] for mode, stage in PLANS[m])
            assert epochs == 5, m
            frozen = p["stage1"]["epochs"] if m != "full" else 0
            # cached views = fresh draws every epoch; one cache (a view per budget epoch) serves all
            assert p["train"]["cache"]["views"] == b["epochs"] >= frozen
            lrs = {stage: stage_plan(p, stage, mode)["lr"] for mode, stage in PLANS[m]}
            if m == "full":
                assert lrs == {1: pytest.approx(0.0002)}  # the backbone's lr, like every stage 2
            elif len(PLANS[m]) == 2:
                assert lrs == {1: pytest.approx(0.002), 2: pytest.approx(0.0002)}
            else:
                assert lrs == {1: pytest.approx(0.002)}


def test_tuned_values_reach_every_method_and_every_row_trains_the_same_epochs():
    """A best-params file applies to every method that has the parameter (num_centers to
    the CLAdapter methods only, as only they have an adapter), or to none: the budget, the
    epochs of every row, comes from the tuned values."""
    params = tiny_params()
    tuned = {"model.num_centers": 30, "train.lr": 0.0123, "stage1.epochs": 7}
    epochs = set()
    for m in METHODS:
        p = method_params(params, m, 0, tuned)
        assert p["train"]["lr"] == 0.0123, m
        epochs.add(sum(stage_plan(p, stage, mode)["epochs"] for mode, stage in PLANS[m]))
    assert epochs == {7 + params["stage2"]["epochs"]}
    untuned = {sum(stage_plan(method_params(params, m, 0), st, mo)["epochs"] for mo, st in PLANS[m])
               for m in METHODS}
    assert untuned == {params["stage1"]["epochs"] + params["stage2"]["epochs"]}


def test_methods_share_a_seeds_cache_and_each_time_counts_the_views_it_reads(prepared, tmp_path):
    """linear (3 frozen epochs) builds the seed's pooled-feature cache of 3 views; lp-ft's
    stage 1 (2 epochs) reads it instead of building its own, and its time carries 2/3 of
    that build: what it would have cost alone. A second grid point counts the cache once."""
    params = tiny_params("train.cache.views=2", "stage1.epochs=2", "stage2.epochs=1")
    cache.clear_memory()
    builds = cache.STATS["builds"]
    lin = train_method(method_params(params, "linear", 0), prepared, tmp_path / "a", "linear", fresh_cache=False)
    assert cache.STATS["builds"] - builds == 2  # the train and the val cache
    lpft = train_method(method_params(params, "lp-ft", 0), prepared, tmp_path / "b", "lp-ft", fresh_cache=False)
    assert cache.STATS["builds"] - builds == 2, "lp-ft built a cache the seed already had"
    assert lin["reads"].keys() == lpft["reads"].keys() and len(lin["reads"]) == 2
    train_key = next(k for k in lin["reads"] if k != lin["summary"]["cache"]["val_key"])
    val_key = lin["summary"]["cache"]["val_key"]
    assert lpft["reads"][train_key] == pytest.approx(lin["reads"][train_key] * 2 / 3, abs=2e-3)
    assert lpft["reads"][val_key] == pytest.approx(lin["reads"][val_key])
    assert lin["seconds"] >= sum(lin["reads"].values()) + lin["summary"]["seconds"]
    assert lpft["seconds"] >= sum(lpft["reads"].values())


# -- cache -------------------------------------------------------------------------------
def test_cache_is_off_by_default_and_warns_when_views_are_reused(prepared, tmp_path):
    from cladapter_core.params import load_params
    assert load_params(None)["train"]["cache"]["views"] is None
    from cladapter_core.training import train
    params = tiny_params("train.cache.views=1", "stage1.epochs=2")
    with pytest.warns(UserWarning, match="1 augmented views for 2 epochs"):
        train(params, prepared, tmp_path / "m", stage=1, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_params("train.cache.views=2", "stage1.epochs=2"), prepared, tmp_path / "m2",
              stage=1, progress=False)
    assert not [w for w in caught if "augmented views" in str(w.message)]


def test_cache_key_follows_file_content_device_and_autocast(prepared):
    import torch
    from cladapter_core.data import ManifestDataset, build_transform
    from cladapter_core.model import build_model
    from cladapter_core.params import model_kwargs
    params = tiny_params()
    model = build_model(num_classes=10, **model_kwargs(params)).set_stage(1)
    ds = ManifestDataset(prepared, "val", build_transform(model.config_dict(), False), in_chans=3)
    key = cache.cache_key(model, ds, 0, 0, "float16", "cpu", None)
    assert cache.cache_key(model, ds, 0, 0, "float16", "cuda", None) != key
    assert cache.cache_key(model, ds, 0, 0, "float16", "cpu", torch.bfloat16) != key
    # touching a file (new mtime, same bytes) keeps the key: files count by their sha256
    path = ds.items[0][0]
    path.touch()
    assert cache.cache_key(model, ds, 0, 0, "float16", "cpu", None) == key


def test_a_cache_that_would_not_fit_in_memory_is_a_clear_error(prepared, tmp_path, monkeypatch):
    from cladapter_core.training import train
    cache.clear_memory()  # not one an earlier test left in this process
    monkeypatch.setattr(cache, "available_memory", lambda: 1000)  # a machine with 1 kB free
    with pytest.raises(CLAdapterError, match=r"would not fit in memory.*train.cache.storage: disk"):
        train(tiny_params("train.cache.views=2"), prepared, tmp_path / "m", stage=1, progress=False)
    assert not (tmp_path / "m").exists()
