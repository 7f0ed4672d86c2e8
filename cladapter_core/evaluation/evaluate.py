"""Evaluation of a saved model on a prepared split, and prediction on new files.

`evaluate` writes the evaluation directory (see docs/ARCHITECTURE.md) atomically:

    metrics.json                flat {name: float}; roc_auc left out where undefined
    classification_report.json  per class precision/recall/F1/support
    confusion_matrix.json       {labels, matrix} (rows: true class, columns: predicted)
    confusion_matrix.png        annotated heatmap
    curves.png                  training curves from the model's history.json (if any)
    predictions.csv             path, label, predicted, prob_<class>...
    param_report.json           parameter counts (model.param_report() + trainable_stage1)
    report.html                 self-contained report (images embedded)
    tsne.png                    features without / with the adapter (evaluate.tsne: true)
    plots/confusion.csv         actual,predicted per sample, for `dvc plots`

`predict` runs a model on files and folders and writes a CSV of class probabilities.
"""
from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import identity
from ..console import tracked
from ..distributed import pick_device
from ..errors import DataError, ParamsError
from ..model import CLAdapterModel, load_model
from ..outputs import atomic_dir, atomic_write, csv_cell, csv_path_cell, write_json
from ..params import checked

TSNE_MAX_POINTS = 2000   # t-SNE is O(n log n) per iteration but slow on 2 CPU cores beyond this
TSNE_MIN_POINTS = 5
TSNE_EXACT_MAX = 500


def _eval_params(params: dict) -> tuple[str, bool, int, str, int]:
    p = checked(params, "seed", "evaluate", "train")
    ev, t = p["evaluate"], p["train"]
    return ev["split"], ev["tsne"], t["batch_size"], t["select_metric"], p["seed"]


@torch.no_grad()
def _run(model: CLAdapterModel, batches, device: torch.device, keep_features: bool):
    """Probabilities for every batch, and (keep_features) pooled features without and
    with the adapter. The forward is split by hand so one pass gives all three; it is
    the same computation as `model(x)`."""
    model.eval().to(device)
    probs, without, with_ = [], [], []
    for x in batches:
        x = x.to(device, non_blocking=True)
        if keep_features:
            out = model.backbone_output(x)           # tokens (cla) or pooled (other modes)
            if model.adapter is not None:
                feats = model.adapter(out).mean(dim=1)
                without.append(out.mean(dim=1).float().cpu())
            else:
                feats = out
            with_.append(feats.float().cpu())
            logits = model.head(feats)
        else:
            logits = model(x)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    cat = lambda xs: torch.cat(xs).numpy() if xs else None  # noqa: E731
    return cat(probs), cat(without), cat(with_)


def _check_classes(model: CLAdapterModel, classes: list[str], model_dir: Path, prepared_dir: Path) -> None:
    if len(classes) != model.num_classes:
        raise DataError(f"{prepared_dir} has {len(classes)} classes but the model in {model_dir} "
                        f"predicts {model.num_classes}")
    if list(model.class_names) != list(classes):
        diff = [f"{i}: data {c!r} vs model {m!r}" for i, (c, m) in enumerate(zip(classes, model.class_names))
                if c != m][:5]
        raise DataError(f"class names of {prepared_dir} (classes.json) differ from the model's in "
                        f"{model_dir} (config.json), so label ids would not mean the same class: "
                        + "; ".join(diff))


def _read_json(path: Path):
    """A JSON file, or None when absent or unreadable (the report then says so)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def tsne_embed(features: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE with a fixed seed; perplexity shrinks for small n (it must stay < n)."""
    from sklearn.manifold import TSNE
    n = len(features)
    perplexity = float(max(1.0, min(30.0, (n - 1) / 3.0)))
    # Exact t-SNE for small n: quicker than Barnes-Hut there (whose OpenMP threads crawl
    # on a busy few-core machine) and no approximation.
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed, method="exact" if n <= TSNE_EXACT_MAX else "barnes_hut")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's FutureWarnings about defaults
        return tsne.fit_transform(np.asarray(features, dtype=np.float32))


