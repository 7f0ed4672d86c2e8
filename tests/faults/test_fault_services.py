"""Services failing under a running stage: the MLflow server going away during training
(and coming back, or not), the S3 endpoint going away, two promotions at once."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faultkit import REPLAY, base_env, fault_stages, read_json, tail
from fixtures_services import _stop, _wait_http
from helpers import BIN, free_port


class MlflowServer:
    """`mlflow server` on loopback (SQLite backend, proxied local artifacts) that a test
    stops and starts again on the same port and store, as a restarted pod would."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = self.folder / "server.log"
        env = base_env()  # job runner off: it is not used and starts many processes
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts"), "--serve-artifacts"]
        with open(log, "a") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.folder, start_new_session=True)
        _wait_http(self.uri + "/health", self.proc, log)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def client(self):
        from mlflow import MlflowClient
        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="module")
def restartable_mlflow(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_outage"))
    server.start()
    yield server
    server.stop()


class Watched:
    """A stage process whose merged output is read as it comes, paused and resumed at will."""

    def __init__(self, stage, *extra):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cladapter_core.cli", *stage.argv, *extra], cwd=stage.cwd,
            env=stage.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                       daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, what: str, check=None, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not (what in self.output and (check is None or check())):
            assert self.proc.poll() is None, f"ended before {what!r}:\n{tail(self.output)}"
            assert time.monotonic() < deadline, f"no {what!r} after {timeout}s"
            time.sleep(0.1)

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(30)
        return code


def _logged_steps(server, run_id: str | None, key: str = "train_loss") -> list[int]:
    if run_id is None:
        return []
    return sorted(m.step for m in server.client().get_metric_history(run_id, key))


# MLflow's own HTTP retries (7, with backoff up to minutes) would hold each call until the
# server is back; with none, the outage reaches the epoch logger, which is what is tested.
NO_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "CLADAPTER_TRACKING": "1"}


def test_mlflow_outage_during_training_metrics_reach_the_server_once_it_is_back(
        reference, restartable_mlflow):
    mlflow_server = restartable_mlflow
    mlflow_server.start()
    known = {r.info.run_id for r in _all_runs(mlflow_server)}
    stage = fault_stages(reference, "f_mlflow_back", MLFLOW_TRACKING_URI=mlflow_server.uri,
                         **NO_HTTP_RETRIES).train1
    proc = Watched(stage, "--set=stage1.epochs=3")
    run_id = {}

    def epoch1_logged():
        run_id["id"] = run_id.get("id") or _single_run(mlflow_server, exclude=known)
        return 1 in _logged_steps(mlflow_server, run_id["id"])

    proc.wait_for("epoch 1:", epoch1_logged)
    proc.pause()                      # hold training while the server goes away
    mlflow_server.stop()
    proc.resume()
    proc.wait_for("MLflow logging to")  # epoch 2's metrics failed: kept, training goes on
    proc.pause()
    mlflow_server.start()             # same port, same store
    proc.resume()
    assert proc.finish() == 0, tail(proc.output)

    history = read_json(stage.cwd / "stage1" / "history.json")
    client = mlflow_server.client()
    for key in ("train_loss", "val_loss", "val_macro_f1", "lr"):
        logged = {m.step: m.value for m in client.get_metric_history(run_id["id"], key)}
        assert logged == pytest.approx({r["epoch"]: r[key] for r in history}), (key, REPLAY)
    assert client.get_run(run_id["id"]).info.status == "FINISHED"


def test_mlflow_down_until_training_ends_fails_the_stage_clearly(reference, restartable_mlflow):
    mlflow_server = restartable_mlflow
    mlflow_server.start()
    known = {r.info.run_id for r in _all_runs(mlflow_server)}
    stage = fault_stages(reference, "f_mlflow_gone", MLFLOW_TRACKING_URI=mlflow_server.uri,
                         **NO_HTTP_RETRIES).train1
    proc = Watched(stage)
    proc.wait_for("epoch 1:", lambda: 1 in _logged_steps(
        mlflow_server, _single_run(mlflow_server, exclude=known)))
    proc.pause()
    mlflow_server.stop()
    proc.resume()
    code = proc.finish()
    out = proc.output
    assert code == 2, tail(out)
    assert re.search(r"metric values .*could not be logged", out), tail(out)
    assert mlflow_server.uri in out and "Traceback" not in out, tail(out)


