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

Failure policy
    Problems a user can fix (unreachable server, bad credentials, missing files) raise
    ``TrackingError`` naming the URI or path (`errors` wraps the MLflow calls). Per-epoch
    logging from the trainer callback never stops training: a failed write is kept and
    retried at the next epoch; values still unsent when training ends fail the stage with
    a ``TrackingError``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator


from .callbacks import Callback
from .errors import CLAdapterError, TrackingError
from . import identity
from .identity import dataset_name, git_commit
from .settings import DEFAULT_TRACKING_URI, settings, var

DEFAULT_EXPERIMENT = "cladapter"   # the prefix of the per-dataset experiment names
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"   # what the MLflow 3 UI reads to pick its view
EXPERIMENT_KIND = "custom_model_development"    # model training (not "genai_development")
PIPELINE_ENV = var("pipeline_id")  # CLADAPTER_PIPELINE_ID
PIPELINE_TAG = "cladapter.pipeline_id"
ROLE_TAG = "cladapter.role"          # "pipeline" on parent runs, "stage" on stage runs
MODEL_ARTIFACT = "model"             # name of the logged pyfunc model
CHECK_TIMEOUT_S = 5.0
_PARAM_MAX = 6000                    # MLflow's limit on a parameter value's length


# -- where runs go ---------------------------------------------------------------------
def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the embedded ``sqlite:///mlflow.db``."""
    return settings().tracking_uri


def experiment_name(params: dict | None, prepared=None) -> str:
    """``tracking.experiment`` when set, else ``cladapter-<dataset_name>``: one experiment
    per dataset (the prepared data's, `identity.dataset_name`), so runs on different data
    are not compared in one table by accident."""
    explicit = ((params or {}).get("tracking") or {}).get("experiment")
    return explicit or f"{DEFAULT_EXPERIMENT}-{dataset_name(params, prepared)}"


_STAGE_LABELS = {"train_stage1": "stage1", "train_stage2": "stage2"}


def run_name(params: dict, stage: str, *, mode: str | None = None, model_dir=None, prepared=None) -> str:
    """The name a stage run shows in the UI: what ran. ``stage1 vit_small_patch16_224 K=20
    cells``; a baseline names its mode instead of K (``stage1 linear vit_small_patch16_224
    cells``). `mode` overrides ``train.mode``; `model_dir` (a saved model: evaluating one)
    gives the backbone, K and mode of the model rather than of the params."""
    m, t = params.get("model") or {}, params.get("train") or {}
    mode = mode or t.get("mode") or "cla"
    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        try:
            cfg = json.loads((Path(model_dir) / "config.json").read_text())
            m, mode = {"backbone": cfg.get("backbone"), "num_centers": cfg.get("num_centers")}, \
                cfg.get("mode") or mode
        except (OSError, ValueError):
            pass
    words = [_STAGE_LABELS.get(str(stage), str(stage))]
    if mode != "cla":
        words.append(str(mode))
    words.append(str(m.get("backbone") or "?"))
    if mode == "cla" and m.get("num_centers") is not None:
        words.append(f"K={m['num_centers']}")
    words.append(dataset_name(params, prepared))
    return " ".join(words)


def _redact(uri: str) -> str:
    """The URI without a password, for error messages."""
    return re.sub(r"//([^/:@]+):[^/@]*@", r"//\1:***@", uri)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    return first[:500]


@contextlib.contextmanager
def errors(what: str, uri: str | None = None) -> Iterator[None]:
    """Turn MLflow/HTTP/S3 failures inside the block into a TrackingError that says what
    failed (`what`, e.g. "registering model x") and where (`uri`, else the tracking URI,
    without its password), with a hint for S3 credential errors. CLAdapterErrors pass
    through unchanged. Every MLflow call of the platform that a user can cause to fail
    runs inside one::

        with tracking.errors(f"looking up registered model {name!r}"):
            client.get_registered_model(name)
    """
    try:
        yield
    except CLAdapterError:
        raise
    except Exception as e:
        where = _redact(uri or tracking_uri())
        hint = ""
        text = f"{type(e).__name__}: {e}"
        if re.search(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|NoCredentials"
                     r"|Unable to locate credentials|S3UploadFailed", text):
            hint = (" - check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and "
                    "MLFLOW_S3_ENDPOINT_URL for the artifact store")
        raise TrackingError(f"{what} failed (tracking URI {where}): "
                            f"{type(e).__name__}: {_short(e)}{hint}") from e


