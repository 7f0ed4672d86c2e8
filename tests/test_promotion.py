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
    registry.register(tiny_model_dirs[1], write_metrics(tmp_path / "new", data_hash=v2, macro_f1=0.5),
                      params)
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
    on_v2 = copy.deepcopy(params)
    on_v2["evaluate"]["split"] = "val"
    assert res["champion_value"] == pytest.approx(
        evaluate(tiny_model_dirs[0], prepared_cats, tmp_path / "v1-on-v2", on_v2)["macro_f1"])
    assert res["decision"] == ("promoted" if 0.5 > res["champion_value"] else "rejected")
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["promotion.champion_reevaluated"] == "true"
    assert tags["promotion.data_hash"] == v2 and tags["promotion.split"] == "val"
    assert float(tags["promotion.champion_value"]) == pytest.approx(res["champion_value"])