def _all_runs(server):
    client = server.client()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _single_run(server, exclude=frozenset()) -> str | None:
    """The training stage run this test started (the only new one)."""
    runs = [r for r in _all_runs(server)
            if r.data.tags.get("stage") == "train_stage1" and r.info.run_id not in exclude
            and r.info.status == "RUNNING"]
    return runs[0].info.run_id if len(runs) == 1 else None


# -- S3 --------------------------------------------------------------------------------
def test_s3_errors_are_retried_with_backoff_then_reported(tmp_path, monkeypatch, caplog):
    """A checkpoint on an S3-compatible server that then goes away: the download is retried
    (weights.s3_client: botocore's standard mode, 5 retries after random delays of
    exponentially growing bounds), then a ModelError names the URI."""
    import boto3
    import torch
    from safetensors.torch import save_file

    from cladapter_core.errors import ModelError
    from cladapter_core.model.weights import read_state_dict, s3_client

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(tmp_path / "moto.log", "w") as log:
        moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(endpoint + "/moto-api/", moto, tmp_path / "moto.log", timeout=60)
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        save_file({"w": torch.arange(4.0)}, str(tmp_path / "w.safetensors"))
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="weights")
        s3.upload_file(str(tmp_path / "w.safetensors"), "weights", "w.safetensors")
        assert torch.equal(read_state_dict("s3://weights/w.safetensors")["w"], torch.arange(4.0))
    finally:
        _stop(moto)

    caplog.set_level(logging.DEBUG, logger="botocore.retries")
    with pytest.raises(ModelError, match=r"cannot download weights s3://weights/w\.safetensors"
                                         r".*Could not connect to the endpoint"):
        read_state_dict("s3://weights/w.safetensors")
    delays = [float(m.group(1)) for m in (
        re.search(r"retrying request after delay of: ([\d.e-]+)", r.getMessage())
        for r in caplog.records) if m]
    attempts = s3_client().meta.config.retries["total_max_attempts"]  # the first try + retries
    assert attempts >= 4 and len(delays) == attempts - 1 and all(d > 0 for d in delays), delays
    assert any(f"Max attempts of {attempts} reached" in r.getMessage() for r in caplog.records)


# -- two promotions at once ----------------------------------------------------------------
def test_two_promote_commands_at_once_leave_one_champion_the_better_and_both_report(
        tmp_path, tiny_model_dirs, clean_mlflow_env):
    """Two `cladapter promote` processes on the embedded SQLite store (the demo's); the
    same race against an mlflow server + PostgreSQL is tests/test_registry.py's."""
    from mlflow import MlflowClient

    from cladapter_core import registry
    from fixtures_services import tracked_params, write_metrics
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clean_mlflow_env.setenv("MLFLOW_TRACKING_URI", uri)
    clean_mlflow_env.chdir(tmp_path)
    name = "race"
    for i, f1 in enumerate((0.7, 0.9)):  # no champion yet: each promote alone would win
        registry.register(tiny_model_dirs[i], write_metrics(tmp_path / f"e{i}", macro_f1=f1),
                          tracked_params(name))
    (tmp_path / "params.yaml").write_text(f"register:\n  model_name: {name}\n")
    env = base_env(MLFLOW_TRACKING_URI=uri)
    procs = [subprocess.Popen([sys.executable, "-m", "cladapter_core.cli", "promote", "--params",
                               "params.yaml", "--version", str(v), "--out", f"promote{v}.json"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for v in (1, 2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    client = MlflowClient(tracking_uri=uri)
    holders = [v for v in (1, 2) if "champion" in client.get_model_version(name, str(v)).aliases]
    assert holders == [2]
    worse, better = (read_json(tmp_path / f"promote{v}.json") for v in (1, 2))
    assert better["decision"] == "promoted" and better["champion_after"] == 2
    # Whoever took the lock second compared against what the first left.
    assert (worse["decision"], worse["champion_after"]) in (("rejected", 2), ("promoted", 1))
    if worse["decision"] == "promoted":
        assert better["champion_before"] == 1
    for out, res in zip(outs, (worse, better)):  # each command says what it did
        assert f"promotion of {name} v{res['candidate']}" in out and res["decision"] in out
        assert "champion is now: v" in out
