"""The statistics behind every table and every promotion: what the numbers support.

Over seeds (compare, sweep): mean, sample std and a t-based confidence interval of the
mean; paired differences on shared seeds with a paired t test, Holm's correction over the
pairs of one table, and a verdict line in plain words that never claims more than its
interval. Over images (promotion, `compare --bootstrap`): a paired bootstrap of a metric's
difference between two prediction sets on the same images, and McNemar's exact test on
per-image correctness.

A leaf module: numpy and scipy only.
"""
from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0  # a decision from a resample is the same decision on every rerun


def _defined(values) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def describe(values, confidence: float = CONFIDENCE) -> dict:
    """n, mean, sample std and the t-based confidence interval of the mean of the defined
    values; std and the interval are None for fewer than 2 values (nothing to estimate)."""
    from scipy import stats
    vals = _defined(values)
    n = len(vals)
    out = {"n": n, "mean": float(np.mean(vals)) if vals else float("nan"), "std": None,
           "ci_low": None, "ci_high": None}
    if n >= 2:
        std = float(np.std(vals, ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
        out.update(std=std, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def format_mean(d: dict, digits: int = 4) -> str:
    """'0.7370 ± 0.0160 [0.6973, 0.7767]' (mean ± std [CI]); one value prints alone, no ±."""
    if d["n"] == 0 or math.isnan(d["mean"]):
        return "n/a"
    if d["std"] is None:
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f} [{d['ci_low']:.{digits}f}, {d['ci_high']:.{digits}f}]"


def paired(a: dict, b: dict, confidence: float = CONFIDENCE) -> dict:
    """`a` minus `b` over their shared keys (seeds): mean difference, its t interval and the
    two-sided paired t test's p value (None below 2 shared seeds or when every difference
    is the same: no spread, no test)."""
    from scipy import stats
    keys = sorted(k for k in set(a) & set(b) if _defined([a[k]]) and _defined([b[k]]))
    diffs = [float(a[k]) - float(b[k]) for k in keys]
    d = describe(diffs, confidence)
    p = None
    if len(diffs) >= 2 and d["std"]:
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return {"seeds": keys, "n": len(diffs), "diff": d["mean"], "ci_low": d["ci_low"],
            "ci_high": d["ci_high"], "p": p, "test": "paired t"}


def holm(pvalues: list) -> list:
    """Holm's step-down adjustment of the p values of one family (None stays None)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m, out, running = len(idx), list(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(name: str, ref: str, c: dict, confidence: float = CONFIDENCE, unit: str = "seeds") -> str:
    """One sentence on `name` vs `ref` that says only what the interval and test support."""
    pct = f"{100 * confidence:g} %"
    if c["n"] == 0:
        return f"{name} vs {ref}: no shared {unit}, no comparison"
    head = f"{name} vs {ref}: {c['diff']:+.4f}"
    if c["ci_low"] is None:
        return f"{head} on {c['n']} {unit[:-1] if c['n'] == 1 else unit}: no interval, nothing established"
    head += f", {pct} CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
    p = c.get("p_holm", c.get("p"))
    alpha = 1 - confidence
    if p is None or p >= alpha or c["ci_low"] <= 0 <= c["ci_high"]:
        pv = "" if p is None else f", p = {p:.3g}" + (" (Holm)" if "p_holm" in c else "")
        return f"{head}{pv}: not significant with {c['n']} {unit}"
    word = "better" if c["diff"] > 0 else "worse"
    return f"{head}, p = {p:.3g}" + (" (Holm)" if "p_holm" in c else "") + f": {word} with {c['n']} {unit}"


def compare_to_reference(per_key: dict[str, dict], ref: str, confidence: float = CONFIDENCE,
                         unit: str = "seeds") -> list[dict]:
    """Every entry of `per_key` ({name: {seed: value}}) but `ref` against `ref`, paired on
    shared seeds, Holm-adjusted over the family, each with its verdict line."""
    names = [n for n in per_key if n != ref]
    comps = [{"name": n, "reference": ref, **paired(per_key[n], per_key[ref], confidence)} for n in names]
    for c, p in zip(comps, holm([c["p"] for c in comps])):
        c["p_holm"] = p
        c["verdict"] = verdict(c["name"], ref, c, confidence, unit)
    return comps


# -- over images --------------------------------------------------------------------------
def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Macro-F1 over all `num_classes` classes (an absent class counts 0), as
    evaluation.metrics; numpy only, so that thousands of resamples stay cheap."""
    return float(_f1_rows(np.asarray(y_true)[None, :], np.asarray(y_pred)[None, :], num_classes)[0])


def _f1_rows(y, p, c: int) -> np.ndarray:
    """Macro-F1 of each row of (y, p), both (B, n)."""
    b = y.shape[0]
    cm = np.zeros((b, c * c), dtype=np.int64)
    flat = y * c + p
    for i in range(b):
        cm[i] = np.bincount(flat[i], minlength=c * c)
    cm = cm.reshape(b, c, c)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(axis=2) + cm.sum(axis=1)  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=float), where=denom > 0)
    return f1.mean(axis=1)


