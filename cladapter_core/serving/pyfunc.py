"""The trained model as an MLflow pyfunc that serves wherever its requirements are installed.

What is logged (``tracking.log_model``): MLflow "models from code" - ``serving/model_code.py``
(three lines: ``set_model(CLAdapterPyfunc())``) is the model's code, this package is
carried as ``code_paths`` (``<model>/code/cladapter_core``), the model directory
(``model.safetensors`` + ``config.json``) is the artifact ``model_dir``, and
``requirements()`` pins every package the carried code imports. Nothing is pickled, and
neither this repository nor an installed ``cladapter-core`` is needed where it loads:
``mlflow models serve -m models:/<name>@champion``, ``mlflow models build-docker`` and any
runtime that loads MLflow pyfuncs.

Input, one of two forms:

- **images**: one column ``image`` (a DataFrame; JSON ``{"dataframe_split": {"columns":
  ["image"], "data": [["<base64>"], ...]}}`` or ``dataframe_records``), each cell the bytes
  of a PNG, JPEG, TIFF or BMP file (a ``.npy``/``.npz`` volume for a 3D model) as base64
  text, or raw bytes in-process; the format is told by the first bytes. The model's own
  preprocessing applies, through the same code as ``cladapter predict``: decoding, scaling
  to [0, 1] by the dtype's range (8/16-bit) or the image's own range (float), channel
  matching, resize to ``input_size``, normalisation with the model's mean/std.
- **tensor**: float32 ``(B, *input_size)`` raw images with values in [0, 1], resized but
  not normalised (JSON ``{"inputs": [...]}``); the model normalises.

Output: one row per input: ``label`` (class name) and ``prob_<class>`` per class (softmax
probabilities summing to 1).

Errors: an input that cannot be used is refused with ``INVALID_PARAMETER_VALUE`` (HTTP 400
from the scoring server), as is a request of more than $CLADAPTER_SERVE_MAX_ROWS rows
(before anything is decoded) or an image over the pixel limit (read from its header); an
unexpected failure is an ``INTERNAL_ERROR`` (500) whose traceback goes to the server's log,
not to the client. A request with undecodable images is refused **whole**, naming
every bad row (rows count from 0, in request order): nothing is predicted for the other
rows, so a client can never take a partial answer for a complete one - it drops or fixes
the named rows and sends again.

This module is loaded inside the served model's environment: it imports only the standard
library, numpy, pandas, torch (+ torchvision, timm, safetensors, pillow, tifffile through
the model and data modules) and mlflow.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]    # cladapter_core, carried as code_paths
MODEL_CODE = Path(__file__).resolve().with_name("model_code.py")  # models-from-code entry
MODEL_DIR_ARTIFACT = "model_dir"                      # the pyfunc artifact holding the model folder
IMAGE_COLUMN = "image"
# What an encoded input is, by its first bytes -> the file suffix `load_array` decodes it by.
MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"II*\x00", ".tif"),
         (b"MM\x00*", ".tif"), (b"II+\x00", ".tif"), (b"MM\x00+", ".tif"), (b"BM", ".bmp"),
         (b"\x93NUMPY", ".npy"), (b"PK\x03\x04", ".npz"))
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF", ".bmp": "BMP"}   # 2D models
VOLUME_FORMATS = {".npy": "NumPy .npy", ".npz": "NumPy .npz"}                   # 3D models
BATCH_SIZE = 32                                       # as `cladapter predict`'s default
# Everything the carried code imports, pinned to this environment's versions.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pandas",
                "pillow", "tifffile", "pyyaml", "pydantic", "pydantic-settings")


def requirements() -> list[str]:
    """``<package>==<version>`` for each of REQUIREMENTS, from this environment (a local
    build suffix such as ``+cu130`` dropped: the same release of another build serves)."""
    out = []
    for pkg in REQUIREMENTS:
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def _refuse(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _check_rows(rows: int) -> None:
    """Refuse a request of more rows than $CLADAPTER_SERVE_MAX_ROWS, before any is decoded."""
    from ..settings import settings, var
    limit = settings().serve_max_rows
    if rows > limit:
        raise _refuse(f"{rows} rows in one request, more than {limit} ({var('serve_max_rows')}); "
                      f"send them in requests of at most {limit} rows")


class CLAdapterPyfunc(mlflow.pyfunc.PythonModel):
    """A CLAdapter model directory served as an MLflow pyfunc (see the module docstring for
    the input and output)."""

    # Inputs are checked here (two forms, one signature cannot say both): skip MLflow's
    # type-hint wrapper and its warning about missing hints.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from ..data.transforms import build_transform
        from ..model import load_model
        self.model = load_model(Path(context.artifacts[MODEL_DIR_ARTIFACT])).eval()
        self.config = self.model.config_dict()
        self.transform = build_transform(self.config, train=False)

    def predict(self, context, model_input, params=None):
        try:
            images = _image_column(model_input)
            if images is not None:
                _check_rows(len(images))
                x = self._preprocess(images)
            else:
                x = _tensor(model_input, self.config["input_size"])
                _check_rows(len(x))
                x = self._normalise(x)
            return self._classify(x)
        except MlflowException:
            raise
        except Exception:  # noqa: BLE001 - a bug or no memory: the log has it, the client not
            log.exception("predict failed")
            raise MlflowException("internal error while predicting; the server's log has the "
                                  "details", error_code=INTERNAL_ERROR) from None

    # -- the two input forms -------------------------------------------------------------
    def _preprocess(self, images: list):
        """Encoded images -> a normalised batch, through the very code `cladapter predict`
        reads files with (each image is written to a file named for its format and read
        back with `load_array`), so the served model and `predict` see the same pixels."""
        import tempfile

        import torch
        from ..data.decoding import load_array
        from ..errors import CLAdapterError
        want = VOLUME_FORMATS if self.config.get("is_3d") else IMAGE_FORMATS
        in_chans = int(self.config["input_size"][0])
        batch, problems = [], []
        with tempfile.TemporaryDirectory(prefix="cladapter-serve-") as tmp:
            for row, cell in enumerate(images):
                path = None
                try:
                    data = _bytes(cell)
                    path = Path(tmp) / f"row{row}{_suffix(data, want)}"
                    path.write_bytes(data)
                    batch.append(self.transform(load_array(path, in_chans, self.transform.intensity)))
                except (CLAdapterError, ValueError) as e:  # unreadable, wrong channels or shape
                    text = str(e)
                    problems.append(f"row {row}: {text.replace(f'{path}: ', '') if path else text}")
                finally:
                    if path is not None:
                        path.unlink(missing_ok=True)
        if problems:
            raise _refuse(f"{len(problems)} of {len(images)} images cannot be used (rows count "
                          "from 0); nothing was predicted, send the request again without "
                          "them:\n  " + "\n  ".join(problems))
        if not batch:
            raise _refuse(f"column {IMAGE_COLUMN!r} holds no images")
        return torch.stack(batch)

    def _normalise(self, x: np.ndarray):
        import torch
        shape = tuple(self.config["input_size"])
        view = (1, -1) + (1,) * (len(shape) - 1)
        mean = torch.tensor(self.config["mean"], dtype=torch.float32).view(view)
        std = torch.tensor(self.config["std"], dtype=torch.float32).view(view)
        return (torch.from_numpy(x) - mean) / std

    def _classify(self, x):
        import pandas as pd
        import torch
        probs = []
        with torch.no_grad():
            for i in range(0, len(x), BATCH_SIZE):
                probs.append(torch.softmax(self.model(x[i:i + BATCH_SIZE]).float(), dim=1).numpy())
        names = self.config["class_names"]
        p = np.concatenate(probs) if probs else np.zeros((0, len(names)), np.float32)
        out = pd.DataFrame({"label": [names[i] for i in p.argmax(axis=1)]})
        for j, name in enumerate(names):
            out[f"prob_{name}"] = p[:, j].astype(np.float64)
        return out


def _image_column(model_input) -> list | None:
    """The encoded images of an images-form input, else None (a tensor)."""
    import pandas as pd
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            extra = [c for c in model_input.columns if c != IMAGE_COLUMN]
            if extra:
                raise _refuse(f"expected one column {IMAGE_COLUMN!r}, got also {extra}")
            return list(model_input[IMAGE_COLUMN])
        if any(model_input[c].dtype == object for c in model_input.columns):
            raise _refuse(f"images go in a column named {IMAGE_COLUMN!r}; got columns "
                          f"{list(model_input.columns)}")
        return None
    if isinstance(model_input, dict) and IMAGE_COLUMN in model_input:  # {"inputs": {"image": [...]}}
        return list(np.asarray(model_input[IMAGE_COLUMN], dtype=object).ravel())
    if isinstance(model_input, (list, np.ndarray)):
        arr = np.asarray(model_input, dtype=object) if isinstance(model_input, list) else model_input
        if arr.ndim == 1 and len(arr) and all(isinstance(v, (str, bytes)) for v in arr):
            return list(arr)                                         # {"inputs": ["<base64>", ...]}
    return None


def _bytes(cell) -> bytes:
    """One cell of the image column: raw bytes, or base64 text (as JSON carries bytes)."""
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if not isinstance(cell, str):
        raise ValueError(f"expected base64 text of an encoded image, got {type(cell).__name__}")
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not valid base64 ({e})") from None


def _suffix(data: bytes, want: dict) -> str:
    """The file suffix of encoded bytes, by their first bytes; ValueError unless in `want`."""
    if not data:
        raise ValueError("empty image (0 bytes)")
    found = next((suffix for magic, suffix in MAGIC if data.startswith(magic)), None)
    names = ", ".join(want.values())
    if found is None:
        raise ValueError(f"not an image this model takes ({names}): unrecognised first bytes "
                         f"{data[:8]!r}")
    if found not in want:
        what = IMAGE_FORMATS.get(found) or VOLUME_FORMATS[found]
        raise ValueError(f"a {what} file, but this model takes {names}")
    return found


def _tensor(model_input, input_size) -> np.ndarray:
    """The tensor form, checked: float32 (B, *input_size) with values in [0, 1]."""
    try:
        x = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise _refuse(f"expected a column {IMAGE_COLUMN!r} of base64 images or a float32 "
                      f"tensor; got {type(model_input).__name__} ({e})") from None
    shape = tuple(input_size)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        dims = ", ".join(map(str, shape))
        raise _refuse(f"expected a column {IMAGE_COLUMN!r} of base64 images, or a float32 "
                      f"batch of shape (B, {dims}); got shape {tuple(x.shape)}")
    if x.size and not np.isfinite(x).all():
        raise _refuse("the tensor holds NaN or infinite values")
    if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise _refuse(f"expected raw images with values in [0, 1], got values in "
                      f"[{x.min():.3g}, {x.max():.3g}]; do not normalise the input")
    return np.ascontiguousarray(x)


# -- what is logged with the model -----------------------------------------------------------
def signature(config: dict):
    """Output schema only (label + prob_<class>): the input takes two forms (images or a
    tensor), which one input schema cannot express, so the model checks its input itself."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    outputs = Schema([ColSpec("string", "label")] +
                     [ColSpec("double", f"prob_{c}") for c in config["class_names"]])
    return ModelSignature(inputs=None, outputs=outputs)


