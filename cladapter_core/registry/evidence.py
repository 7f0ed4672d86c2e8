"""The evidence a promotion rests on: both models' predictions on the same images, a paired
test on them, and the proof that the champion is not scored on its own training images.

`evaluate` records, in `decision_metrics.json` (logged by `register` under the version's
run as `evaluation/decision_metrics.json`), the per-image predictions on the decision split
(`predictions`: image ids - the manifest's sha256 -, labels, predicted labels) and the ids
of the training split of the same data (`train_images`). Promotion reads both versions'
files; a champion measured on other data is re-scored on the candidate's images first.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from ..errors import TrackingError
from ..evaluation import statistics as st

log = logging.getLogger(__name__)

DECISION_ARTIFACT = "evaluation/decision_metrics.json"
UNKNOWN = (None, "", "unknown")


def recorded(version) -> dict | None:
    """The version's recorded decision file (`evaluation/decision_metrics.json` of its run),
    or None when its run has none (a registration by an older cladapter)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    if not version.run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=DECISION_ARTIFACT,
                                                       dst_path=tmp)
        except (MlflowException, OSError) as e:
            log.info("promote: v%s has no %s (%s)", version.version, DECISION_ARTIFACT, e)
            return None
        try:
            return json.loads(Path(path).read_text())
        except ValueError as e:
            raise TrackingError(f"v{version.version}: {DECISION_ARTIFACT} of run {version.run_id} is not "
                                f"valid JSON ({e})") from e


def predictions_of(version, record: dict | None) -> dict | None:
    """The per-image predictions of a record, checked against the version's tags (the same
    split and data the decision metric was measured on)."""
    if not record or not isinstance(record.get("predictions"), dict):
        return None
    pred = record["predictions"]
    if (record.get("split"), record.get("data_hash")) != (version.tags.get("metric_split"),
                                                          version.tags.get("eval_data_hash")):
        raise TrackingError(f"v{version.version}: {DECISION_ARTIFACT} is for split {record.get('split')!r} of "
                            f"data {str(record.get('data_hash'))[:12]}, its tags say "
                            f"{version.tags.get('metric_split')!r} of {str(version.tags.get('eval_data_hash'))[:12]}")
    n = len(pred.get("image", []))
    if not n or len(pred.get("label", [])) != n or len(pred.get("predicted", [])) != n:
        raise TrackingError(f"v{version.version}: {DECISION_ARTIFACT} holds no usable per-image predictions")
    return pred


def overlap_check(champion, champion_record: dict | None, candidate, images: list[str]) -> str:
    """Refuse (TrackingError) when the champion would be scored on images it was trained or
    selected on; return what was checked, in words (recorded on the version)."""
    trained_on = champion.tags.get("data_hash")
    if trained_on not in UNKNOWN and trained_on == candidate.tags.get("eval_data_hash"):
        return "same data: the decision split is disjoint from the champion's training split"
    known = (trained_on not in UNKNOWN and trained_on == champion.tags.get("eval_data_hash")
             and champion_record and isinstance(champion_record.get("train_images"), list))
    if not known:
        if trained_on in UNKNOWN:
            log.warning("promote: champion v%s's training data is not recorded (no data_hash tag): "
                        "overlap with its training images cannot be checked", champion.version)
            return "not checked: the champion's training data is not recorded (registered without --prepared)"
        raise TrackingError(
            f"champion v{champion.version} was trained on data {trained_on[:12]}, the challenger "
            f"v{candidate.version} is scored on data {str(candidate.tags.get('eval_data_hash'))[:12]}, and the "
            f"champion's training images are not recorded ({DECISION_ARTIFACT} with train_images): it cannot "
            "be shown that the champion is not scored on its own training images; "
            f"v{champion.version} stays champion")
    seen = {"train": set(champion_record["train_images"]),
            "val": set((champion_record.get("predictions") or {}).get("image", []))}
    mine = set(images)
    hits = {split: sorted(ids & mine) for split, ids in seen.items() if ids & mine}
    if hits:
        what = "; ".join(f"{len(ids)} in its {split} split (e.g. {', '.join(i[:12] for i in ids[:3])})"
                         for split, ids in hits.items())
        raise TrackingError(
            f"the {candidate.tags.get('metric_split')} split of data {str(candidate.tags.get('eval_data_hash'))[:12]} "
            f"(challenger v{candidate.version}) overlaps the images champion v{champion.version} was trained "
            f"or selected on (data {trained_on[:12]}): {what} of {len(mine)} images. Scoring the champion "
            "there would flatter it; decide on a split neither model saw. "
            f"v{champion.version} stays champion")
    return (f"checked: none of the {len(mine)} decision images is among the champion's "
            f"{len(seen['train'])} training or {len(seen['val'])} validation images")


def paired_test(cand: dict, champ: dict, metric: str, test: str, confidence: float) -> dict:
    """The paired test of 'the candidate is better' on the same images (same order, same
    labels): a bootstrap of `metric` (or McNemar on correctness)."""
    if list(cand["image"]) != list(champ["image"]) or list(cand["label"]) != list(champ["label"]):
        raise TrackingError("the candidate's and the champion's predictions are not on the same images "
                            "with the same labels: no paired test")
    if test == "mcnemar":
        out = st.mcnemar(cand["label"], cand["predicted"], champ["predicted"])
    elif metric in st.IMAGE_METRICS:
        out = st.bootstrap_paired(cand["label"], cand["predicted"], champ["predicted"],
                                  int(cand.get("num_classes") or 1 + max(cand["label"] + cand["predicted"]
                                                                         + champ["predicted"])),
                                  metric, confidence)
    else:  # a metric that per-image labels cannot resample (roc_auc, loss): correctness
        out = {**st.mcnemar(cand["label"], cand["predicted"], champ["predicted"]),
               "note": f"{metric} cannot be resampled from predicted labels; McNemar on correctness instead"}
    out["confidence"] = confidence
    out["significant"] = out["p"] < 1 - confidence
    return out
