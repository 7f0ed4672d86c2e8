"""MLflow tracking: where runs go, how the runs of one pipeline execution are grouped,
what each stage logs, and the trained model as an MLflow pyfunc.

Where runs go
    ``MLFLOW_TRACKING_URI`` when set (an ``mlflow server``: ``http://host:5000``; its
    artifacts may be proxied by the server or live on S3, for which the usual
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``MLFLOW_S3_ENDPOINT_URL`` apply),
    else the embedded store ``sqlite:///mlflow.db`` in the working directory, with
    artifacts in ``./mlruns``. The experiment is ``params["tracking"]["experiment"]``, by
    default (null) one per dataset: ``cladapter-<name of data.source's folder>``; it is
    tagged as model training (``mlflow.experimentKind``), so the MLflow 3 UI opens it in
    the model-training view. Commands that only read (``lineage``, ``promote``, a
    ``models:/`` URI given to ``predict``/``evaluate``/``serve``) refuse a store that does
    not exist instead of creating an empty one (``check_tracking(existing=True)``).
    With a server whose artifacts go to S3, MLflow 3 clients
    download artifacts through presigned S3 URLs, so they must reach the S3 endpoint the
    server signs for; where they cannot, set ``MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false``
    to stream through the server.

Grouping across processes
    Under ``dvc repro`` every stage is its own process, so the stages cannot share an
    in-memory parent run. Each stage run is a child (``mlflow.parentRunId``) of a parent
    run found by the tag ``cladapter.pipeline_id``: ``$CLADAPTER_PIPELINE_ID`` when set
    (the KFP pipeline sets its run id), else a hash of the git commit, the resolved
    params and the data's hash, which is the same for every stage of one ``dvc repro``.
    The first stage creates the parent. Two stages starting at the same moment may both
    create one; both then keep the oldest and the other is deleted.

What a run is called and what data it used
    Stage runs are named for what ran (``run_name``: stage, mode, backbone, K, dataset,
    e.g. ``stage1 vit_small_patch16_224 K=20 demo``); the ``stage`` tag keeps the stage's
    id (``train_stage1``). Training and evaluation runs log their data as MLflow dataset
    inputs (``log_data_inputs``): one per split used (context ``train``/``val``/``test``),
    named ``<dataset>/<split>``, digest = the prepared data's hash
    (``identity.data_hash``), source = where the data lives
    (``data.source``, or the dataset URI of a pipeline run), so the UI's Dataset column
    shows them.

Secrets
    No credential reaches the store: every parameter, tag, run name and params file that
    the platform logs goes through ``redact`` / ``redact_params`` (the password of
    ``scheme://user:password@host``, secret query parameters such as ``password=``,
    ``token=``, ``X-Amz-Signature=``). Only what is logged is redacted; the values the
    stages run with (an Optuna storage URL they connect to) are untouched.

Failure policy
    Problems a user can fix (unreachable server, bad credentials, missing files) raise
    ``TrackingError`` naming the URI or path (`errors` wraps the MLflow calls). Per-epoch
    logging from the trainer callback never stops training: a failed write is kept and
    retried at the next epoch; values still unsent when training ends fail the stage with
    a ``TrackingError``.
"""
from __future__ import annotations

from .artifacts import log_artifacts_dir, log_evaluation, log_model, save_pyfunc
from .datasets import SOURCE_TAG, SPLITS, data_inputs, log_data_inputs
from .epoch_logger import EpochLogger
from .runs import is_ours, outer_run, pipeline_id, pipeline_parent, run_tags, start_run_here, stage_run
from .store import (CHECK_TIMEOUT_S, DEFAULT_EXPERIMENT, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MODEL_ARTIFACT,
                    PIPELINE_ENV, PIPELINE_TAG, ROLE_TAG, check_store_exists, check_tracking, configure,
                    errors, experiment_name, local_store_path, redact, redact_params, run_name, tracking_uri)
from .store import _redact  # noqa: F401  (the old name of `redact`)

__all__ = ["CHECK_TIMEOUT_S", "DEFAULT_EXPERIMENT", "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "EpochLogger",
           "MODEL_ARTIFACT", "PIPELINE_ENV", "PIPELINE_TAG", "ROLE_TAG", "SOURCE_TAG", "SPLITS",
           "check_store_exists", "check_tracking", "configure", "data_inputs", "errors", "experiment_name",
           "local_store_path", "log_artifacts_dir", "log_data_inputs", "log_evaluation", "log_model",
           "is_ours", "outer_run", "pipeline_id", "pipeline_parent", "redact", "redact_params", "run_name",
           "run_tags", "save_pyfunc", "stage_run", "start_run_here", "tracking_uri"]
