"""Evaluation and prediction: real data (the digits demo), a real (briefly trained) model,
metrics checked against independent recomputation, the report opened in a real browser."""
import csv
import json
import os
import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from cladapter_core import DataError, ParamsError, build_model, load_model, save_model
from cladapter_core.data import load_classes, load_inputs, make_demo_data, make_loader, prepare, read_manifest
from cladapter_core.evaluation.evaluate import evaluate, predict
from cladapter_core.params import load_params
from tiny import SMALL

# A class name with markup in it: the report must show it as text, never as HTML.
ODD = '3 <b>x & "q"'  # no slash: it is a folder name
CLASSES = {"0": "0", "1": "1", "2": "2", "3": ODD}
PER_CLASS = 16
TINY = dict(num_centers=4, rank=8, img_size=32, patch_size=8, backbone_kwargs={"depth": 1}, pretrained=False)
HISTORY = [{"stage": s, "epoch": e, "train_loss": 1.5 - 0.1 * i, "val_loss": 1.6 - 0.08 * i,
            "val_accuracy": 0.3 + 0.05 * i, "val_macro_f1": 0.25 + 0.05 * i, "lr": 1e-3, "seconds": 1.0}
           for i, (s, e) in enumerate([(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)])]


def _params(**overrides):
    base = {"data.val_fraction": 0.25, "data.test_fraction": 0.4, "train.batch_size": 16}
    return load_params(None, SMALL + [f"{k}={json.dumps(v)}" for k, v in {**base, **overrides}.items()])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four digit classes, 16 real scans each, prepared into train/val/test."""
    root = tmp_path_factory.mktemp("evaldata")
    demo = make_demo_data(root / "demo")
    src = root / "src"
    for digit, name in CLASSES.items():
        (src / name).mkdir(parents=True)
        for f in sorted((demo / digit).glob("*.png"))[:PER_CLASS]:
            shutil.copy(f, src / name / f.name)
    prepare(src, root / "prepared", _params())
    return {"root": root, "src": src, "prepared": root / "prepared"}


def _fit(model, prepared):
    """Make the head a nearest-class-mean classifier on the training features, so the
    predictions differ between images and classes (an untrained head predicts one class
    everywhere, which would make the checks weak). One forward pass: cheap on 2 cores."""
    loader = make_loader(prepared, "train", model.config_dict(), False, _params())
    feats, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            feats.append(model.features(x))
            labels.append(y)
        f, y = torch.cat(feats), torch.cat(labels)
        means = torch.stack([f[y == c].mean(0) for c in range(model.num_classes)])
        # argmax_c (mu_c . f - |mu_c|^2 / 2) = argmin_c |f - mu_c|
        model.head.weight.copy_(means)
        model.head.bias.copy_(-0.5 * means.square().sum(1))
    return model.eval()


@pytest.fixture(scope="module")
def models(data):
    classes = load_classes(data["prepared"])
    assert classes[-1] == ODD
    torch.manual_seed(0)
    cla = _fit(build_model("vit_tiny_patch16_224", len(classes), class_names=classes, **TINY), data["prepared"])
    lin = build_model("vit_tiny_patch16_224", len(classes), mode="linear", class_names=classes, **TINY)
    root = data["root"]
    return {"cla": save_model(cla, root / "model_cla", extra_files={
                "history.json": HISTORY, "train_summary.json": {"best_epoch": 5, "mode": "cla"}}),
            "linear": save_model(lin, root / "model_linear")}   # no history: curves skipped


@pytest.fixture(scope="module")
def evaluated(data, models):
    out = data["root"] / "eval_cla"
    metrics = evaluate(models["cla"], data["prepared"], out, _params(**{"evaluate.tsne": True}))
    return {"out": out, "metrics": metrics}


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _png(path) -> Image.Image:
    with Image.open(path) as im:
        im.verify()               # structure and CRCs
    im = Image.open(path)
    im.load()
    return im


def _assert_not_blank(im: Image.Image, min_colours=50):
    arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10, "image is (nearly) one flat colour"
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) >= min_colours


# -- evaluate ----------------------------------------------------------------------------
def test_evaluation_directory_files(evaluated):
    out = evaluated["out"]
    for name in ("metrics.json", "classification_report.json", "confusion_matrix.json",
                 "confusion_matrix.png", "curves.png", "predictions.csv", "param_report.json",
                 "report.html", "tsne.png", "plots/confusion.csv"):
        assert (out / name).is_file(), name
    for name in ("confusion_matrix.png", "curves.png", "tsne.png"):
        im = _png(out / name)
        assert im.width >= 300 and im.height >= 200
        _assert_not_blank(im)
    # nothing of the atomic write left behind, and the output readable by others
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert oct(out.stat().st_mode & 0o755) == oct(0o755)


def test_metrics_agree_with_predictions_csv(evaluated, data):
    from sklearn.metrics import accuracy_score, f1_score, precision_score, roc_auc_score
    out, metrics = evaluated["out"], evaluated["metrics"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    assert all(isinstance(v, float) for v in on_disk.values())
    classes = load_classes(data["prepared"])
    rows = _read_csv(out / "predictions.csv")
    manifest = read_manifest(data["prepared"], "test")
    assert [r["path"] for r in rows] == [str(p) for p, _ in manifest]
    assert [r["label"] for r in rows] == [classes[y] for _, y in manifest]
    y_true = [classes.index(r["label"]) for r in rows]
    y_pred = [classes.index(r["predicted"]) for r in rows]
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    assert (probs.argmax(1) == y_pred).all()
    assert len(set(y_pred)) > 1, "the fitted model should not predict one class everywhere"

    assert metrics["n_samples"] == len(rows) == len(manifest)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert metrics["weighted_precision"] == pytest.approx(
        precision_score(y_true, y_pred, average="weighted", zero_division=0))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(y_true, probs, multi_class="ovr"), abs=1e-4)

    cm = json.loads((out / "confusion_matrix.json").read_text())
    assert cm["labels"] == classes
    matrix = np.array(cm["matrix"])
    assert matrix.sum() == len(rows)
    for t, p in zip(y_true, y_pred):
        matrix[t, p] -= 1
    assert not matrix.any(), "confusion matrix differs from the CSV's (true, predicted) pairs"
    dvc_rows = _read_csv(out / "plots" / "confusion.csv")
    assert [(r["actual"], r["predicted"]) for r in dvc_rows] == [(r["label"], r["predicted"]) for r in rows]

    report = json.loads((out / "classification_report.json").read_text())
    assert set(classes) <= set(report)
    assert sum(report[c]["support"] for c in classes) == len(rows)
    assert report["macro avg"]["f1-score"] == pytest.approx(metrics["macro_f1"])


def test_predictions_belong_to_their_files(evaluated, data, models):
    """Each CSV row's probabilities are the model's output for that very file."""
    rows = _read_csv(evaluated["out"] / "predictions.csv")
    model = load_model(models["cla"])
    x, paths = load_inputs([r["path"] for r in rows], model.config_dict())
    with torch.no_grad():
        probs = torch.softmax(model(x), 1).numpy()
    classes = model.class_names
    csv_probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert [str(p) for p in paths] == [r["path"] for r in rows]
    assert np.allclose(probs, csv_probs, atol=1e-5)


def test_param_report_json_holds_the_models_counts_and_what_each_stage_trains(evaluated, models):
    rep = json.loads((evaluated["out"] / "param_report.json").read_text())
    model = load_model(models["cla"])
    assert {k: rep[k] for k in model.param_report()} == model.param_report()
    assert rep["trainable_stage1"] == rep["adapter"] + rep["head"]
    assert rep["trainable_stage2"] == rep["total"] == rep["backbone"] + rep["adapter"] + rep["head"]


def test_linear_mode_tsne_has_one_panel_and_no_history_is_fine(evaluated, data, models):
    out = data["root"] / "eval_linear"
    metrics = evaluate(models["linear"], data["prepared"], out, _params(**{"evaluate.tsne": True}))
    assert metrics["n_samples"] == evaluated["metrics"]["n_samples"]
    assert not (out / "curves.png").exists()
    html = (out / "report.html").read_text()
    assert "no training curves" in html
    # two panels (without / with adapter) vs one: the cla picture is about twice as wide
    w_cla, w_lin = _png(evaluated["out"] / "tsne.png").width, _png(out / "tsne.png").width
    assert w_cla > 1.5 * w_lin


def test_re_evaluation_replaces_the_directory(data, models, tmp_path):
    out = tmp_path / "ev"
    evaluate(models["cla"], data["prepared"], out, _params(**{"evaluate.tsne": True}))
    assert (out / "tsne.png").is_file()
    (out / "stale.txt").write_text("from an older run")
    metrics = evaluate(models["cla"], data["prepared"], out, _params(**{"evaluate.split": "val"}))
    assert not (out / "tsne.png").exists() and not (out / "stale.txt").exists()
    assert metrics["n_samples"] == len(read_manifest(data["prepared"], "val"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"]


def test_class_absent_from_split(data, models, tmp_path):
    """A test split without one class (tiny datasets): ROC AUC is undefined, so it is left
    out of metrics.json (JSON has no NaN) and the report says why; the rest still works."""
    classes = load_classes(data["prepared"])
    lines = ["path,label,split"]
    for i, name in enumerate(classes):
        for j, f in enumerate(sorted((data["src"] / name).glob("*.png"))[:6]):
            split = "train" if j < 3 or name == classes[2] else "test"
            lines.append(f'{f},"{name.replace(chr(34), chr(34) * 2)}",{split}')
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    # the CSV names the images where they are, outside its own folder: allowed explicitly
    prepare(tmp_path / "list.csv", tmp_path / "prepared", _params(**{"data.allow_outside_root": True}))
    assert load_classes(tmp_path / "prepared") == classes
    metrics = evaluate(models["cla"], tmp_path / "prepared", tmp_path / "ev", _params())
    assert "roc_auc" not in metrics and metrics["n_samples"] == 9
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == metrics
    cm = np.array(json.loads((tmp_path / "ev" / "confusion_matrix.json").read_text())["matrix"])
    assert cm.sum() == 9 and cm[2].sum() == 0
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "ROC AUC is undefined here" in html


def test_evaluate_refuses_a_bad_split_and_models_of_other_classes_and_writes_nothing(data, models, tmp_path):
    with pytest.raises(ParamsError, match="evaluate.split"):
        evaluate(models["cla"], data["prepared"], tmp_path / "a", _params(**{"evaluate.split": "dev"}))
    # a model whose classes are not the data's
    other = build_model("vit_tiny_patch16_224", 4, class_names=["a", "b", "c", "d"], **TINY)
    save_model(other, tmp_path / "other")
    with pytest.raises(DataError, match="class names"):
        evaluate(tmp_path / "other", data["prepared"], tmp_path / "b", _params())
    three = build_model("vit_tiny_patch16_224", 3, **TINY)
    save_model(three, tmp_path / "three")
    with pytest.raises(DataError, match="has 4 classes but the model"):
        evaluate(tmp_path / "three", data["prepared"], tmp_path / "c", _params())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# -- predict -----------------------------------------------------------------------------
def test_predict_files_and_folder(evaluated, data, models, tmp_path):
    by_path = {r["path"]: r for r in _read_csv(evaluated["out"] / "predictions.csv")}
    folder = data["src"] / ODD
    some = sorted(by_path)[:3]
    out = tmp_path / "pred" / "p.csv"
    rows = predict(models["cla"], [*some, folder], out, batch_size=5)
    expected = some + [str(p) for p in sorted(folder.glob("*.png")) if str(p) not in some]
    assert [r["path"] for r in rows] == expected           # folder walked, duplicates once
    on_disk = _read_csv(out)
    assert [r["path"] for r in on_disk] == expected
    classes = load_model(models["cla"]).class_names
    assert list(on_disk[0]) == ["path", "predicted"] + [f"prob_{c}" for c in classes]
    for row, disk in zip(rows, on_disk):
        assert row["predicted"] == disk["predicted"] == max(classes, key=lambda c: row[f"prob_{c}"])
        assert sum(row[f"prob_{c}"] for c in classes) == pytest.approx(1.0, abs=1e-5)
    # the same file gets the same probabilities as in evaluation
    for p in some:
        assert [float(on_disk[expected.index(p)][f"prob_{c}"]) for c in classes] == pytest.approx(
            [float(by_path[p][f"prob_{c}"]) for c in classes], abs=1e-5)


def test_predict_bad_inputs(data, models, tmp_path):
    model_dir = models["cla"]
    missing = tmp_path / "nope.png"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        predict(model_dir, [missing], tmp_path / "a.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=re.escape(str(empty))):
        predict(model_dir, [empty], tmp_path / "b.csv")
    with pytest.raises(DataError, match="no inputs"):
        predict(model_dir, [], tmp_path / "c.csv")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    good = next((data["src"] / "1").glob("*.png"))
    with pytest.raises(DataError, match=re.escape(str(broken))):
        predict(model_dir, [good, broken], tmp_path / "d.csv")
    assert not (tmp_path / "d.csv").exists()
    # skip_invalid: the readable file is predicted, the broken one reported
    with pytest.warns(UserWarning, match=re.escape(str(broken))):
        rows = predict(model_dir, [good, broken], tmp_path / "e.csv", skip_invalid=True)
    assert [r["path"] for r in rows] == [str(good)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="no readable input.*" + re.escape(str(broken))):
            predict(model_dir, [broken], tmp_path / "f.csv", skip_invalid=True)
    with pytest.raises(ParamsError, match="batch_size"):
        predict(model_dir, [good], tmp_path / "g.csv", batch_size=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "e.csv", "empty"]


# -- report.html in a real browser -------------------------------------------------------
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def chromium():
    exe = _chromium()
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        # The brief: install Debian's chromium when missing; skip only if that fails.
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=600)
        exe = _chromium()
    if exe is None:
        pytest.skip("no chromium browser and it cannot be installed here (apt-get install -y chromium)")
    return exe


def _browser(exe, tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


class _DomReader(HTMLParser):
    """Cells of the metrics/parameter tables and the images of the dumped DOM."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self.images: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self._row, self._cell = None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "tr" and ("data-metric" in attrs or "data-param" in attrs):
            self._row = attrs.get("data-metric") or attrs.get("data-param")
            self.rows[self._row] = []
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self.rows[self._row].append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell += data


