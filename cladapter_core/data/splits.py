"""Splitting the items of a dataset: train/val/test (stratified by class, or as a CSV or
k-fold says), few-shot training sets, and leaks (the same pixels in two splits)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from cladapter_core.data.sources import Item
from cladapter_core.errors import DataError


# ---------------------------------------------------------------- splitting


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(n_val, n_test) for a class of n items; at least one of each when the class allows."""
    half_up = lambda x: int(np.floor(x + 0.5))  # noqa: E731 - no banker's rounding
    n_test = half_up(n * test_fraction)
    n_val = half_up(n * val_fraction)
    if test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    if val_fraction > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    while n_val + n_test >= n and (n_val or n_test):  # keep one training item
        if n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _stratified(by_class: dict[str, list[int]], rng, val_fraction, test_fraction, split: dict[int, str]):
    for label in sorted(by_class):
        idx = by_class[label]
        order = [idx[j] for j in rng.permutation(len(idx))]
        n_val, n_test = _split_counts(len(idx), val_fraction, test_fraction)
        for k, i in enumerate(order):
            split[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"


def _group(indices, items: list[Item]) -> dict[str, list[int]]:
    by_class: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        by_class[items[i].label].append(i)
    return by_class


def assign_splits(items: list[Item], dp: dict, seed: int, has_split: bool, has_fold: bool) -> tuple[dict[int, str], dict]:
    """Split index -> 'train'|'val'|'test' (items sorted by rel path), plus how it was done."""
    rng = np.random.RandomState(seed)
    all_idx = list(range(len(items)))
    split: dict[int, str] = {}
    how: dict = {}

    if has_fold:  # folds from the CSV; its split column (if any) only marks test rows
        test = [i for i in all_idx if items[i].split == "test"]
        pool = [i for i in all_idx if items[i].split != "test"]
        if not test and dp["test_fraction"] > 0:
            _stratified(_group(pool, items), rng, 0.0, dp["test_fraction"], split)
            pool = [i for i in pool if split[i] != "test"]
            how["test"] = "held out (test_fraction)"
        else:
            how["test"] = "column"
        for i in test:
            split[i] = "test"
        fold_ids = sorted({items[i].fold for i in pool})
        if dp["folds"] > 1 and dp["folds"] != len(fold_ids):
            raise DataError(
                f"data.folds={dp['folds']} but the CSV fold column holds {len(fold_ids)} fold(s): {fold_ids}"
            )
        if dp["fold"] not in fold_ids:
            raise DataError(f"data.fold={dp['fold']} is not among the CSV's fold ids {fold_ids}")
        for i in pool:
            split[i] = "val" if items[i].fold == dp["fold"] else "train"
        how.update(method="fold column", folds=len(fold_ids), fold=dp["fold"])
        return split, how

    if has_split:
        for i in all_idx:
            split[i] = items[i].split
        present = {s for s in split.values()}
        carve_val = "val" not in present and dp["val_fraction"] > 0
        carve_test = "test" not in present and dp["test_fraction"] > 0
        if carve_val or carve_test:  # e.g. a dataset published as train/test only
            train = [i for i in all_idx if split[i] == "train"]
            _stratified(
                _group(train, items), rng,
                dp["val_fraction"] if carve_val else 0.0,
                dp["test_fraction"] if carve_test else 0.0,
                split,
            )
        how["method"] = "split column"
        carved = [s for s, c in (("val", carve_val), ("test", carve_test)) if c]
        if carved:
            how["carved_from_train"] = carved
    else:
        _stratified(_group(all_idx, items), rng, dp["val_fraction"], dp["test_fraction"], split)
        how["method"] = "stratified"

    if dp["folds"] > 1:  # stratified k-fold over train+val; test stays as split above
        pool = [i for i in all_idx if split[i] != "test"]
        fold_rng = np.random.RandomState(seed + 1)
        counter = 0  # continues across classes so folds get equal sizes
        for label, idx in sorted(_group(pool, items).items()):
            for j in fold_rng.permutation(len(idx)):
                split[idx[j]] = "val" if counter % dp["folds"] == dp["fold"] else "train"
                counter += 1
        how.update(folds=dp["folds"], fold=dp["fold"])
    return split, how


def few_shot(items: list[Item], split: dict[int, str], shots: int, seed: int) -> int:
    """Keep at most `shots` training items per class (seeded); drop the rest. Returns #dropped."""
    rng = np.random.RandomState(seed + 2)
    dropped = 0
    train = [i for i in sorted(split) if split[i] == "train"]
    for label, idx in sorted(_group(train, items).items()):
        if len(idx) <= shots:
            continue
        keep = {idx[j] for j in rng.permutation(len(idx))[:shots]}
        for i in idx:
            if i not in keep:
                del split[i]
                dropped += 1
    return dropped


# ---------------------------------------------------------------- leaks


def find_leaks(items: list[Item], split: dict[int, str], info: list[dict]) -> tuple[list[dict], int]:
    """Identical pixels in more than one split (leaks) and within one split (duplicates)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i in sorted(split):
        groups[info[i]["sha256"]].append(i)
    leaks, duplicates = [], 0
    for sha, idx in sorted(groups.items()):
        if len(idx) < 2:
            continue
        if len({split[i] for i in idx}) > 1:
            leaks.append({
                "sha256": sha,
                "items": [{"path": items[i].rel, "split": split[i], "label": items[i].label} for i in idx],
            })
        else:
            duplicates += len(idx) - 1
    return leaks, duplicates
