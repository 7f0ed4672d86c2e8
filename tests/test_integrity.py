"""The integrity of registered models: every file of the logged model is recorded at
registration, and every load from the registry (predict/evaluate/promote through
`resolve_model`, `cladapter serve`, `cladapter verify-model`) checks its download against
that record before any of the model's code runs. The attack of the finding, for real: a
model_code.py with an injected line PUT into the artifact store (S3 behind an mlflow server
with PostgreSQL), which MLflow's own loader runs."""
import subprocess
import uuid

import numpy as np
import pytest

from cladapter_core import cli, identity, registry, tracking
from cladapter_core.errors import TrackingError
from cladapter_core.registry import integrity
from cladapter_core.serving import pyfunc as serving
from fixtures_services import CLASS_NAMES, s3_client, tracked_params, write_metrics


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Store:
    """The files of one logged model in the S3 bucket behind the mlflow server."""

    def __init__(self, s3, model_id: str):
        self.s3, self.bucket = s3_client(s3), s3.bucket
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="mlflow/", MaxKeys=1000)["Contents"]
        marker = f"/models/{model_id}/artifacts/"
        self.prefix = next(o["Key"] for o in listed if marker in o["Key"]).split(marker)[0] + marker
        self.original = {}

    def read(self, rel: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + rel)["Body"].read()

    def write(self, rel: str, data: bytes) -> None:
        self.original.setdefault(rel, self.read(rel) if self.exists(rel) else None)
        self.s3.put_object(Bucket=self.bucket, Key=self.prefix + rel, Body=data)

    def delete(self, rel: str) -> None:
        self.original.setdefault(rel, self.read(rel))
        self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + rel)

    def exists(self, rel: str) -> bool:
        return self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + rel)["KeyCount"] > 0

    def restore(self) -> None:
        for rel, data in self.original.items():
            if data is None:
                self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + rel)
            else:
                self.s3.put_object(Bucket=self.bucket, Key=self.prefix + rel, Body=data)
        self.original.clear()