def local_store_path(uri: str) -> Path | None:
    """The file or folder a local store lives in: the database of ``sqlite:///<path>``, the
    folder of a ``file:`` URI or plain path (``./mlruns``); None for servers and databases."""
    from urllib.parse import unquote, urlparse
    if uri.startswith("sqlite:///"):
        return Path(unquote(uri[len("sqlite:///"):].split("?")[0]) or "mlflow.db")
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    if "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return Path(uri)
    return None


def check_store_exists(uri: str | None = None) -> str:
    """For commands that only read runs and registered models: refuse a local store that
    does not exist (MLflow would create an empty one and then report "no such model"),
    naming the store and where it was looked for. Returns the URI."""
    uri = uri or tracking_uri()
    where = local_store_path(uri)
    if where is not None and not (where.is_file() if uri.startswith("sqlite:") else where.is_dir()):
        kind = "database file" if uri.startswith("sqlite:") else "folder"
        set_by = ("$MLFLOW_TRACKING_URI" if settings().mlflow_tracking_uri
                  else "the default store, $MLFLOW_TRACKING_URI unset")
        raise TrackingError(
            f"no MLflow store at {_redact(uri)} ({set_by}): the {kind} {where.resolve()} does not "
            "exist, and this command only reads runs and registered models, so it does not "
            "create an empty store. Run it in the folder that holds the store (where `dvc repro` "
            "or `cladapter register` ran), or point MLFLOW_TRACKING_URI at it (sqlite:///<path>/"
            "mlflow.db, or the server, e.g. http://mlflow:5000)")
    return uri


def check_tracking(uri: str | None = None, timeout: float = CHECK_TIMEOUT_S, *,
                   existing: bool = False) -> str:
    """Fail fast, before any training, when the tracking store cannot be used.

    For an ``http(s)://`` server: one direct GET of the experiments API with a short
    timeout and no retries (MLflow's own client retries for minutes). For the embedded
    ``sqlite:///`` store: the database's folder must exist and be writable. ``existing``
    (commands that only read): a local store must already exist (`check_store_exists`),
    and so must ``$MLFLOW_REGISTRY_URI``'s when set. Returns the URI checked; raises
    ``TrackingError`` naming it otherwise.
    """
    uri = uri or tracking_uri()
    shown = _redact(uri)
    if existing:
        check_store_exists(uri)
        registry = settings().mlflow_registry_uri
        if registry and registry != uri:
            check_store_exists(registry)
    if uri.startswith(("http://", "https://")):
        import requests
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
        auth, headers, s = None, {}, settings()
        if s.mlflow_token:
            headers["Authorization"] = f"Bearer {s.mlflow_token}"
        elif s.mlflow_username:
            auth = (s.mlflow_username, s.mlflow_password)
        verify = not s.mlflow_insecure_tls
        try:
            r = requests.get(url, params={"max_results": 1}, timeout=timeout, auth=auth,
                             headers=headers, verify=verify)
        except requests.RequestException as e:
            raise TrackingError(
                f"MLflow tracking server {shown} is unreachable ({type(e).__name__}: {_short(e)}). "
                "Start it, fix MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI to use the "
                f"embedded store {DEFAULT_TRACKING_URI}") from e
        if r.status_code in (401, 403):
            raise TrackingError(f"MLflow tracking server {shown} refused the credentials "
                                f"(HTTP {r.status_code}): set MLFLOW_TRACKING_USERNAME/PASSWORD "
                                "or MLFLOW_TRACKING_TOKEN")
        try:
            ok = r.status_code == 200 and isinstance(r.json(), dict)
        except ValueError:
            ok = False
        if not ok:
            raise TrackingError(f"{shown} does not answer like an MLflow tracking server "
                                f"(HTTP {r.status_code} from {url}: {r.text[:200]!r})")
        return uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):] or "mlflow.db")
        folder = (db.parent if str(db.parent) else Path(".")).resolve()
        if not folder.is_dir():
            raise TrackingError(f"tracking store {shown}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(f"tracking store {shown}: {db} is not writable")
        return uri
    if uri.startswith(("postgresql", "mysql", "mssql")):
        import sqlalchemy
        try:
            engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(timeout)})
            with engine.connect():
                pass
        except Exception as e:
            raise TrackingError(f"tracking database {shown} is unreachable: {_short(e)}") from e
        return uri
    return uri  # file:, databricks, ...: MLflow reports problems itself


