"""Serving the registered champion (cladapter_core/serving/, `cladapter serve`,
infra/k8s/serving/), with real processes and real HTTP:

- The logged model is self-contained: a fresh virtual environment built from the model's
  own requirements.txt alone (pip; cached under $CLADAPTER_TEST_CACHE, default
  ~/.cache/cladapter-tests, keyed by those requirements) cannot import this repository,
  yet serves `models:/<name>@champion` from an MLflow server (PostgreSQL + S3) with the
  InferenceService manifest's own command line (`python -m cladapter_core.serving.server`:
  `mlflow models serve` with limits; the package from the model's own code/ folder, as
  the platform image has it installed; only the address changed to loopback). PNG, JPEG
  and TIFF images posted over HTTP get the labels and probabilities `cladapter predict`
  gives for the same files (1e-5); a request with a truncated image is refused whole,
  with a 400 that names the row.
- Hostile requests to that server (docs/security.md): a body over the size limit gets 413
  (declared or chunked) and the server stays up; too many rows a 400; no token a 401
  (probes stay open); error bodies carry no traceback; PNG and TIFF decompression bombs
  a 400 naming the row and the size, while the worker's peak memory grows < 100 MB.
- `cladapter serve` resolves the alias to a version, says which, and serves it.
- The promotion lock is no registered model.
- The InferenceService manifest renders with kustomize and validates: its KServe fields
  against the API types of the published KServe SDK (`kserve` from PyPI, downloaded once
  with `pip download --no-deps`; the CRD itself ships in no package), strictly (an
  unknown field, a wrong type or a missing required field fails), and its pod part
  (containers, volumes, security context) against the Kubernetes 1.29 Pod schema with
  kubernetes-validate in strict mode.
"""
from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from fixtures_services import CLASS_NAMES, reset_mlflow_globals, tracked_params, write_metrics
from helpers import BIN, REPO, free_port, png_bomb, tiff_bomb
SERVING = REPO / "infra" / "k8s" / "serving"
MANIFEST = SERVING / "inferenceservice.yaml"
CACHE = Path(os.environ.get("CLADAPTER_TEST_CACHE") or Path.home() / ".cache" / "cladapter-tests")
KSERVE_SDK = "0.21.0"          # the KServe SDK whose API types the manifest is checked against
K8S_VERSION = "1.29.0"         # as tests/test_infra.py: the oldest Kubernetes supported
IMAGE_REPO = "ghcr.io/cladapter/cladapter"
CLIENT_ENV = ("MLFLOW_", "AWS_")
TOKEN = "a-test-token"               # the served fixture's CLADAPTER_SERVE_TOKEN
LIMITS = {"CLADAPTER_SERVE_MAX_BYTES": str(4 * 2**20), "CLADAPTER_SERVE_MAX_ROWS": "16",
          "CLADAPTER_SERVE_TOKEN": TOKEN}  # smaller than the manifest's: cheaper requests


# ----------------------------------------------------------------------------- helpers
def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _start(cmd: list[str], env: dict, log: Path, port: int, timeout: float = 240.0):
    """Start a scoring server in its own session; return it once GET /ping answers 200."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{cmd} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return proc
        time.sleep(0.5)
    _stop(proc)
    raise AssertionError(f"no answer on port {port} after {timeout}s:\n{log.read_text()[-4000:]}")


def _clean_env(**extra) -> dict:
    """This process's environment less MLflow/S3 settings, PYTHONPATH and this repository's
    virtualenv on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(CLIENT_ENV) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != BIN.resolve())
    env.update(extra)
    return env


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _post(port: int, body: dict, token: str | None = TOKEN) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"http://127.0.0.1:{port}/invocations", json=body, headers=headers,
                         timeout=120)


def _images_request(blobs: list[bytes]) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[_b64(b)] for b in blobs]}}


def _isvc(docs: list[dict]) -> dict:
    found = [d for d in docs if d.get("kind") == "InferenceService"]
    assert len(found) == 1, [d.get("kind") for d in docs]
    return found[0]


def _expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