def _metric_rows(metric: str, y, p, c: int) -> np.ndarray:
    if metric == "accuracy":
        return (y == p).mean(axis=1)
    if metric == "macro_f1":
        return _f1_rows(y, p, c)
    raise ValueError(f"no per-image resampling for metric {metric!r}: choose accuracy or macro_f1")


IMAGE_METRICS = ("accuracy", "macro_f1")


def bootstrap_paired(y_true, pred_a, pred_b, num_classes: int, metric: str = "macro_f1",
                     confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict:
    """`metric`(a) - `metric`(b) on the same images, resampled with replacement: the observed
    difference, its percentile interval and the one-sided p value of 'a is not better'
    (the share of resamples where the difference is <= 0)."""
    y, a, b = (np.asarray(v, dtype=np.int64) for v in (y_true, pred_a, pred_b))
    if not (len(y) == len(a) == len(b)) or len(y) == 0:
        raise ValueError(f"bootstrap_paired: need one label and two predictions per image, got "
                         f"{len(y)}, {len(a)}, {len(b)}")
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    for start in range(0, samples, 256):  # chunks bound the memory: (chunk, n) indices
        idx = rng.integers(0, len(y), (min(256, samples - start), len(y)))
        ys = y[idx]
        diffs[start:start + len(idx)] = (_metric_rows(metric, ys, a[idx], num_classes)
                                         - _metric_rows(metric, ys, b[idx], num_classes))
    observed = float(_metric_rows(metric, y[None], a[None], num_classes)[0]
                     - _metric_rows(metric, y[None], b[None], num_classes)[0])
    tail = (1 - confidence) / 2
    return {"test": "paired bootstrap", "metric": metric, "n": int(len(y)), "samples": samples,
            "diff": observed, "ci_low": float(np.quantile(diffs, tail)),
            "ci_high": float(np.quantile(diffs, 1 - tail)),
            "p": float((np.sum(diffs <= 0) + 1) / (samples + 1))}


def mcnemar(y_true, pred_a, pred_b) -> dict:
    """McNemar's exact test on per-image correctness: among the images exactly one model
    gets right, is `a` right more often than chance? One-sided p of 'a is not better'."""
    from scipy import stats
    y, a, b = (np.asarray(v) for v in (y_true, pred_a, pred_b))
    ra, rb = a == y, b == y
    only_a, only_b = int(np.sum(ra & ~rb)), int(np.sum(rb & ~ra))
    n = only_a + only_b
    p = float(stats.binomtest(only_a, n, 0.5, alternative="greater").pvalue) if n else 1.0
    return {"test": "McNemar exact", "metric": "accuracy", "n": int(len(y)), "only_a_right": only_a,
            "only_b_right": only_b, "diff": float(ra.mean() - rb.mean()), "p": p}


def bootstrap_over_images(labels, preds_a: dict, preds_b: dict, num_classes: int, metric: str = "macro_f1",
                          confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """The mean over shared seeds of `metric`(a) - `metric`(b), with the test images
    resampled (the same resample for every seed): the uncertainty a different test set
    would bring, which seeds alone do not show. preds_*: {seed: predicted labels}."""
    seeds = sorted(set(preds_a) & set(preds_b))
    y = np.asarray(labels, dtype=np.int64)
    if not seeds or len(y) == 0:
        return {"test": "bootstrap over images", "n": 0, "diff": float("nan"), "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(y), (samples, len(y)))
    total = np.zeros(samples)
    observed = 0.0
    for s in seeds:
        a, b = np.asarray(preds_a[s], dtype=np.int64), np.asarray(preds_b[s], dtype=np.int64)
        total += _metric_rows(metric, y[idx], a[idx], num_classes) - _metric_rows(metric, y[idx], b[idx], num_classes)
        observed += _metric_rows(metric, y[None], a[None], num_classes)[0] - _metric_rows(metric, y[None], b[None], num_classes)[0]
    total /= len(seeds)
    tail = (1 - confidence) / 2
    return {"test": "bootstrap over images", "images": int(len(y)), "samples": samples, "seeds": seeds,
            "diff": float(observed / len(seeds)), "ci_low": float(np.quantile(total, tail)),
            "ci_high": float(np.quantile(total, 1 - tail))}