def configure(params: dict | None = None, prepared=None) -> dict:
    """Point MLflow at ``tracking_uri()`` and select (create) the experiment.

    Returns ``{"tracking_uri", "experiment", "experiment_id", "artifact_location"}``.
    Does not probe a server; call ``check_tracking()`` first to fail fast.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    name = experiment_name(params, prepared)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    with errors(f"selecting MLflow experiment {name!r}", uri):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException as e:  # another process created it just now
                if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                    raise
            exp = client.get_experiment_by_name(name)
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {name!r} is deleted on {_redact(uri)}: restore "
                                "it (`mlflow experiments restore`) or set tracking.experiment")
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before, or by someone else: mark it
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        mlflow.set_experiment(experiment_id=exp.experiment_id)
    return {"tracking_uri": uri, "experiment": name, "experiment_id": exp.experiment_id,
            "artifact_location": exp.artifact_location}


# -- grouping the runs of one pipeline execution -----------------------------------------
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


def pipeline_id(params: dict, source_of: str | None = None) -> str:
    """The id shared by all stage runs of one pipeline execution.

    ``$CLADAPTER_PIPELINE_ID`` when set (KFP passes its run id); else the first 16 hex of
    sha256(git commit, resolved params, `source_of`: ``identity.source_hash`` of
    ``data.source``, its text when there is none), so every stage of one ``dvc repro``
    (separate processes) finds the same parent run."""
    env = settings().pipeline_id.strip()
    if env:
        # The id is matched in a search filter: keep it to safe characters.
        return env if _SAFE_ID.match(env) else hashlib.sha256(env.encode()).hexdigest()[:16]
    commit, _ = git_commit()
    source = (params.get("data") or {}).get("source")
    source_of = source_of or identity.source_hash(source) or str(source)
    blob = json.dumps({"git": commit, "params": params, "data": source_of}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_tags(params: dict, stage: str, data_hash: str | None = None) -> dict[str, str]:
    """Tags every stage run carries: stage, backbone, K, mode, git commit, data hash."""
    m, t = params.get("model") or {}, params.get("train") or {}
    commit, dirty = git_commit()
    tags = {"stage": str(stage), "backbone": str(m.get("backbone")),
            "K": str(m.get("num_centers")), "mode": str(t.get("mode")),
            "git_commit": commit or "unknown", "git_dirty": str(dirty).lower(),
            "data_hash": data_hash or "unknown", ROLE_TAG: "stage"}
    return tags


def _param_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return text[:_PARAM_MAX]


def pipeline_parent(client, experiment_id: str, pid: str, params: dict, tags: dict, prepared=None) -> str:
    """Run id of the parent run of pipeline execution `pid` in `experiment_id`: the
    oldest active run tagged with `pid` and role "pipeline", created (with `tags` less
    "stage", and the flattened `params`) when there is none. Stages or tuning sessions
    starting at the same moment may each create one: all then keep the oldest and the
    others are deleted. `client`: an ``mlflow.MlflowClient``."""
    from mlflow.entities import Param, ViewType

    flt = f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`{ROLE_TAG}` = 'pipeline'"

    def parents():
        runs = client.search_runs([experiment_id], filter_string=flt,
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = parents()
    if found:
        return found[0].info.run_id
    parent_tags = {k: v for k, v in tags.items() if k not in ("stage",)}
    parent_tags.update({PIPELINE_TAG: pid, ROLE_TAG: "pipeline"})
    mine = client.create_run(experiment_id, run_name=f"pipeline {dataset_name(params, prepared)} {pid[:12]}",
                             tags=parent_tags)
    client.log_batch(mine.info.run_id, params=[Param(k, _param_value(v))
                                               for k, v in _flat(params).items()])
    # Another stage may have created a parent at the same moment: all keep the oldest.
    found = parents()
    winner = found[0].info.run_id if found else mine.info.run_id
    if winner != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return winner


def _flat(params: dict) -> dict:
    from .params import flatten
    return flatten(params)


@contextlib.contextmanager
def stage_run(params: dict, stage: str, data_hash: str | None = None, prepared=None, *,
              name: str | None = None):
    """Run one pipeline stage inside an MLflow run; yields the active ``mlflow.ActiveRun``.
    The run is named `name`, else ``run_name(params, stage)`` (what ran); its ``stage`` tag
    is `stage`.

    The run is a child of the pipeline's parent run (see ``pipeline_id``), or of the
    active run when one is open in this process (e.g. tuning trials under the tune
    stage). It gets the flattened params, ``params.json`` and the tags of ``run_tags``
    (``data_hash``: the given one, else ``identity.data_hash(prepared)`` when the stage's
    prepared folder is given, else the hash of ``data.source``). It ends FINISHED, or
    FAILED when the body raises; the parent's status follows its latest stage.

    Example::

        tracking.check_tracking()
        with tracking.stage_run(params, "train-stage1", prepared=prepared):
            train.train(params, prepared, out, stage=1, callbacks=[tracking.EpochLogger()])
            tracking.log_artifacts_dir(out, "model_dir")
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param

    cfg = configure(params, prepared)
    client = MlflowClient()
    if data_hash is None and prepared is not None and (Path(prepared) / "manifest.csv").is_file():
        data_hash = identity.data_hash(prepared)
    needs_source = data_hash is None or not settings().pipeline_id
    source_of = identity.source_hash((params.get("data") or {}).get("source")) if needs_source else None
    pid = pipeline_id(params, source_of)
    tags = run_tags(params, stage, data_hash or source_of)
    tags[PIPELINE_TAG] = pid
    active = mlflow.active_run()
    with errors(f"starting the MLflow run of stage {stage!r}"):
        if active is not None:
            parent_id, experiment_id = active.info.run_id, active.info.experiment_id
        else:
            experiment_id = cfg["experiment_id"]
            parent_id = pipeline_parent(client, experiment_id, pid, params, tags, prepared)
            client.update_run(parent_id, status="RUNNING")
        tags["mlflow.parentRunId"] = parent_id
        run = mlflow.start_run(experiment_id=experiment_id, run_name=name or run_name(params, stage, prepared=prepared),
                               tags=tags,
                               nested=active is not None)
    status = "FAILED"
    try:
        try:
            with errors(f"logging the params of stage {stage!r}"):
                client.log_batch(run.info.run_id, params=[
                    Param(k, _param_value(v)) for k, v in _flat(params).items()])
                mlflow.log_dict(params, "params.json")
            yield run
            status = "FINISHED"
        finally:
            # Not `with run:` - closing the run on a server that went away must neither
            # hide the stage's own error nor end the stage in a raw traceback.
            if status == "FINISHED":
                with errors(f"ending the MLflow run of stage {stage!r}"):
                    mlflow.end_run(status)
            else:
                with contextlib.suppress(Exception):
                    mlflow.end_run(status)
    finally:
        if active is None:
            with contextlib.suppress(Exception):  # cosmetic: the parent shows the last status
                client.set_terminated(parent_id, status=status)