# ----------------------------------------------------- a fresh environment from requirements
def serve_env(requirements: Path) -> Path:
    """A virtualenv holding exactly `pip install -r requirements` (this interpreter's base
    Python, no site packages, not this repository), built once per distinct requirements
    under CACHE; other such environments there are removed when a new one is built."""
    import fcntl
    text = requirements.read_text()
    key = hashlib.sha256(f"{sys.version}\n{text}".encode()).hexdigest()[:16]
    env_dir = CACHE / f"serve-env-{key}"
    done = env_dir / ".complete"
    if done.is_file():
        return env_dir
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "serve-env.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time, also across test runs
        if done.is_file():
            return env_dir
        for old in CACHE.glob("serve-env-*"):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(env_dir)], check=True, timeout=300)
        pip = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", "-r", str(requirements)],
                             capture_output=True, text=True, timeout=1800, env=_clean_env())
        if pip.returncode != 0:
            shutil.rmtree(env_dir, ignore_errors=True)
            lines = [ln for ln in (pip.stdout + pip.stderr).splitlines()
                     if not ln.startswith("WARNING: Location")]
            raise AssertionError("pip install -r the model's requirements failed:\n"
                                 + "\n".join(lines[-40:]))
        done.write_text(text)
    return env_dir


# ------------------------------------------------------------------------------- fixtures
def _write_images(folder: Path) -> dict[str, Path]:
    """Real image files of the kinds users send: 8-bit RGB PNG and JPEG, greyscale JPEG,
    16-bit greyscale PNG, RGBA PNG, 16-bit and float TIFF; sizes other than the model's."""
    import tifffile
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:48, 0:64]
    smooth = (np.sin(x / 7.0) * np.cos(y / 5.0) + 1) / 2
    rgb = np.stack([smooth, smooth[::-1], rng.random((48, 64))], -1)
    files = {"rgb.png": folder / "rgb.png", "photo.jpg": folder / "photo.jpg",
             "grey.jpg": folder / "grey.jpg", "grey16.png": folder / "grey16.png",
             "rgba.png": folder / "rgba.png", "micro16.tif": folder / "micro16.tif",
             "float.tif": folder / "float.tif"}
    Image.fromarray((rgb * 255).astype(np.uint8)).save(files["rgb.png"])
    Image.fromarray((rgb[::-1] * 255).astype(np.uint8)).save(files["photo.jpg"], quality=90)
    Image.fromarray((smooth * 255).astype(np.uint8)).save(files["grey.jpg"], quality=85)
    Image.fromarray((smooth.T * 65535).astype(np.uint16)).save(files["grey16.png"])
    rgba = np.concatenate([rgb, rng.random((48, 64, 1))], -1)
    Image.fromarray((rgba * 255).astype(np.uint8), "RGBA").save(files["rgba.png"])
    tifffile.imwrite(files["micro16.tif"], (rng.random((40, 40)) * 4095).astype(np.uint16))
    tifffile.imwrite(files["float.tif"], (rgb * 3.5 - 1).astype(np.float32), photometric="rgb")
    return files


