"""Where runs go: the tracking URI, the experiment of a dataset, what a run is called, and
checks that fail fast (an unreachable server, a store that does not exist)."""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from ..errors import CLAdapterError, TrackingError
from ..identity import dataset_name
from ..settings import DEFAULT_TRACKING_URI, settings, var

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


# user:password@ in the authority of a URL of any scheme (the password may hold a raw '@':
# the authority ends at the last '@' before the path, as SQLAlchemy and urllib read it).
_USERINFO = re.compile(r"(?P<head>//[^/?#@:\s]*):[^/?#\s]*@")
# Query-string (or DSN keyword) secrets: ?password=, &token=, X-Amz-Signature=, sig= (Azure
# SAS), key= (API keys), X-Amz-Credential= and X-Amz-Security-Token= of presigned URLs, ...
_SECRET_KEY = (r"[^=&#;\s?]*(?:password|passwd|pwd|token|secret|signature|credential)[^=&#;\s?]*"
               r"|sig|key|api[_-]?key|access[_-]?key(?:[_-]?id)?|awsaccesskeyid")
_QUERY_SECRET = re.compile(rf"(?P<head>(?:^|[?&;\s])(?:{_SECRET_KEY}))=[^&#;\s]*", re.IGNORECASE)
REDACTED = "***"


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by ``***``: the password of
    ``scheme://user:password@host`` (the user name stays, to say who connects) and the
    values of secret query parameters (``password=``, ``token=``, ``X-Amz-Signature=``,
    ``sig=``, ``key=``, ...). The one redaction of the platform: applied to every parameter,
    tag and params file sent to MLflow (`redact_params`) and to every URI in a message.
    Anything that is not a string is returned as it is."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(rf"\g<head>:{REDACTED}@", text)
    return _QUERY_SECRET.sub(rf"\g<head>={REDACTED}", text)


def redact_params(obj):
    """A copy of `obj` (params, tags: nested dicts, lists, strings) with `redact` applied to
    every string value; keys and other values unchanged. What is logged, never what runs:
    the caller keeps using the original (e.g. the Optuna storage URL it connects with)."""
    if isinstance(obj, dict):
        return {k: redact_params(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_params(v) for v in obj)
    return redact(obj) if isinstance(obj, str) else obj


_redact = redact  # the old private name (registry.model_cache, messages)


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