def _active_run_id(what: str) -> str:
    import mlflow
    run = mlflow.active_run()
    if run is None:
        raise TrackingError(f"{what} needs an active MLflow run: call it inside "
                            "`with tracking.stage_run(params, stage):`")
    return run.info.run_id


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
    where = str(source or (params.get("data") or {}).get("source") or prepared_dir)
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


# -- what stages log -----------------------------------------------------------------------
def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isinf(v))


class EpochLogger(Callback):
    """Trainer callback: logs each epoch's numbers as MLflow metrics (step = epoch).

    Use inside ``stage_run``: ``train.train(..., callbacks=[tracking.EpochLogger()])``.
    ``on_epoch_end`` logs every numeric field of the record (train_loss, val_loss,
    val_<metric>, lr, seconds, ...) except ``epoch`` and ``stage``; a record of another
    stage than the one training started with is prefixed ``stage<N>/`` so the curves of
    two stages in one run do not overwrite each other. A failed write (server down) is
    warned about, kept, and retried with the next epoch: tracking never stops training.
    Values still unsent when training ends are tried a few more times (``FINAL_RETRIES``),
    then ``on_train_end`` raises ``TrackingError``: the stage fails rather than end as a
    success with a gap in its metrics. When training fails, ``on_exception`` sends what
    it still holds (the epochs before the failure) once more before the error propagates.
    """

    SKIP = ("epoch", "stage")
    FINAL_RETRIES = (1.0, 2.0, 4.0)    # seconds before each last try at training's end

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id
        self.stage = None
        self.out_dir = None
        self._pending: list = []
        self._warned = False
        self._last_error = ""

    # the trainer's hooks -----------------------------------------------------------
    def on_train_start(self, info: dict) -> None:
        self.run_id = self.run_id or _active_run_id("EpochLogger")
        self.stage = info.get("stage")
        self.out_dir = info.get("out_dir")
        if info.get("prepared_dir") and info.get("params") is not None:  # the data it trains on
            self._safe(lambda: log_data_inputs(info["params"], info["prepared_dir"], ("train", "val"),
                                               run_id=self.run_id))
        report = info.get("param_report") or {}
        metrics = {f"params_{k}": v for k, v in report.items() if _numeric(v)}
        self._log(metrics, step=0)
        if report:
            self._safe(lambda: self._client().log_dict(self.run_id, report, "param_report.json"))
        if info.get("mode") is not None:
            self._safe(lambda: self._client().set_tag(self.run_id, "mode", str(info["mode"])))

    def on_epoch_end(self, record: dict) -> None:
        if self.run_id is None:  # used without on_train_start
            self.run_id = _active_run_id("EpochLogger")
        stage = record.get("stage")
        prefix = f"stage{stage}/" if stage is not None and self.stage is not None \
            and stage != self.stage else ""
        metrics = {f"{prefix}{k}": v for k, v in record.items()
                   if k not in self.SKIP and _numeric(v)}
        self._log(metrics, step=int(record.get("epoch", 0) or 0))

    def on_train_end(self, result: dict) -> None:
        if self.run_id is None:
            return
        flat = _flat(result) if isinstance(result, dict) else {}
        self._log({f"summary.{k}": v for k, v in flat.items() if _numeric(v)}, step=0)
        if isinstance(result, dict):
            self._safe(lambda: self._client().log_text(
                self.run_id, json.dumps(result, indent=2, default=str), "train_summary.json"))
        for delay in self.FINAL_RETRIES:
            if not self._pending:
                break
            time.sleep(delay)
            self._log({}, step=0)
        if self._pending:
            steps = sorted({m.step for m in self._pending})
            raise TrackingError(
                f"MLflow: {len(self._pending)} metric values (steps {steps}) could not be logged "
                f"to run {self.run_id} on {_redact(tracking_uri())}, unreachable until training "
                f"ended ({self._last_error}); the model in {self.out_dir} is complete - run the "
                "stage again once the server is back to record its metrics")

    def on_exception(self, error: BaseException) -> None:
        if self.run_id is not None and self._pending:
            self._log({}, step=0)

    # internals -----------------------------------------------------------------------
    @staticmethod
    def _client():
        from mlflow import MlflowClient
        return MlflowClient()

    def _log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if self._pending:  # MlflowClient.log_batch splits it into batches the server takes
            batch = self._pending
            if self._safe(lambda: self._client().log_batch(self.run_id, metrics=batch)):
                self._pending = []

    def _safe(self, fn) -> bool:
        try:
            fn()
            return True
        except Exception as e:
            self._last_error = f"{type(e).__name__}: {_short(e)}"
            if not self._warned:
                warnings.warn(f"MLflow logging to {_redact(tracking_uri())} failed "
                              f"({type(e).__name__}: {_short(e)}); training goes on")
                self._warned = True
            return False


