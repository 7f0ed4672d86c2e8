"""`promote`: the decision on the decision split, with its evidence on the version.

A candidate replaces the champion only when, on the same held-out images, it is better by
more than `register.margin` AND a paired test on both models' per-image predictions
(`register.test`: a bootstrap of the metric over the images, or McNemar on correctness)
says so at `register.confidence`; a champion is never scored on images it was trained or
selected on (registry/evidence.py)."""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from pathlib import Path

from .. import identity, tracking
from ..errors import TrackingError
from . import evidence as ev
from .lock import promotion_lock
from .model_cache import resolve_model
from .versions import CHALLENGER, CHAMPION, METRIC_TAG, STATE_TAG, _alias, _client, _metric_of, _now, register

log = logging.getLogger(__name__)


def promote(params: dict, dry_run: bool = False, *, version: int | str | None = None,
            lock_timeout: float = 120.0, prepared_dir: str | Path | None = None) -> dict:
    """Make the candidate (``version``, default the ``challenger``) the ``champion`` when its
    metric ``params["register"]["metric"]`` on the decision split beats the champion's by
    more than ``params["register"]["margin"]`` and a paired test on both models' per-image
    predictions on the same images (``register.test``) finds it better at
    ``register.confidence``; the first model becomes champion.

    Both values must come from the same evaluation data and split. When the champion was
    measured on other data (another data version, another split, or test metrics of an
    older registration), it is re-evaluated on the candidate's data, the prepared folder
    ``prepared_dir`` (whose manifest must be the candidate's), before deciding; without
    ``prepared_dir`` that is a TrackingError and nothing changes. So is a champion whose
    recorded training (or selection) images overlap the candidate's decision split.

    The decision and its evidence are written on the candidate as tags. ``dry_run=True``
    decides and returns the same answer but writes nothing and takes no lock. Concurrent
    promotions are serialised (``promotion_lock``).

    Returns ``{"model_name", "metric", "margin", "split", "data_hash", "candidate",
    "candidate_value", "champion_before", "champion_value", "champion_reevaluated",
    "champion_after", "decision" ("promoted" | "rejected" | "unchanged"), "reason", "dry_run",
    "test" (the paired test: name, p, images, interval), "overlap_check"}``.
    """
    reg = params["register"]
    name, metric, margin = reg["model_name"], reg["metric"], float(reg["margin"])
    how = {"test": reg.get("test", "bootstrap"), "confidence": float(reg.get("confidence", 0.95))}
    tracking.configure(params)
    client = _client()
    lock = contextlib.nullcontext() if dry_run else promotion_lock(name, lock_timeout)
    with lock as held:
        with tracking.errors(f"reading registered model {name!r}"):
            candidate = _candidate(client, name, version)
            champion = _alias(client, name, CHAMPION)
        champion_value, proof = None, None
        if champion is not None and champion.version != candidate.version:
            champion_value, proof = gather_evidence(candidate, champion, metric, params, prepared_dir, how)
        result = decide(candidate, champion, metric, margin, champion_value=champion_value, evidence=proof)
        result.update(model_name=name, dry_run=dry_run)
        if not dry_run and result["decision"] != "unchanged":
            held.confirm()  # still ours (renewed, not broken by another promoter) before any write
            with tracking.errors(f"writing the promotion of {name!r} v{candidate.version}"):
                _apply(client, name, candidate, champion, result)
    return result


def _candidate(client, name: str, version):
    if version is not None:
        return client.get_model_version(name, str(version))
    candidate = _alias(client, name, CHALLENGER)
    if candidate is None:
        raise TrackingError(f"registered model {name!r} has no {CHALLENGER!r} version: run `register` first")
    return candidate


def _evaluation_of(version) -> tuple[str | None, str | None]:
    return version.tags.get("metric_split"), version.tags.get("eval_data_hash")


def same_evaluation(a, b) -> bool:
    """Were both versions' decision metrics measured on the same data and split?"""
    split, data = _evaluation_of(a)
    return split is not None and data is not None and split != "test" and (split, data) == _evaluation_of(b)