def test_a_file_rewritten_in_the_artifact_store_is_refused_before_any_code_runs(
        remote_mlflow, tiny_model_dirs, tmp_path, capsys):
    import mlflow
    name = _name("tamper")
    params = tracked_params(name)
    reg = registry.register(tiny_model_dirs[0], write_metrics(tmp_path / "e", macro_f1=0.8), params)
    assert registry.promote(params)["decision"] == "promoted"
    uri = f"models:/{name}@champion"
    store = Store(remote_mlflow.s3, reg["source"].rpartition("/")[2])
    weights = "artifacts/model0/model.safetensors"
    assert store.read(weights) == (tiny_model_dirs[0] / "model.safetensors").read_bytes()
    caches = iter(tmp_path / f"cache{i}" for i in range(100))  # a fresh download each time

    def refused(*names: str):
        with pytest.raises(TrackingError) as err:
            registry.resolve_model(uri, cache_dir=next(caches))
        message = str(err.value)
        assert f"models:/{name}/1: not loaded: its files differ from those recorded" in message
        for n in names:
            assert n in message, message
        return message

    # The finding: a line injected into the code MLflow runs when it loads the model.
    marker = tmp_path / "injected-code-ran"
    store.write("model_code.py", store.read("model_code.py") + f"\nopen({str(marker)!r}, 'w')\n".encode())
    assert refused("changed: model_code.py").count("changed:") == 1
    remote_mlflow.monkeypatch.setenv(registry.MODEL_CACHE_ENV, str(tmp_path / "cli-cache"))
    assert cli.main(["verify-model", uri]) == 2
    assert "changed: model_code.py" in capsys.readouterr().err
    assert cli.main(["serve", "--model-uri", uri, "--dry-run"]) == 2
    assert "changed: model_code.py" in capsys.readouterr().err
    assert not marker.exists()  # refused before anything of the model ran
    mlflow.pyfunc.load_model(uri)  # MLflow's own loader, which checks nothing, runs it
    assert marker.exists()
    store.restore()

    # MLmodel and the weights rewritten, a file added to the carried code, one removed.
    store.write("MLmodel", store.read("MLmodel").replace(b"streamable: false", b"streamable: true"))
    store.write(weights, (tiny_model_dirs[1] / "model.safetensors").read_bytes())
    store.write("code/cladapter_core/sitecustomize.py", b"import os\n")
    store.delete("requirements.txt")
    message = refused(f"changed: MLmodel, {weights}", "added: code/cladapter_core/sitecustomize.py",
                      "removed: requirements.txt")
    assert "register the model again" in message
    store.restore()

    # Unchanged: it loads, predicts as the folder it was registered from, and verifies.
    folder, mv = registry.resolve_model(uri, cache_dir=tmp_path / "good")
    assert mv["version"] == 1 and identity.content_hash(folder) == identity.content_hash(tiny_model_dirs[0])
    out = tmp_path / "verified"
    assert cli.main(["verify-model", uri, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"{uri} is {name} version 1: its" in said and f"verified copy: {out}" in said
    batch = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    got = mlflow.pyfunc.load_model(str(out)).predict(batch)
    assert len(got) == 2 and set(got["label"]) <= set(CLASS_NAMES)
    assert cli.main(["verify-model", uri, "--out", str(out)]) == 2  # never over an existing copy
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_the_record_covers_every_file_and_is_what_sha256sum_checks(embedded_mlflow, tiny_model_dirs,
                                                                  tmp_path, capsys):
    import mlflow
    name = _name("record")
    params = tracked_params(name)
    reg = registry.register(tiny_model_dirs[2], write_metrics(tmp_path / "e", macro_f1=0.7), params)
    tags = reg["tags"]
    manifest = mlflow.artifacts.download_artifacts(run_id=reg["run_id"], artifact_path=tags[registry.MANIFEST_TAG],
                                                   dst_path=str(tmp_path))
    text = open(manifest).read()
    files = integrity.parse(text, manifest)
    assert integrity.digest(files) == tags[registry.DIGEST_TAG]
    for rel in ("MLmodel", "model_code.py", "requirements.txt", "conda.yaml", "python_env.yaml",
                "artifacts/model2/model.safetensors", "artifacts/model2/config.json",
                "code/cladapter_core/serving/pyfunc.py", "code/cladapter_core/serving/model_code.py"):
        assert rel in files, sorted(files)
    assert "registered_model_meta" not in files  # written by the MLflow client at each download

    embedded_mlflow.monkeypatch.setenv(registry.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    local, mv = registry.verified_model(f"models:/{name}/1")
    assert mv["version"] == 1 and (local / "registered_model_meta").is_file()
    check = subprocess.run(["sha256sum", "--strict", "-c", manifest], cwd=local, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(files), check.stdout + check.stderr
    assert identity.content_hash(serving.model_dir_in(local)) == reg["tags"]["model_hash"]
    # `serve` serves that verified copy: the server downloads nothing itself.
    assert cli.main(["serve", "--model-uri", f"models:/{name}/1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"verified copy: {local}" in out and f"--model-uri {local}" in out
    assert f"serving models:/{name}/1 on http://" in out

    # Bytecode a server wrote into the copy's code/ is dropped, not taken for a change.
    stamp = (local / "MLmodel").stat().st_mtime_ns
    pyc = local / "code" / "cladapter_core" / "__pycache__" / "pyfunc.cpython-311.pyc"
    pyc.parent.mkdir()
    pyc.write_bytes(b"\x00" * 16)
    assert registry.verified_model(f"models:/{name}/1")[0] == local and not pyc.parent.exists()
    assert (local / "MLmodel").stat().st_mtime_ns == stamp  # not downloaded again
    # A changed cached copy is not used: it is downloaded again, and verified.
    (local / "model_code.py").write_text("raise SystemExit('changed in the cache')\n")
    again, _ = registry.verified_model(f"models:/{name}/1")
    assert again == local and "set_model(CLAdapterPyfunc())" in (local / "model_code.py").read_text()


def test_a_version_without_a_record_is_not_loaded(embedded_mlflow, tiny_model_dirs, tmp_path):
    """Registered by hand (or by a cladapter before the record existed): refused, saying so."""
    import mlflow
    name = _name("norecord")
    with tracking.stage_run(tracked_params(name), "register"):
        uri = tracking.log_model(tiny_model_dirs[1])
    mlflow.register_model(uri, name)
    with pytest.raises(TrackingError, match=rf"models:/{name}/1: no integrity record \(version tag "
                                            r"integrity\.sha256\).*not loaded"):
        registry.resolve_model(f"models:/{name}/1", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob(f"{name}*"))