def log_artifacts_dir(path: str | Path, artifact_path: str | None = None) -> str:
    """Upload a folder (or one file) into the active run under ``artifact_path``;
    returns the artifact URI. ``TrackingError`` when the path is missing or the artifact
    store refuses (e.g. wrong S3 credentials)."""
    import mlflow
    path = Path(path)
    _active_run_id(f"log_artifacts_dir({path})")
    if not path.exists():
        raise TrackingError(f"cannot log artifacts: {path} does not exist")
    with errors(f"uploading {path} to the run's artifacts"):
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path)
        return mlflow.get_artifact_uri(artifact_path)


def log_evaluation(eval_dir: str | Path, metrics: dict | None = None, split: str = "test", *,
                   prepared: str | Path | None = None, params: dict | None = None) -> str:
    """Log an evaluation into the active run: each numeric metric as ``<split>_<name>``
    (``metrics``, else ``eval_dir/metrics.json``) and the whole folder (report.html,
    confusion matrix, curves, classification report, predictions, t-SNE) under
    ``evaluation/``; with ``prepared`` (and ``params``), the data evaluated on as dataset
    inputs: `split` and the validation split promotion decides on (`log_data_inputs`).
    Returns the artifact URI."""
    import mlflow
    eval_dir = Path(eval_dir)
    run_id = _active_run_id(f"log_evaluation({eval_dir})")
    if prepared is not None:
        log_data_inputs(params or {}, prepared, tuple(dict.fromkeys((split, "val"))), run_id=run_id)
    if metrics is None:
        path = eval_dir / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TrackingError(f"{path}: cannot read the metrics ({e})") from e
    values = {f"{split}_{k}": float(v) for k, v in _flat(metrics).items() if _numeric(v)}
    with errors("logging the evaluation metrics"):
        mlflow.log_metrics(values)
    return log_artifacts_dir(eval_dir, "evaluation")