def gather_evidence(candidate, champion, metric: str, params: dict, prepared_dir, how: dict) -> tuple:
    """(the champion's value re-measured on the candidate's images, or None when its own
    tag is from the same data and split; the paired test and the overlap check)."""
    decide(candidate, None, metric, 0.0)  # a half-made or test-split candidate stops here
    cand = ev.predictions_of(candidate, ev.recorded(candidate))
    if cand is None:
        raise TrackingError(f"{candidate.name!r} v{candidate.version} has no per-image predictions on its "
                            f"decision split ({ev.DECISION_ARTIFACT} of run {candidate.run_id}), so no paired "
                            "test is possible: evaluate and register it again with this version of cladapter")
    champ_record = ev.recorded(champion)
    overlap = ev.overlap_check(champion, champ_record, candidate, cand["image"])
    champion_value, champ = None, None
    if same_evaluation(candidate, champion):
        champ = ev.predictions_of(champion, champ_record)
    if champ is None:  # other data, or no recorded predictions: score it on the candidate's images
        champion_value, champ = reevaluate(champion, candidate, metric, params, prepared_dir, predictions=True)
    test = ev.paired_test(cand, champ, metric, how["test"], how["confidence"])
    return champion_value, {**test, "overlap_check": overlap}


def reevaluate(champion, candidate, metric: str, params: dict, prepared_dir, predictions: bool = False):
    """The champion's `metric` on the candidate's evaluation data (its split of `prepared_dir`);
    with `predictions`, (value, its per-image predictions)."""
    from ..distributed import pick_device
    from ..evaluation.evaluate import decision_metrics
    from ..model import load_model
    split, data_hash = _evaluation_of(candidate)
    where = (f"champion v{champion.version} was measured on split {_evaluation_of(champion)[0]!r} of data "
             f"{str(_evaluation_of(champion)[1])[:12]}, the challenger v{candidate.version} on split "
             f"{split!r} of data {str(data_hash)[:12]}")
    if prepared_dir is None:
        raise TrackingError(f"{where}: the two cannot be compared. Pass the challenger's prepared data "
                            "(`cladapter promote --prepared DIR`) to re-evaluate the champion on it first; "
                            f"v{champion.version} stays champion")
    found = identity.data_hash(prepared_dir) if (Path(prepared_dir) / "manifest.csv").is_file() else "no manifest.csv"
    if found != data_hash:
        raise TrackingError(f"{prepared_dir}: not the data the challenger v{candidate.version} was evaluated "
                            f"on (manifest hash {found[:16]} != {str(data_hash)[:16]})")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, _ = resolve_model(f"models:/{champion.name}/{champion.version}", cache_dir=tmp)
        model = load_model(model_dir)
        found = decision_metrics(model, Path(prepared_dir), params, pick_device(), split=split)
    value = found["metrics"].get(metric)
    if value is None or math.isnan(value):
        raise TrackingError(f"champion v{champion.version}: {metric} undefined on the {split} split of "
                            f"{prepared_dir}; cannot compare")
    log.info("promote: %s; champion re-evaluated on the challenger's data: %s=%.4f", where, metric, value)
    return (float(value), found["predictions"]) if predictions else float(value)


def decide(candidate, champion, metric: str, margin: float, champion_value: float | None = None,
           evidence: dict | None = None) -> dict:
    """The promotion decision for two model versions (no side effects). `champion_value`:
    the champion re-evaluated on the candidate's data (else its own tag is used, which
    must come from the same data and split). `evidence`: the paired test on both models'
    per-image predictions (`gather_evidence`), required to replace a champion."""
    if candidate.tags.get(STATE_TAG, "complete") != "complete":
        raise TrackingError(f"{candidate.name!r} v{candidate.version} is a half-made registration "
                            "(cladapter.registration=pending): run `register` again")
    split, data_hash = _evaluation_of(candidate)
    cand_v = _metric_of(candidate, metric)
    if cand_v is None or split in (None, "test"):
        raise TrackingError(f"{candidate.name!r} v{candidate.version} has no {metric!r} on a decision "
                            f"split (tag {METRIC_TAG}{metric}, metric_split {split!r}; test metrics never "
                            "decide): register it again with this version of cladapter")
    out = {"metric": metric, "margin": margin, "split": split, "data_hash": data_hash,
           "candidate": int(candidate.version), "candidate_value": cand_v, "champion_before": None,
           "champion_value": None, "champion_reevaluated": champion_value is not None,
           "test": None, "overlap_check": None}
    if champion is None:
        return {**out, "champion_after": out["candidate"], "decision": "promoted",
                "reason": f"first model: no champion yet ({split} {metric}={cand_v:.4f})"}
    out["champion_before"] = int(champion.version)
    if champion.version == candidate.version:
        return {**out, "champion_value": cand_v, "champion_after": out["candidate"],
                "decision": "unchanged", "reason": f"v{candidate.version} is already the champion"}
    return _compare_with_champion(out, champion, metric, margin, champion_value, evidence)