def input_example(config: dict):
    """A request MLflow stores beside the model (``serving_input_example.json``): one
    mid-grey PNG at the model's input size for a 2D model, a tensor for a 3D one."""
    import io

    import pandas as pd
    from PIL import Image
    if len(config["input_size"]) == 4:
        return np.full((1, *config["input_size"]), 0.5, dtype=np.float32)
    c, h, w = config["input_size"]
    buf = io.BytesIO()
    Image.new("L" if c == 1 else "RGB", (w, h), 128 if c == 1 else (128, 128, 128)).save(buf, "PNG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buf.getvalue()).decode("ascii")]})


def read_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def model_dir_in(local_model: str | Path) -> Path:
    """The model folder (``config.json`` + ``model.safetensors``) inside a downloaded MLflow
    model: the pyfunc artifact ``model_dir`` as its ``MLmodel`` file records it."""
    import yaml
    local_model = Path(local_model)
    mlmodel = local_model / "MLmodel"
    try:
        meta = yaml.safe_load(mlmodel.read_text()) or {}
        rel = meta["flavors"]["python_function"]["artifacts"][MODEL_DIR_ARTIFACT]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(f"{local_model}: not a CLAdapter MLflow model (no artifact "
                         f"{MODEL_DIR_ARTIFACT!r} in {mlmodel.name}: {type(e).__name__}: {e})") from None
    folder = local_model / rel
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder}: the model's folder lacks config.json or model.safetensors")
    return folder


def serve_command(model_uri: str, host: str = "127.0.0.1", port: int = 5001, workers: int = 1,
                  env_manager: str = "local", python: str | None = None) -> list[str]:
    """The command that serves `model_uri`: with `env_manager` local (the environment of
    `python`, which must hold the model's requirements), `serving/server.py`, which is
    `mlflow models serve` with a request-size limit, an optional token and error bodies
    without tracebacks; otherwise `mlflow models serve --env-manager <it>`, which builds an
    environment from the model's requirements and has none of those three (the model's
    own row and pixel limits hold in both)."""
    import sys
    python = python or sys.executable
    if env_manager == "local":
        return [python, "-m", "cladapter_core.serving.server", "--model-uri", model_uri,
                "--host", host, "--port", str(port), "--workers", str(workers)]
    return [python, "-m", "mlflow", "models", "serve", "--model-uri", model_uri,
            "--host", host, "--port", str(port), "--workers", str(workers),
            "--env-manager", env_manager]
