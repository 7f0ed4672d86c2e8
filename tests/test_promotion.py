"""Promotion a reviewer would sign: decided on the validation split, never on test; a champion
measured on other data is re-evaluated on the challenger's data before it can be replaced."""
import copy

import numpy as np
import pytest
from PIL import Image

from cladapter_core import registry
from cladapter_core.errors import TrackingError
from cladapter_core.evaluation.evaluate import evaluate
from cladapter_core.identity import data_hash
from fixtures_services import CLASS_NAMES, tracked_params, write_metrics


def _champion(name):
    from mlflow import MlflowClient
    try:
        return int(MlflowClient().get_model_version_by_alias(name, "champion").version)
    except Exception:
        return None


@pytest.fixture(scope="module")
def prepared_cats(tmp_path_factory):
    """A small real prepared dataset with the tiny models' classes (cat, dog, owl)."""
    from cladapter_core.data import prepare
    from cladapter_core.params import load_params
    root = tmp_path_factory.mktemp("cats")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASS_NAMES):
        (root / "src" / name).mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            img[..., c] = 255  # a class is a colour channel
            Image.fromarray(img).save(root / "src" / name / f"{i}.png")
    prepare(root / "src", root / "prepared", load_params(None, ["data.val_fraction=0.3",
                                                                "data.test_fraction=0.2"]))
    return root / "prepared"


def test_test_metrics_never_decide(embedded_mlflow, tiny_model_dirs, tmp_path):
    name = "promo-test-split"
    params = tracked_params(name)
    ev = write_metrics(tmp_path / "e0", decision_split="test", macro_f1=0.9)
    registry.register(tiny_model_dirs[0], ev, params)
    with pytest.raises(TrackingError, match="test metrics never decide"):
        registry.promote(params)
    assert _champion(name) is None
    # A challenger whose test score is far higher but whose validation score is lower loses.
    registry.register(tiny_model_dirs[1], write_metrics(tmp_path / "e1", macro_f1=0.7), params, )
    assert registry.promote(params)["decision"] == "promoted"
    ev2 = write_metrics(tmp_path / "e2", macro_f1=0.6)
    (ev2 / "metrics.json").write_text('{"macro_f1": 0.99}')  # the reported (test) split
    registry.register(tiny_model_dirs[2], ev2, params)
    res = registry.promote(params)
    assert (res["decision"], res["split"], res["candidate_value"]) == ("rejected", "val", 0.6)
    assert _champion(name) == 2


def test_a_champion_from_other_data_is_reevaluated_before_it_can_be_replaced(
        embedded_mlflow, tiny_model_dirs, prepared_cats, tmp_path):
    from mlflow import MlflowClient
    name = "promo-other-data"
    params = tracked_params(name)
    registry.register(tiny_model_dirs[0], write_metrics(tmp_path / "old", data_hash="data-v1",
                                                        macro_f1=0.99), params)
    assert registry.promote(params)["decision"] == "promoted"
    # The challenger is evaluated on data v2 (the real prepared folder); the champion's 0.99
    # was on v1, so the numbers cannot be compared as they are.
    v2 = data_hash(prepared_cats)
    on_v2 = copy.deepcopy(params)
    on_v2["evaluate"]["split"] = "val"
    mine = evaluate(tiny_model_dirs[1], prepared_cats, tmp_path / "new", on_v2)["macro_f1"]
    registry.register(tiny_model_dirs[1], tmp_path / "new", params)
    with pytest.raises(TrackingError, match="cannot be compared.*--prepared"):
        registry.promote(params)
    assert _champion(name) == 1
    with pytest.raises(TrackingError, match="not the data the challenger"):
        registry.promote(params, prepared_dir=tmp_path)  # any other folder is refused
    (tmp_path / "manifest.csv").write_text("path,label,split,sha256\n")
    with pytest.raises(TrackingError, match="not the data the challenger"):
        registry.promote(params, prepared_dir=tmp_path)
    res = registry.promote(params, prepared_dir=prepared_cats)
    assert res["champion_reevaluated"] and res["champion_value"] != 0.99  # measured again, on v2
    # ... as `evaluate` scores the champion's folder on v2's validation split
    assert res["champion_value"] == pytest.approx(
        evaluate(tiny_model_dirs[0], prepared_cats, tmp_path / "v1-on-v2", on_v2)["macro_f1"])
    assert res["candidate_value"] == pytest.approx(mine)
    # the same images for both: a paired test decides with the margin (random tiny models: a
    # handful of validation images cannot show one is better)
    assert res["test"]["n"] == len(rows_of(prepared_cats, "val"))
    assert res["decision"] == ("promoted" if mine > res["champion_value"] and res["test"]["significant"]
                               else "rejected")
    # evaluate records what promotion pairs: per-image predictions on the decision split, by
    # content, and the training images of the same data
    import csv
    import json
    rec = json.loads((tmp_path / "v1-on-v2" / "decision_metrics.json").read_text())
    rows = list(csv.DictReader(open(prepared_cats / "manifest.csv")))
    assert rec["predictions"]["image"] == [r["sha256"] for r in rows if r["split"] == "val"]
    assert rec["predictions"]["label"] == [int(r["label"]) for r in rows if r["split"] == "val"]
    assert rec["train_images"] == [r["sha256"] for r in rows if r["split"] == "train"]
    assert len(rec["predictions"]["predicted"]) == len(rec["predictions"]["image"])
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["promotion.champion_reevaluated"] == "true"
    assert tags["promotion.data_hash"] == v2 and tags["promotion.split"] == "val"
    assert float(tags["promotion.champion_value"]) == pytest.approx(res["champion_value"])


