"""The data a run used, as MLflow dataset inputs (one per split)."""
from __future__ import annotations

import json
from pathlib import Path

from .. import identity
from ..identity import dataset_name
from .runs import _active_run_id
from .store import errors, redact

# -- the data a run used, as MLflow dataset inputs ------------------------------------------
SPLITS = ("train", "val", "test")
DIGEST_CHARS = 32            # MLflow keeps at most 36 characters of a dataset's digest
SOURCE_TAG = "dataset_uri"   # a pipeline run's dataset location (components.lineage sets it)


def data_inputs(params: dict, prepared_dir: str | Path, splits=SPLITS, source: str | None = None) -> list:
    """The MLflow dataset inputs (``mlflow.entities.DatasetInput``) of the prepared data in
    `prepared_dir`, one per split in `splits` (context = the split): name
    ``<dataset_name>/<split>``, digest the first 32 hex of ``identity.data_hash(prepared_dir)`` (the data's
    identity, the run's ``data_hash`` tag: files by content, labels and split), source `source` or
    ``data.source`` (resolved as MLflow does: ``s3://...`` an S3 source, a path a local
    one), profile: the split's number of files and the number of classes. One dataset per
    split (an empty split is left out): MLflow links a dataset to a run once, with the
    context of its first logging."""
    import warnings as _warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    prepared_dir = Path(prepared_dir)
    manifest = prepared_dir / "manifest.csv"
    digest = identity.data_hash(prepared_dir)[:DIGEST_CHARS]
    where = redact(str(source or (params.get("data") or {}).get("source") or prepared_dir))
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
        origin = resolve_dataset_source(where)
    counts, classes = _split_counts(manifest)
    splits = [split for split in splits if counts.get(split)]  # e.g. no validation split
    return [DatasetInput(Dataset(name=f"{dataset_name(params, prepared_dir)}/{split}", digest=digest,
                                 source_type=origin._get_source_type(), source=origin.to_json(),
                                 profile=json.dumps({"num_files": counts.get(split, 0),
                                                     "num_classes": classes})),
                         tags=[InputTag("mlflow.data.context", split)])
            for split in splits]


def _split_counts(manifest: Path) -> tuple[dict[str, int], int]:
    import csv
    counts: dict[str, int] = {}
    labels = set()
    with open(manifest, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            counts[row.get("split", "")] = counts.get(row.get("split", ""), 0) + 1
            labels.add(row.get("label"))
    return counts, len(labels)


def log_data_inputs(params: dict, prepared_dir: str | Path, splits=SPLITS, *, run_id: str | None = None,
                    source: str | None = None) -> list:
    """Log `data_inputs` into run `run_id` (default: the active run). The source is
    `source`, else the run's ``dataset_uri`` tag (a pipeline run's dataset location), else
    ``data.source``. Returns the inputs logged."""
    client = _client()
    run_id = run_id or _active_run_id("log_data_inputs")
    with errors(f"logging the data of {prepared_dir} as the run's dataset inputs"):
        if source is None:
            source = client.get_run(run_id).data.tags.get(SOURCE_TAG)
        inputs = data_inputs(params, prepared_dir, splits, source)
        client.log_inputs(run_id, datasets=inputs)
    return inputs


def _client():
    from mlflow import MlflowClient
    return MlflowClient()