def _compare_with_champion(out: dict, champion, metric: str, margin: float, champion_value, evidence) -> dict:
    champ_v = champion_value if champion_value is not None else _metric_of(champion, metric)
    if champ_v is None:
        raise TrackingError(
            f"champion {champion.name!r} v{champion.version} has no metric {metric!r} "
            f"(tag {METRIC_TAG}{metric}), so v{out['candidate']} cannot be compared with it; "
            f"v{champion.version} stays champion. Tag it with its metric, or move the alias "
            "by hand if it should go")
    if evidence is None:
        raise TrackingError(f"no paired evidence for v{out['candidate']} against champion v{champion.version}: "
                            "`promote` gathers it (gather_evidence)")
    test = {k: v for k, v in evidence.items() if k != "overlap_check"}
    out.update(champion_value=champ_v, test=test, overlap_check=evidence["overlap_check"])
    cand_v, diff = out["candidate_value"], out["candidate_value"] - champ_v
    on = f"{out['split']} {metric}" + (" (champion re-evaluated on the same data)" if champion_value is not None else "")
    said = f"{on} {cand_v:.4f} vs champion v{champion.version} {champ_v:.4f}: {diff:+.4f}"
    shown = f"{test['test']} on {test['n']} images: p = {test['p']:.3g}"
    if "ci_low" in test:
        shown += f", {100 * test['confidence']:g} % CI [{test['ci_low']:+.4f}, {test['ci_high']:+.4f}]"
    if diff > 0 and diff > margin and test["significant"]:
        return {**out, "champion_after": out["candidate"], "decision": "promoted",
                "reason": f"{said} > margin {margin:g}; {shown} < {1 - test['confidence']:.3g}: better"}
    if diff <= 0:
        why = "not better"
    elif diff <= margin:
        why = f"below margin {margin:g}"
    else:
        why = f"within noise: {shown} >= {1 - test['confidence']:.3g}, not significant"
    return {**out, "champion_after": out["champion_before"], "decision": "rejected", "reason": f"{said}, {why}"}


def _apply(client, name: str, candidate, champion, result: dict) -> None:
    # The alias moves last: a promote killed before it leaves the old champion serving
    # and its rerun decides and writes everything again; killed after it, nothing is left
    # to write (its rerun finds the candidate already champion).
    v = candidate.version
    evidence = {"decision": result["decision"], "reason": result["reason"],
                "compared_with": str(result["champion_before"] or "none"), "metric": result["metric"],
                "split": result["split"], "data_hash": str(result["data_hash"]),
                "candidate_value": repr(result["candidate_value"]),
                "champion_value": repr(result["champion_value"]),
                "champion_reevaluated": str(result["champion_reevaluated"]).lower(), "margin": repr(result["margin"]),
                "time": _now()}
    test = result.get("test")
    if test:  # the paired test's name and numbers, and what the overlap check found
        evidence.update({"test": test["test"], "p_value": repr(test["p"]), "confidence": repr(test["confidence"]),
                         "images": str(test["n"]), "significant": str(test["significant"]).lower(),
                         "overlap_check": str(result["overlap_check"])[:4000]})
        if "ci_low" in test:
            evidence["diff_ci"] = f"[{test['ci_low']!r}, {test['ci_high']!r}]"
    for key, value in evidence.items():
        client.set_model_version_tag(name, v, f"promotion.{key}", value)
    if result["decision"] == "promoted":
        if champion is not None:
            client.set_model_version_tag(name, champion.version, "promotion.replaced_by", str(v))
        client.set_registered_model_alias(name, CHAMPION, v)


def register_and_promote(model_dir, eval_dir, params: dict, *, prepared_dir=None,
                         promote_now: bool | None = None) -> dict:
    """`register`, then `promote` when `promote_now` is true (None: `register.auto_promote`):
    what `cladapter register` and the DVC stage do. {"registration": ..., "promotion": ...}."""
    reg = register(model_dir, eval_dir, params,
                   data_hash=identity.data_hash(prepared_dir) if prepared_dir else None)
    result = {"registration": reg}
    if params["register"]["auto_promote"] if promote_now is None else promote_now:
        result["promotion"] = won = promote(params, prepared_dir=prepared_dir)
        if str(won["champion_after"]) == str(reg["version"]) and CHAMPION not in reg["aliases"]:
            reg["aliases"] = sorted([*reg["aliases"], CHAMPION])
    return result
