"""What a stage leaves in its run: folders of files, an evaluation's metrics and pictures, and
the trained model as an MLflow pyfunc (logged as code: `serving.CLAdapterPyfunc`)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import TrackingError
from .datasets import log_data_inputs
from .epoch_logger import _numeric
from .runs import _active_run_id, _flat
from .store import MODEL_ARTIFACT, errors

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
# The pyfunc itself is `serving.CLAdapterPyfunc` (input, output, errors: serving/pyfunc.py). It is
# logged as code, not pickled, so loading it needs only its requirements.
def log_model(model_dir: str | Path, registered_name: str | None = None) -> str:
    """Log a model directory (``save_model`` output) into the active run as a self-contained
    MLflow pyfunc; returns the model URI (``models:/m-...``). ``registered_name`` also
    registers it (plain MLflow registration; ``registry.register`` adds tags and aliases).

    Self-contained: MLflow "models from code" (``serving/model_code.py``) with the cladapter_core
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
    from ..serving import pyfunc as serving

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