# -- evidence: a paired test on the same images, no champion scored on its training images --
def _version(v, **tags):
    from types import SimpleNamespace
    base = {"cladapter.registration": "complete", "metric_split": "val", "eval_data_hash": "data-v1"}
    return SimpleNamespace(name="m", version=str(v), run_id=None, tags={**base, **tags})


def test_a_candidate_within_noise_is_not_promoted_and_a_clearly_better_one_is():
    """The real decision code on constructed prediction sets of 200 images: +0.02 (right on
    20 images the champion misses, wrong on 16 it gets) passes margin 0 but not the paired
    test; +0.15 (30 more right, none fewer) passes both."""
    from cladapter_core.registry.evidence import paired_test
    from fixtures_services import synthetic_predictions
    champ = synthetic_predictions(0.70)  # right on images 0..139
    noisy = dict(champ, predicted=list(champ["predicted"]))
    for i in range(16):  # now wrong on 16 of the champion's right ones ...
        noisy["predicted"][i] = (champ["label"][i] + 1) % 3
    for i in range(140, 160):  # ... and right on 20 of its wrong ones
        noisy["predicted"][i] = champ["label"][i]
    for score, test, expected in ((0.72, "bootstrap", "rejected"), (0.72, "mcnemar", "rejected"),
                                  (0.85, "bootstrap", "promoted"), (0.85, "mcnemar", "promoted")):
        cand = noisy if score == 0.72 else synthetic_predictions(score)
        proof = {**paired_test(cand, champ, "accuracy", test, 0.95), "overlap_check": "same data"}
        res = registry.decide(_version(2, **{"metric.accuracy": repr(score)}),
                              _version(1, **{"metric.accuracy": "0.7"}), "accuracy", 0.0, evidence=proof)
        assert res["decision"] == expected, (score, test, res["reason"])
        assert res["test"]["n"] == 200 and res["test"]["p"] == proof["p"]
        if expected == "rejected":
            assert "within noise" in res["reason"] and "not significant" in res["reason"]
        else:
            assert res["test"]["p"] < 0.05 and res["reason"].endswith("better")
    # a margin bigger than the difference rejects even a significant one
    proof = {**paired_test(synthetic_predictions(0.85), champ, "macro_f1", "bootstrap", 0.95), "overlap_check": ""}
    assert proof["ci_low"] > 0
    res = registry.decide(_version(2, **{"metric.macro_f1": "0.85"}), _version(1, **{"metric.macro_f1": "0.7"}),
                          "macro_f1", 0.2, evidence=proof)
    assert res["decision"] == "rejected" and "below margin 0.2" in res["reason"]
    # predictions on other images cannot be paired
    other = dict(champ, image=[f"x{i}" for i in range(200)])
    with pytest.raises(TrackingError, match="not on the same images"):
        paired_test(synthetic_predictions(0.85), other, "accuracy", "bootstrap", 0.95)