@pytest.fixture(scope="module")
def champion(mlflow_server, tiny_model_dirs, tmp_path_factory):
    """A tiny model registered on the MLflow server (PostgreSQL + S3) and promoted to
    champion; the images to send; what `cladapter predict` says of them."""
    from cladapter_core import registry
    root = tmp_path_factory.mktemp("serving")
    name = f"serve-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        for var in [v for v in os.environ if v.startswith(CLIENT_ENV)]:
            mp.delenv(var)
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        mp.chdir(root)
        params = tracked_params(name)
        try:
            reg = registry.register(tiny_model_dirs[0], write_metrics(root / "eval", macro_f1=0.8),
                                    params)
            assert registry.promote(params)["decision"] == "promoted"
            import mlflow
            requirements = root / "requirements.txt"  # as the registry serves it
            shutil.copy(mlflow.pyfunc.get_model_dependencies(f"models:/{name}@champion"),
                        requirements)
        finally:
            reset_mlflow_globals()
    files = _write_images(root / "images")
    out = root / "predict.csv"
    run = subprocess.run([str(BIN / "cladapter"), "predict", "--model", str(tiny_model_dirs[0]),
                          *map(str, files.values()), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out, newline="") as fh:
        predicted = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert set(predicted) == set(files)
    return types.SimpleNamespace(name=name, version=reg["version"], uri=mlflow_server.uri,
                                 root=root, files=files, predicted=predicted,
                                 requirements=requirements, model_dir=tiny_model_dirs[0])


@pytest.fixture(scope="module")
def served(champion):
    """The scoring server for models:/<name>@champion in the fresh environment, started
    with the InferenceService's command, arguments and literal environment (host and port
    set to a loopback address after them; LIMITS added). The image has cladapter_core
    installed; here it comes from the model's own code/ folder, nothing of this checkout."""
    import mlflow
    env_dir = serve_env(champion.requirements)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", champion.uri)
        carried = Path(mlflow.artifacts.download_artifacts(
            f"models:/{champion.name}@champion", dst_path=str(champion.root / "carried"))) / "code"
        reset_mlflow_globals()
    assert (carried / "cladapter_core" / "serving" / "server.py").is_file()
    container = _isvc(list(yaml.safe_load_all(MANIFEST.read_text())))["spec"]["predictor"][
        "containers"][0]
    literal = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    literal["MODEL_URI"] = f"models:/{champion.name}@champion"
    port = free_port()
    cmd = [str(env_dir / "bin" / container["command"][0]), *container["command"][1:],
           *(_expand(a, literal) for a in container.get("args", [])),
           "--host", "127.0.0.1", "--port", str(port)]
    env = _clean_env(**{**{k: v for k, v in literal.items() if k != "TMPDIR"}, **LIMITS,
                        "MLFLOW_TRACKING_URI": champion.uri, "PYTHONPATH": str(carried)})
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"  # mlflow runs `uvicorn` from PATH
    log_dir = champion.root / "served"
    log_dir.mkdir()
    proc = _start(cmd, env, log_dir / "server.log", port)
    try:
        yield types.SimpleNamespace(port=port, env_dir=env_dir, cmd=cmd, log=log_dir / "server.log",
                                    pid=proc.pid, literal=literal)
    finally:
        _stop(proc)


def _assert_same_as_predict(rows: list[dict], names: list[str], predicted: dict) -> None:
    assert len(rows) == len(names)
    for row, name in zip(rows, names):
        want = predicted[name]
        assert row["label"] == want["predicted"], name
        got = [row[f"prob_{c}"] for c in CLASS_NAMES]
        np.testing.assert_allclose(got, [float(want[f"prob_{c}"]) for c in CLASS_NAMES],
                                   rtol=0, atol=1e-5, err_msg=name)
        assert abs(sum(got) - 1) < 1e-5


# ------------------------------------------------------------------------ the served model
def test_the_logged_model_carries_its_code_and_pinned_requirements(champion, served):
    reqs = [ln.strip() for ln in champion.requirements.read_text().splitlines() if ln.strip()]
    pinned = dict(ln.split("==") for ln in reqs)
    assert all("==" in ln for ln in reqs), reqs
    assert {"mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow",
            "tifffile"} <= set(pinned), reqs
    # The environment holds those requirements and nothing of this repository.
    py = str(served.env_dir / "bin" / "python")
    probe = subprocess.run([py, "-c", "import cladapter_core"], capture_output=True, text=True,
                           env=_clean_env(), cwd=champion.root, timeout=120)
    assert probe.returncode != 0 and "No module named 'cladapter_core'" in probe.stderr
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True,
                            text=True, env=_clean_env(), timeout=120)
    installed = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    assert "cladapter-core" not in installed
    for pkg, ver in pinned.items():
        assert installed[pkg.lower()].split("+")[0] == ver, pkg
    # What the server loaded: the model's own copy of the code, as models-from-code.
    import mlflow
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", champion.uri)
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{champion.name}@champion",
                                                         dst_path=str(champion.root / "dl")))
        reset_mlflow_globals()
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert mlmodel["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / "code" / "cladapter_core" / "serving" / "pyfunc.py").is_file()
    assert not list(local.rglob("*.pkl")), "nothing of the model is pickled"


def test_served_champion_answers_png_jpeg_and_tiff_like_cladapter_predict(champion, served):
    names = list(champion.files)
    blobs = [champion.files[n].read_bytes() for n in names]
    r = _post(served.port, _images_request(blobs))
    assert r.status_code == 200, r.text[:2000]
    _assert_same_as_predict(r.json()["predictions"], names, champion.predicted)
    # One image as a record: the same answer.
    r = _post(served.port, {"dataframe_records": [{"image": _b64(blobs[1])}]})
    assert r.status_code == 200, r.text[:2000]
    _assert_same_as_predict(r.json()["predictions"], [names[1]], champion.predicted)


def test_a_truncated_image_gets_a_clear_400_naming_its_row(champion, served):
    png, jpg = champion.files["rgb.png"].read_bytes(), champion.files["photo.jpg"].read_bytes()
    npy = io.BytesIO()
    np.save(npy, np.zeros((4, 8, 8), np.float32))
    rows = [_b64(png), _b64(png[: len(png) // 2]), _b64(jpg), _b64(b"hello world"),
            _b64(npy.getvalue()), "not base64!"]
    r = _post(served.port, {"dataframe_split": {"columns": ["image"], "data": [[x] for x in rows]}})
    assert r.status_code == 400, r.text[:2000]
    err = r.json()
    assert err["error_code"] == "INVALID_PARAMETER_VALUE"
    message = err["message"]
    assert "4 of 6 images cannot be used" in message and "nothing was predicted" in message
    assert re.search(r"row 1: .*truncated", message), message
    assert "row 3: not an image this model takes (PNG, JPEG, TIFF, BMP)" in message, message
    assert "row 4: a NumPy .npy file, but this model takes" in message, message
    assert "row 5: not valid base64" in message, message
    assert "row 0" not in message and "row 2" not in message
    assert "cladapter-serve-" not in message  # no server-side temporary paths
    # The whole request was refused; the good rows alone are answered.
    r = _post(served.port, _images_request([png, jpg]))
    assert r.status_code == 200
    _assert_same_as_predict(r.json()["predictions"], ["rgb.png", "photo.jpg"], champion.predicted)


def test_the_tensor_form_is_served_too(champion, served):
    import torch

    from cladapter_core import load_model
    batch = np.random.default_rng(3).random((3, 3, 32, 32), dtype=np.float32)
    r = _post(served.port, {"inputs": batch.tolist()})
    assert r.status_code == 200, r.text[:2000]
    model = load_model(champion.model_dir)
    cfg = model.config_dict()
    mean, std = torch.tensor(cfg["mean"]).view(1, -1, 1, 1), torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        want = torch.softmax(model((torch.from_numpy(batch) - mean) / std), dim=1).numpy()
    got = np.array([[row[f"prob_{c}"] for c in CLASS_NAMES] for row in r.json()["predictions"]])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    r = _post(served.port, {"inputs": (batch * 255).tolist()})
    assert r.status_code == 400 and "do not normalise the input" in r.json()["message"]


def test_cladapter_serve_says_which_version_serves_and_serves_it(champion, tmp_path):
    (tmp_path / "params.yaml").write_text(f"register:\n  model_name: {champion.name}\n")
    env = _clean_env(MLFLOW_TRACKING_URI=champion.uri)
    port = free_port()
    cmd = [str(BIN / "cladapter"), "serve", "--params", "params.yaml", "--port", str(port)]
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert (f"models:/{champion.name}@champion is {champion.name} version {champion.version}"
            in dry.stdout), dry.stdout
    assert f"serving models:/{champion.name}/{champion.version} on http://127.0.0.1:{port}" in dry.stdout
    assert "-m cladapter_core.serving.server --model-uri" in dry.stdout
    proc = _start(cmd, env, tmp_path / "serve.log", port)
    try:
        r = _post(port, _images_request([champion.files["photo.jpg"].read_bytes()]))
        assert r.status_code == 200, r.text[:2000]
        _assert_same_as_predict(r.json()["predictions"], ["photo.jpg"], champion.predicted)
    finally:
        _stop(proc)
    missing = subprocess.run(cmd + ["--dry-run", "--model-uri", f"models:/{champion.name}@nope"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert missing.returncode == 2 and "has no alias 'nope'" in missing.stderr


def test_the_promotion_lock_is_no_registered_model(champion):
    from mlflow import MlflowClient

    from cladapter_core import registry
    client = MlflowClient(tracking_uri=champion.uri)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", champion.uri)
        with registry.promotion_lock(champion.name) as owner:
            models = {m.name for m in client.search_registered_models(max_results=1000)}
            assert champion.name in models
            assert not [m for m in models if "lock" in m], models
            exp = client.get_experiment_by_name(registry.LOCK_EXPERIMENT)
            runs = client.search_runs([exp.experiment_id],
                                      f"tags.`{registry.LOCK_FOR_TAG}` = '{champion.name}'")
            assert len(runs) == 1
            params = runs[0].data.params
            slot = max(int(k.split(".")[1]) for k in params if k.startswith("lock."))
            assert params[f"lock.{slot}"].startswith(owner) and f"release.{slot}" not in params
        params = client.get_run(runs[0].info.run_id).data.params
        assert params[f"release.{slot}"] == owner
        reset_mlflow_globals()


# --------------------------------------------------------------------------- hostile requests
def _peak_kb(pid: int) -> int:
    """The largest peak RSS (VmHWM) of the server process and its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, peak = [pid], 0
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return peak


def test_an_oversized_request_gets_413_and_the_server_stays_up(champion, served):
    url = f"http://127.0.0.1:{served.port}/invocations"
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    limit = int(LIMITS["CLADAPTER_SERVE_MAX_BYTES"])
    before = _peak_kb(served.pid)
    body = json.dumps(_images_request([b"\0" * limit])).encode()   # declared: refused unread
    r = requests.post(url, data=body, headers=auth, timeout=120)
    assert r.status_code == 413, r.text[:500]
    assert r.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert f"over the limit of {limit:,} bytes (CLADAPTER_SERVE_MAX_BYTES)" in r.json()["message"]
    chunks = (b"x" * 2**16 for _ in range(limit // 2**16 + 2))       # chunked: no length to read
    r = requests.post(url, data=chunks, headers=auth, timeout=120)
    assert r.status_code == 413, r.text[:500]
    assert _peak_kb(served.pid) - before < 100 * 1024
    png = champion.files["rgb.png"].read_bytes()                    # still up, still right
    assert requests.get(f"http://127.0.0.1:{served.port}/ping", timeout=10).status_code == 200
    r = _post(served.port, _images_request([png]))
    assert r.status_code == 200, r.text[:2000]
    _assert_same_as_predict(r.json()["predictions"], ["rgb.png"], champion.predicted)


def test_too_many_rows_get_a_clear_400_and_a_missing_token_401(champion, served):
    png = champion.files["rgb.png"].read_bytes()
    rows = int(LIMITS["CLADAPTER_SERVE_MAX_ROWS"])
    r = _post(served.port, _images_request([png] * (rows + 1)))
    assert r.status_code == 400, r.text[:500]
    assert r.json()["message"] == (f"{rows + 1} rows in one request, more than {rows} "
                                   f"(CLADAPTER_SERVE_MAX_ROWS); send them in requests of at most {rows} rows")
    r = _post(served.port, {"inputs": np.zeros((rows + 1, 3, 32, 32)).tolist()})
    assert r.status_code == 400 and "rows in one request" in r.json()["message"]
    assert _post(served.port, _images_request([png] * rows)).status_code == 200
    for token in (None, "wrong"):
        r = _post(served.port, _images_request([png]), token=token)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text[:500]
    for path in ("/ping", "/health"):  # the probes need no token
        assert requests.get(f"http://127.0.0.1:{served.port}{path}", timeout=10).status_code == 200


def test_error_bodies_carry_no_traceback_nor_the_request(served):
    url = f"http://127.0.0.1:{served.port}/invocations"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # Parquet that is not: MLflow's own error carries `stack_trace`; bad JSON echoes the body.
    for body, content_type in ((b"PAR1 not parquet", "application/vnd.apache.parquet"),
                               (b'{"dataframe_split": secret-request-text', "application/json")):
        r = requests.post(url, data=body, headers={**auth, "Content-Type": content_type}, timeout=60)
        assert r.status_code == 400, r.text[:500]
        err = r.json()
        assert set(err) <= {"error_code", "message", "sqlstate", "error_class"}, err
        assert "Traceback" not in r.text and "site-packages" not in r.text and ".py" not in r.text
        assert "secret-request-text" not in r.text
    r = _post(served.port, _images_request([b"GIF89a not an image"]))
    assert r.status_code == 400 and "Failed to predict data" not in r.json()["message"]


def test_decompression_bombs_get_a_400_without_their_memory(champion, served, tmp_path):
    png = champion.files["rgb.png"].read_bytes()
    assert _post(served.port, _images_request([png])).status_code == 200  # a warm worker
    limit = int(served.literal["CLADAPTER_MAX_IMAGE_PIXELS"])
    for bomb, kind in ((png_bomb(tmp_path / "b.png"), "image"),
                       (tiff_bomb(tmp_path / "b.tif"), "TIFF")):
        before = _peak_kb(served.pid)
        r = _post(served.port, _images_request([png, bomb.read_bytes()]))
        grew = _peak_kb(served.pid) - before
        assert r.status_code == 400, r.text[:500]
        assert (f"row 1: {kind} of 13,500 x 13,500 = 182,250,000 pixels, over the limit of "
                f"{limit:,} (CLADAPTER_MAX_IMAGE_PIXELS)") in r.json()["message"], r.text[:1000]
        assert grew < 100 * 1024, f"{bomb.name}: the worker's peak grew {grew / 1024:.0f} MB"


# ------------------------------------------------------------------------------ the manifest
def kserve_models():
    """`kserve.models` of the published KServe SDK (the wheel from PyPI, unpacked once into
    CACHE), imported without the SDK's package __init__, which would start importing its
    model server's dependencies; the models need only six and urllib3."""
    root = CACHE / f"kserve-sdk-{KSERVE_SDK}"
    if not (root / "kserve" / "models" / "__init__.py").is_file():
        wheels = CACHE / f"kserve-sdk-{KSERVE_SDK}.download"
        shutil.rmtree(wheels, ignore_errors=True)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                              "--only-binary=:all:", "-d", str(wheels), f"kserve=={KSERVE_SDK}"],
                             capture_output=True, text=True, timeout=600)
        if got.returncode != 0:
            pytest.fail(f"pip download kserve=={KSERVE_SDK} failed:\n{got.stderr[-2000:]}")
        part = CACHE / f"kserve-sdk-{KSERVE_SDK}.part"
        shutil.rmtree(part, ignore_errors=True)
        with zipfile.ZipFile(next(wheels.glob("kserve-*.whl"))) as whl:
            whl.extractall(part)
        shutil.rmtree(root, ignore_errors=True)
        part.rename(root)
        shutil.rmtree(wheels, ignore_errors=True)
    if "kserve" not in sys.modules:
        pkg = types.ModuleType("kserve")
        pkg.__path__ = [str(root / "kserve")]
        sys.modules["kserve"] = pkg
    import kserve.models
    return kserve.models


def _api_class(type_name: str):
    import kubernetes.client.models as k8s
    return getattr(kserve_models(), type_name, None) or getattr(k8s, type_name, None)


def api_problems(value, type_name: str, path: str = "") -> list[str]:
    """Every way `value` (parsed YAML) departs from the OpenAPI type `type_name` of the
    KServe SDK / Kubernetes client: unknown fields, wrong types, missing required fields."""
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [p for i, v in enumerate(value) for p in api_problems(v, m[1], f"{path}[{i}]")]
    m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
    if m:
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        return [p for k, v in value.items() for p in api_problems(v, m[1], f"{path}.{k}")]
    plain = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}
    if type_name in plain:
        ok = isinstance(value, plain[type_name]) and not (type_name != "bool" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if type_name == "object":
        return []
    cls = _api_class(type_name)
    if cls is None:
        return [f"{path}: no API type {type_name} to check against"]
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping, got {type(value).__name__}"]
    by_json = {j: a for a, j in cls.attribute_map.items()}
    problems = [f"{path}.{k}: unknown field of {type_name}" for k in value if k not in by_json]
    for key, v in value.items():
        if key in by_json:
            problems += api_problems(v, cls.openapi_types[by_json[key]], f"{path}.{key}")
    try:  # the generated constructors refuse a missing required field
        cls(**{by_json[k]: v for k, v in value.items() if k in by_json})
    except (ValueError, TypeError) as e:
        problems.append(f"{path}: {e}")
    return problems


def validate_inference_service(doc: dict) -> list[str]:
    """KServe's API types for the whole object; Kubernetes' Pod schema (strict, 1.29) for
    the predictor's pod part. Returns the problems (empty: valid)."""
    import kubernetes.client.models as k8s
    import kubernetes_validate
    problems = api_problems(doc, "V1beta1InferenceService", "InferenceService")
    predictor = doc.get("spec", {}).get("predictor", {})
    pod_fields = set(k8s.V1PodSpec.attribute_map.values())
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {k: v for k, v in predictor.items() if k in pod_fields}}
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        problems.append(f"predictor pod spec: {e.message} at {list(e.path)}")
    return problems


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[dict]:
    kubectl = BIN / "kubectl"
    out = subprocess.run([str(kubectl if kubectl.is_file() else shutil.which("kubectl")),
                          "kustomize", str(SERVING)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_the_inference_service_renders_and_validates(rendered):
    import kubernetes_validate
    assert sorted(d["kind"] for d in rendered) == ["InferenceService", "NetworkPolicy", "ServiceAccount"]
    for doc in rendered:
        assert doc["metadata"]["namespace"] == "cladapter"
        if doc["kind"] != "InferenceService":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    isvc = _isvc(rendered)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert validate_inference_service(isvc) == []


@pytest.mark.parametrize("breakage, expected", [
    (lambda p: p.update(minReplica=1), r"predictor\.minReplica: unknown field"),
    (lambda p: p.update(maxReplicas="2"), r"maxReplicas: expected int"),
    (lambda p: p["containers"][0].update(imagePullPolicy=["Always"]), r"imagePullPolicy: expected str"),
    (lambda p: p["containers"][0].pop("name"), r"containers\[0\]: .*`name`"),
    (lambda p: p["containers"][0]["ports"][0].update(containerPort="http"), r"containerPort"),
    (lambda p: p["containers"][0]["resources"].update(limit={"cpu": "1"}), r"resources\.limit: unknown"),
])
def test_the_validator_refuses_broken_inference_services(rendered, breakage, expected):
    import copy
    broken = copy.deepcopy(_isvc(rendered))
    breakage(broken["spec"]["predictor"])
    problems = validate_inference_service(broken)
    assert any(re.search(expected, p) for p in problems), problems


def test_the_inference_service_pins_a_version_and_runs_safely(rendered):
    isvc = _isvc(rendered)
    pred = isvc["spec"]["predictor"]
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container"
    image, _, tag = c["image"].rpartition(":")
    assert image == IMAGE_REPO and re.fullmatch(r"\d+\.\d+\.\d+", tag)
    # The version that serves: pinned, the same in the env and the annotation, of the
    # registered model params.yaml names; the runbook's patch replaces env[0].
    model = yaml.safe_load((REPO / "params.yaml").read_text())["register"]["model_name"]
    assert c["env"][0]["name"] == "MODEL_URI"
    uri = c["env"][0]["value"]
    assert re.fullmatch(rf"models:/{re.escape(model)}/\d+", uri), uri
    assert isvc["metadata"]["annotations"]["cladapter.io/model-uri"] == uri
    # MLflow's scoring server behind the limits on the container port, probed on its health paths.
    assert c["command"] == ["python", "-m", "cladapter_core.serving.server"]
    args = dict(a.lstrip("-").split("=", 1) for a in c["args"])
    assert args["model-uri"] == "$(MODEL_URI)"
    assert int(args["port"]) == c["ports"][0]["containerPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in ("/ping", "/health")
        assert c[probe]["httpGet"]["port"] in (c["ports"][0]["name"], c["ports"][0]["containerPort"])
    # Credentials only from the Secret the overlays make, with keys it has.
    for overlay in ("dev", "prod"):
        template = REPO / "infra" / "k8s" / "overlays" / overlay / "secrets" / "mlflow.env.example"
        keys = {ln.split("=", 1)[0] for ln in template.read_text().splitlines()
                if ln and not ln.startswith("#")}
        refs = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e
                and e["name"] != "CLADAPTER_SERVE_TOKEN"]
        assert refs and all(r["name"] == "cladapter-mlflow" and r["key"] in keys for r in refs)
    assert not [e for e in c["env"] if "value" in e and re.search("PASSWORD|SECRET|TOKEN", e["name"])]
    # Unprivileged, bounded.
    assert pred["securityContext"]["runAsNonRoot"] is True and pred["automountServiceAccountToken"] is False
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    writable = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/home/cladapter"} <= writable


def _replace(doc: dict, pointer: str, value) -> None:
    """JSON Patch `replace` (RFC 6902) at a JSON Pointer (RFC 6901): the path must exist."""
    *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
    for token in parents:
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    if isinstance(doc, list):
        assert int(last) < len(doc), pointer
        doc[int(last)] = value
    else:
        assert last in doc, pointer
        doc[last] = value


def test_the_runbook_shows_how_a_promotion_reaches_serving(rendered):
    import copy
    text = (REPO / "infra" / "README.md").read_text()
    section = text.split("From promotion to serving", 1)
    assert len(section) == 2, "infra/README.md: no section 'From promotion to serving'"
    body = section[1].split("\n## ", 1)[0]
    env_path, note_path = ("/spec/predictor/containers/0/env/0/value",
                           "/metadata/annotations/cladapter.io~1model-uri")
    for needed in ("cladapter promote", "cladapter lineage models:/cladapter-demo@champion",
                   "kubectl apply -k infra/k8s/serving", env_path, note_path,
                   "kubectl -n cladapter get inferenceservice cladapter", "cladapter serve"):
        assert needed in body, needed
    # The runbook's patch lands where the version is, and leaves a valid object.
    isvc = copy.deepcopy(_isvc(rendered))
    for pointer in (env_path, note_path):
        _replace(isvc, pointer, "models:/cladapter-demo/7")
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["env"][0] == {"name": "MODEL_URI", "value": "models:/cladapter-demo/7"}
    assert isvc["metadata"]["annotations"]["cladapter.io/model-uri"] == "models:/cladapter-demo/7"
    assert validate_inference_service(isvc) == []


def test_the_predictor_is_cluster_local_fenced_and_limited(rendered):
    isvc = _isvc(rendered)
    assert isvc["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    (policy,) = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    # KServe's labels on the predictor's pods: the InferenceService's name and the component.
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"], "component": "predictor"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    c = isvc["spec"]["predictor"]["containers"][0]
    assert [p["port"] for p in rule["ports"]] == [c["ports"][0]["containerPort"]]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"cladapter.io/serving-client": "true"}}}]
    env = {e["name"]: e for e in c["env"]}
    for name in ("CLADAPTER_SERVE_MAX_BYTES", "CLADAPTER_SERVE_MAX_ROWS", "CLADAPTER_MAX_IMAGE_PIXELS"):
        assert int(env[name]["value"]) > 0, name
    token = env["CLADAPTER_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "cladapter-serving", "key": "token", "optional": True}
    docs = (REPO / "docs" / "serving.md").read_text()
    assert "kubectl -n cladapter create secret generic cladapter-serving" in docs