def test_report_renders_in_headless_chromium(chromium, evaluated, tmp_path):
    import base64
    import io
    out, metrics = evaluated["out"], evaluated["metrics"]
    url = (out / "report.html").resolve().as_uri()

    dump = _browser(chromium, tmp_path, "--dump-dom", url)
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = _DomReader()
    dom.feed(dump.stdout)
    for key in ("accuracy", "macro_f1", "macro_precision", "weighted_f1", "roc_auc"):
        assert dom.rows[key][1] == f"{metrics[key]:.4f}", key
    assert dom.rows["n_samples"][1] == f"{int(metrics['n_samples']):,}"
    rep = json.loads((out / "param_report.json").read_text())
    assert dom.rows["adapter"][1] == f"{rep['adapter']:,}"
    assert dom.rows["adapter_overhead_pct"][1] == f"{rep['adapter_overhead_pct']:.2f} %"
    # the odd class name is shown as text, and its markup never became an element
    assert ODD in "".join(dom.text)
    assert "b" not in dom.tags and "script" not in dom.tags
    # three embedded PNGs (confusion, curves, t-SNE): self-contained, valid images
    assert len(dom.images) == 3
    for src in dom.images:
        assert src.startswith("data:image/png;base64,")
        _assert_not_blank(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))

    shot = tmp_path / "report.png"
    res = _browser(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2200", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    im = _png(shot)
    assert im.size == (1280, 2200)
    _assert_not_blank(im, min_colours=500)
    rgb = np.asarray(im.convert("RGB")).astype(int)

    def near(colour, tol=12):
        return int((np.abs(rgb - np.array(colour)).max(axis=2) <= tol).sum())
    # the images were decoded and painted: the confusion colour bar's darkest blue and
    # the curves' stage-2 shading appear on screen (the page's CSS uses neither colour)
    assert near((8, 48, 107)) > 200
    assert near((253, 233, 217), tol=3) > 2000
    shutil.copy(shot, out.parent / "report_screenshot.png")  # for a human to look at