def _make_tsne(model, without, with_, labels, class_names, path, seed, notes) -> Path | None:
    from .plots import tsne_png
    n = len(labels)
    if n < TSNE_MIN_POINTS:
        notes.append(f"t-SNE skipped: {n} samples (needs at least {TSNE_MIN_POINTS}).")
        return None
    idx = np.arange(n)
    note = ""
    if n > TSNE_MAX_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(n, TSNE_MAX_POINTS, replace=False))
        note = f"{TSNE_MAX_POINTS} of {n} samples, drawn at random (seed {seed})"
        notes.append(f"t-SNE drawn on {note}.")
    labels = np.asarray(labels)[idx]
    if model.adapter is not None:
        panels = [("without adapter (backbone tokens, mean-pooled)", tsne_embed(without[idx], seed)),
                  (f"with CLAdapter (K = {model.adapter_config.num_centers})", tsne_embed(with_[idx], seed))]
    else:
        panels = [(f"backbone pooled feature ({model.mode} mode)", tsne_embed(with_[idx], seed))]
    return tsne_png(panels, labels, class_names, path, note=note)


def _param_report(model: CLAdapterModel) -> dict:
    report = model.param_report()
    stage = model.stage
    report["trainable_stage1"] = model.set_stage(1).param_report()["trainable"]  # backbone frozen
    report["trainable_stage2"] = model.set_stage(2).param_report()["trainable"]
    model.set_stage(stage)
    return report


def evaluate(model_dir, prepared_dir, out_dir, params: dict, *, device: str | None = None) -> dict:
    """Evaluate the model in `model_dir` on `params['evaluate']['split']` of `prepared_dir`;
    write the evaluation directory `out_dir` atomically and return the metrics."""
    from ..data import load_classes, read_manifest

    model_dir, prepared_dir, out_dir = Path(model_dir), Path(prepared_dir), Path(out_dir)
    split, want_tsne, batch_size, select_metric, seed = _eval_params(params)
    dev = pick_device(device)  # as training: auto ($CLADAPTER_DEVICE), cpu, cuda, cuda:N
    model = load_model(model_dir)
    classes = load_classes(prepared_dir)
    _check_classes(model, classes, model_dir, prepared_dir)
    items = read_manifest(prepared_dir, split)
    if not items:
        raise DataError(f"{prepared_dir}: the {split!r} split is empty (see summary.json counts); "
                        "choose another with evaluate.split")
    y_true, probs, without, with_ = _predict_split(model, prepared_dir, split, params, batch_size,
                                                  dev, want_tsne)
    if len(y_true) != len(items) or any(int(a) != b for a, b in zip(y_true, (lb for _, lb in items))):
        raise DataError(f"{prepared_dir}: the loader's labels do not follow manifest.csv's order "
                        f"for split {split!r}; cannot attribute predictions to files")
    metrics = _split_metrics(y_true, probs, len(classes))
    ev = {"model": model, "model_dir": model_dir, "prepared_dir": prepared_dir, "split": split,
          "classes": classes, "paths": [p for p, _ in items], "y_true": y_true, "probs": probs,
          "select_metric": select_metric, "seed": seed, "metrics": metrics,
          "tsne": (without, with_) if want_tsne else None}
    decision = decision_metrics(model, prepared_dir, params, dev, split, metrics,
                                evaluated_predictions=(y_true, probs.argmax(axis=1)))
    with atomic_dir(out_dir) as tmp:
        _write_evaluation(tmp, ev)
        write_json(tmp / DECISION_FILE, decision)
    return metrics


DECISION_FILE = "decision_metrics.json"


DECISION_SPLIT = "val"


def decision_metrics(model, prepared_dir: Path, params: dict, dev: torch.device,
                     evaluated_split: str | None = None, evaluated: dict | None = None,
                     split: str = DECISION_SPLIT, evaluated_predictions: tuple | None = None) -> dict:
    """Metrics on the validation split, which promotion decides on: the test split is for
    reporting, never for choosing a model. With them, the per-image predictions
    (`predictions`: image ids - the manifest's sha256 -, labels, predicted labels), which
    promotion's paired test compares image by image."""
    from ..data import read_manifest
    y = pred = None
    if split == evaluated_split and evaluated is not None:
        metrics = evaluated
        if evaluated_predictions is not None:
            y, pred = evaluated_predictions
    else:
        if not read_manifest(prepared_dir, split):
            raise DataError(f"{prepared_dir}: the {split!r} split is empty; promotion decides on it: "
                            "prepare the data with data.val_fraction > 0")
        y, probs, _, _ = _predict_split(model, prepared_dir, split, params,
                                        int(params["train"]["batch_size"]), dev, False)
        metrics = _split_metrics(y, probs, model.num_classes)
        pred = probs.argmax(axis=1)
    out = {"split": split, "data_hash": identity.data_hash(prepared_dir), "metrics": metrics}
    if y is not None:
        images = image_ids(prepared_dir, split)
        if len(images) != len(y):
            raise DataError(f"{prepared_dir}: {len(images)} {split} rows in manifest.csv but {len(y)} predictions")
        out["predictions"] = {"image": images, "label": [int(v) for v in y], "predicted": [int(v) for v in pred],
                              "num_classes": int(model.num_classes)}
        # the training images of this data: promotion refuses to score this model, once it
        # is champion, on another data's split that overlaps them
        out["train_images"] = image_ids(prepared_dir, "train")
    return out


