"""Classification metrics, shared by validation during training and by evaluation."""
from __future__ import annotations

import warnings

import numpy as np


def classification_metrics(y_true, probs, num_classes: int | None = None) -> dict[str, float]:
    """Accuracy, macro/weighted precision, recall, F1, the paper's F1 and one-vs-rest ROC AUC.

    Two F1s, because they differ a lot on small data:
    - `macro_f1`: the mean over all `num_classes` classes of each class's F1. Unlike
      scikit-learn's default (`labels=None`: only classes seen in labels or predictions), a
      class absent from both labels and predictions counts here as F1 = 0, as in the paper's
      formula; so a split missing a class scores lower than sklearn's plain macro average.
    - `f1_macro_pr`: 2PR/(P+R) of macro precision P and macro recall R, the "F1" of the
      paper's official code (utils/metric.py); compare with the paper's figures on this one.

    `probs` is (n, C) class probabilities. ROC AUC is NaN when a class is absent from
    `y_true` (it is undefined there), so a tiny validation split never crashes training.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = num_classes or probs.shape[1]
    y_pred = probs.argmax(axis=1)
    labels = list(range(num_classes))
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                     average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
    out["f1_macro_pr"] = f1_of_macro_pr(out["macro_precision"], out["macro_recall"])
    out["roc_auc"] = float("nan")
    present = np.unique(y_true)
    if len(present) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if num_classes == 2:
                    out["roc_auc"] = float(roc_auc_score(y_true, probs[:, 1]))
                elif len(present) == num_classes:
                    p = probs / probs.sum(axis=1, keepdims=True)
                    out["roc_auc"] = float(roc_auc_score(y_true, p, multi_class="ovr", labels=labels))
            except ValueError:
                pass
    return out


def f1_of_macro_pr(precision: float, recall: float) -> float:
    """The paper's F1: harmonic mean of macro precision and macro recall (0 when both are 0)."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def per_class_report(y_true, y_pred, class_names: list[str]) -> dict:
    from sklearn.metrics import classification_report
    return classification_report(y_true, y_pred, labels=list(range(len(class_names))),
                                 target_names=class_names, output_dict=True, zero_division=0)


def confusion(y_true, y_pred, num_classes: int) -> list[list[int]]:
    from sklearn.metrics import confusion_matrix
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes))).tolist()