def test_a_champion_is_never_scored_on_its_own_training_images():
    from cladapter_core.registry.evidence import overlap_check
    images = [f"img{i:04d}" for i in range(50)]
    cand = _version(2, eval_data_hash="data-B")
    champ = _version(1, data_hash="data-A", eval_data_hash="data-A")
    record = {"train_images": ["img0007", "img0031", "other"], "predictions": {"image": ["img0049", "x"]}}
    with pytest.raises(TrackingError, match=r"overlaps the images champion v1 was trained or selected on.*"
                                            r"2 in its train split.*1 in its val split.*v1 stays champion"):
        overlap_check(champ, record, cand, images)
    clean = {"train_images": ["a", "b"], "predictions": {"image": ["c"]}}
    assert overlap_check(champ, clean, cand, images).startswith("checked: none of the 50")
    # trained on other data whose images are not recorded: cannot be shown, refused
    with pytest.raises(TrackingError, match="training images are not recorded"):
        overlap_check(champ, None, cand, images)
    # the same data: the decision split is disjoint from the training split by construction
    assert overlap_check(_version(1, data_hash="data-B"), None, cand, images).startswith("same data")


def test_promote_records_the_test_and_refuses_an_overlapping_split(embedded_mlflow, tiny_model_dirs, tmp_path):
    """Through `promote` and the registry: a +0.005 challenger (one image) stays out, a +0.2 one gets in,
    each with its test on the version; a champion trained on a split's images is refused."""
    import json
    from mlflow import MlflowClient

    from fixtures_services import synthetic_predictions
    name = "promo-evidence"
    params = tracked_params(name)
    registry.register(tiny_model_dirs[0], write_metrics(tmp_path / "a", macro_f1=0.70), params)
    assert registry.promote(params)["decision"] == "promoted"
    registry.register(tiny_model_dirs[1], write_metrics(tmp_path / "b", macro_f1=0.705), params)
    near = registry.promote(params)
    assert (near["decision"], _champion(name)) == ("rejected", 1) and "not significant" in near["reason"]
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["promotion.test"] == "paired bootstrap" and tags["promotion.significant"] == "false"
    assert float(tags["promotion.p_value"]) >= 0.05 and tags["promotion.images"] == "200"
    registry.register(tiny_model_dirs[2], write_metrics(tmp_path / "c", macro_f1=0.90), params)
    far = registry.promote(params)
    assert (far["decision"], _champion(name)) == ("promoted", 3)
    tags = MlflowClient().get_model_version(name, "3").tags
    assert float(tags["promotion.p_value"]) < 0.05 and tags["promotion.confidence"] == "0.95"
    assert tags["promotion.overlap_check"].startswith("not checked")  # registered without its data

    # A champion trained on data A (its training images recorded by evaluate) and a
    # challenger scored on a re-split B whose validation images include some of them.
    name = "promo-overlap"
    params = tracked_params(name)
    champ_eval = write_metrics(tmp_path / "A", data_hash="data-A", macro_f1=0.70)
    record = json.loads((champ_eval / "decision_metrics.json").read_text())
    record["train_images"] = ["img0003", "img0150", "elsewhere"]
    record["predictions"]["image"] = [f"a{i}" for i in range(200)]
    (champ_eval / "decision_metrics.json").write_text(json.dumps(record))
    registry.register(tiny_model_dirs[0], champ_eval, params, data_hash="data-A")
    registry.promote(params)
    registry.register(tiny_model_dirs[1], write_metrics(tmp_path / "B", data_hash="data-B", macro_f1=0.95),
                      params, data_hash="data-B")
    with pytest.raises(TrackingError, match=r"overlaps the images champion v1 was trained.*2 in its train split"):
        registry.promote(params)
    assert _champion(name) == 1
    assert "promotion.decision" not in MlflowClient().get_model_version(name, "2").tags


def rows_of(prepared, split):
    import csv
    return [r for r in csv.DictReader(open(prepared / "manifest.csv")) if r["split"] == split]