def image_ids(prepared_dir: Path, split: str) -> list[str]:
    """Each image of `split` in manifest order, by content (its sha256; the path where the
    manifest has no sha256 column): what makes two models' predictions comparable image by
    image, and a split comparable with another model's training images."""
    with open(Path(prepared_dir) / "manifest.csv", newline="", encoding="utf-8") as fh:
        return [row.get("sha256") or f"path:{row['path']}" for row in csv.DictReader(fh) if row["split"] == split]


def _predict_split(model, prepared_dir: Path, split: str, params: dict, batch_size: int,
                   dev: torch.device, want_tsne: bool):
    """Labels in manifest order, probabilities, and (want_tsne) pooled features."""
    from ..data import make_loader
    loader = make_loader(prepared_dir, split, model.config_dict(), False, params, batch_size=batch_size)
    labels_seen: list[int] = []

    def batches():
        for x, y in tracked(loader, f"evaluate {split}"):
            labels_seen.extend(int(v) for v in y)
            yield x

    probs, without, with_ = _run(model, batches(), dev, keep_features=want_tsne)
    model.cpu()
    return np.asarray(labels_seen, dtype=np.int64), probs, without, with_


def _split_metrics(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> dict:
    from .metrics import classification_metrics
    n = len(y_true)
    metrics = classification_metrics(y_true, probs, num_classes)
    eps = 1e-12  # cross-entropy on the evaluated split, the loss the trainer reports
    metrics["loss"] = float(-np.log(np.clip(probs[np.arange(n), y_true], eps, 1.0)).mean())
    metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}  # JSON has no NaN
    metrics["n_samples"] = float(n)
    return metrics