# -- the model as an MLflow pyfunc -----------------------------------------------------------
# The pyfunc itself is `serving.CLAdapterPyfunc` (input, output, errors: serving.py). It is
# logged as code, not pickled, so loading it needs only its requirements.
def log_model(model_dir: str | Path, registered_name: str | None = None) -> str:
    """Log a model directory (``save_model`` output) into the active run as a self-contained
    MLflow pyfunc; returns the model URI (``models:/m-...``). ``registered_name`` also
    registers it (plain MLflow registration; ``registry.register`` adds tags and aliases).

    Self-contained: MLflow "models from code" (``serving_model.py``) with the cladapter_core
    package as ``code_paths``, the model directory as the artifact ``model_dir``, pinned
    ``requirements.txt`` (``serving.requirements()``), an output signature and an input
    example (one PNG). It loads where only those requirements are installed::

        mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [base64_png, ...]}))
        mlflow.pyfunc.load_model(uri).predict(float32_batch_of_raw_0_1_images)

    (input forms, output and errors: ``serving.CLAdapterPyfunc``).
    """
    import mlflow

    kwargs = _pyfunc_kwargs(model_dir)
    _active_run_id("log_model")
    with errors(f"logging model {model_dir}"):
        info = mlflow.pyfunc.log_model(name=MODEL_ARTIFACT, registered_model_name=registered_name,
                                       **kwargs)
    return info.model_uri


def save_pyfunc(model_dir: str | Path, path: str | Path) -> Path:
    """The same self-contained MLflow pyfunc as ``log_model``, saved to the new folder
    `path` instead of a run (``mlflow models serve -m <path>`` serves a model folder that
    was never registered). Returns `path`."""
    import mlflow

    kwargs = _pyfunc_kwargs(model_dir)
    with errors(f"saving model {model_dir} as an MLflow model in {path}"):
        mlflow.pyfunc.save_model(path=str(path), **kwargs)
    return Path(path)


def _pyfunc_kwargs(model_dir: str | Path) -> dict:
    from . import serving

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file() or not (model_dir / "model.safetensors").is_file():
        raise TrackingError(f"cannot log model: {model_dir} is not a model directory "
                            "(needs config.json and model.safetensors)")
    try:
        config = serving.read_config(model_dir)
        signature, example = serving.signature(config), serving.input_example(config)
    except (ValueError, KeyError, TypeError) as e:
        raise TrackingError(f"{cfg_path}: unusable model config ({e})") from e
    return dict(python_model=str(serving.MODEL_CODE), code_paths=[str(serving.PACKAGE_DIR)],
                artifacts={serving.MODEL_DIR_ARTIFACT: str(model_dir)}, signature=signature,
                input_example=example, pip_requirements=serving.requirements())