def _write_evaluation(tmp: Path, ev: dict) -> None:
    """Every file of the evaluation directory, into the (temporary) folder `tmp`."""
    from .metrics import confusion, per_class_report
    from .report import render_report
    model, classes, split = ev["model"], ev["classes"], ev["split"]
    y_true, probs, metrics = ev["y_true"], ev["probs"], ev["metrics"]
    y_pred = probs.argmax(axis=1)
    per_class = per_class_report(y_true, y_pred, classes)
    matrix = confusion(y_true, y_pred, len(classes))
    params_report = _param_report(model)
    train_summary = _read_json(ev["model_dir"] / "train_summary.json")
    notes: list[str] = []
    if "roc_auc" not in metrics:
        notes.append("ROC AUC left out of metrics.json: undefined because some class has no "
                     f"sample in the {split} split.")
    write_json(tmp / "metrics.json", metrics)
    write_json(tmp / "classification_report.json", per_class)
    write_json(tmp / "confusion_matrix.json", {"labels": classes, "matrix": matrix})
    write_json(tmp / "param_report.json", params_report)
    _write_predictions(tmp / "predictions.csv", ev["paths"], y_true, probs, classes)
    (tmp / "plots").mkdir()
    with open(tmp / "plots" / "confusion.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["actual", "predicted"])
        w.writerows((csv_cell(classes[a]), csv_cell(classes[b])) for a, b in zip(y_true, y_pred))
    images = _evaluation_images(tmp, ev, matrix, notes)
    html = render_report(model.config_dict(), metrics, params_report, per_class, images, {
        "split": split, "model_dir": str(ev["model_dir"]), "prepared_dir": str(ev["prepared_dir"]),
        "notes": notes, "train_summary": train_summary if isinstance(train_summary, dict) else None})
    (tmp / "report.html").write_text(html, encoding="utf-8")


def _evaluation_images(tmp: Path, ev: dict, matrix, notes: list[str]) -> dict:
    from .plots import confusion_matrix_png, curves_png
    classes, n = ev["classes"], len(ev["y_true"])
    images = {"confusion": confusion_matrix_png(matrix, classes, tmp / "confusion_matrix.png",
                                                title=f"Confusion matrix ({ev['split']}, n = {n})")}
    history = _read_json(ev["model_dir"] / "history.json")
    images["curves"] = None
    if isinstance(history, list) and history:
        images["curves"] = curves_png(history, tmp / "curves.png", ev["select_metric"])
    else:
        notes.append(f"No usable history.json in {ev['model_dir']}: training curves not drawn.")
    images["tsne"] = None
    if ev["tsne"] is not None:
        without, with_ = ev["tsne"]
        images["tsne"] = _make_tsne(ev["model"], without, with_, ev["y_true"], classes,
                                    tmp / "tsne.png", ev["seed"], notes)
    return images


def _prob_columns(classes: list[str]) -> list[str]:
    return [f"prob_{c}" for c in classes]


def _write_predictions(path: Path, paths, y_true, probs, classes) -> None:
    """predictions.csv; no cell runs as a spreadsheet formula (a class named ``=cmd|...``)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([csv_cell(c) for c in ("path", "label", "predicted", *_prob_columns(classes))])
        for p, t, pr in zip(paths, y_true, probs):
            w.writerow([csv_path_cell(str(p)), csv_cell(classes[int(t)]), csv_cell(classes[int(pr.argmax())]),
                        *(f"{v:.6f}" for v in pr)])


# -- prediction on new files ---------------------------------------------------------------
def predict(model_dir, inputs, out_path, batch_size: int = 32, *, skip_invalid: bool = False,
            device: str | None = None) -> list[dict]:
    """Class probabilities for image files and folders (walked); writes a CSV
    (path, predicted, prob_<class>...) atomically and returns its rows as dicts.

    An unreadable file is a DataError naming it; with skip_invalid it is left out
    with a warning instead (an error still if nothing is readable).
    """
    from ..data import list_inputs, load_inputs
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParamsError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    dev = pick_device(device)  # as training: auto ($CLADAPTER_DEVICE), cpu, cuda, cuda:N
    model = load_model(model_dir)
    config = model.config_dict()
    files = list_inputs(inputs, config)
    model.eval().to(dev)
    classes = model.class_names
    rows: list[dict] = []
    skipped: list[str] = []
    with torch.no_grad():
        for start in tracked(range(0, len(files), batch_size), "predict",
                               total=math.ceil(len(files) / batch_size)):
            chunk = files[start:start + batch_size]
            try:
                x, used = load_inputs(chunk, config)
            except DataError:
                if not skip_invalid:
                    raise
                x, used = _load_each(chunk, config, skipped)
                if x is None:
                    continue
            probs = torch.softmax(model(x.to(dev)).float(), dim=1).cpu().numpy()
            for p, pr in zip(used, probs):
                row = {"path": str(p), "predicted": classes[int(pr.argmax())]}
                row.update({col: float(v) for col, v in zip(_prob_columns(classes), pr)})
                rows.append(row)
    if skipped:
        warnings.warn(f"predict: left out {len(skipped)} unreadable input(s):\n  " + "\n  ".join(skipped))
    if not rows:
        raise DataError("predict: no readable input among " + ", ".join(str(f) for f in files[:10])
                        + (f" and {len(files) - 10} more" if len(files) > 10 else "")
                        + ("\n  " + "\n  ".join(skipped) if skipped else ""))

    atomic_write(out_path, _predictions_csv(rows, classes))
    return rows


def _predictions_csv(rows: list[dict], classes: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "predicted", *_prob_columns(classes)], lineterminator="\r\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else csv_path_cell(v) if k == "path" else csv_cell(v))
                    for k, v in row.items()})
    return buf.getvalue()


def _load_each(chunk, config, skipped: list[str]):
    """Fallback after a batch failed to load: load file by file, recording failures."""
    from ..data import load_inputs
    xs, used = [], []
    for f in chunk:
        try:
            x, u = load_inputs([f], config)
        except DataError as exc:
            skipped.append(str(exc).replace("\n", " "))
            continue
        xs.append(x)
        used += u
    if not xs:
        return None, []
    return torch.cat(xs), used


__all__ = ["evaluate", "predict", "tsne_embed"]
