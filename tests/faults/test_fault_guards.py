"""Guards that keep a wrong model or someone else's code out: a diverging run stops with a
clear error and registers nothing; pickled code in a checkpoint or weights file is refused,
never run; no credentials in the repository."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faultkit import FLAGS, REPO, base_env, tail


def _train(prepared, out, env, *more, cwd):
    (cwd / "empty.yaml").write_text("")
    return subprocess.run(
        [sys.executable, "-m", "cladapter_core.cli", "train", "--params", "empty.yaml", "--stage",
         "1", "--prepared", str(prepared), "--out", str(out), *FLAGS,
         *(f"--set={o}" for o in more)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_diverging_training_stops_with_a_clear_error_and_nothing_is_registered(
        prepared, tmp_path, mlflow_sqlite):
    """One huge step on the only batch: the training loss was finite, the weights that come
    out are not usable - the validation loss is NaN. The stage fails (exit 2), writes no
    model, its MLflow run is FAILED, and the registry stays empty. (A non-finite training
    loss mid-epoch: tests/test_train.py::test_non_finite_loss_stops_with_clear_error.)"""
    from mlflow import MlflowClient
    shutil.copy(mlflow_sqlite.pristine, tmp_path / "mlflow.db")  # an empty, initialised store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = base_env(MLFLOW_TRACKING_URI=uri, CLADAPTER_TRACKING="1")
    res = _train(prepared, tmp_path / "model", env, "train.lr=1.0e+30", "train.grad_clip=0",
                 "train.warmup_epochs=0", "train.batch_size=128", "stage1.epochs=1",
                 cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2, tail(out)
    assert re.search(r"non-finite validation loss .*stage 1, epoch 1.*train\.lr", out), tail(out)
    assert "Traceback" not in out
    assert not (tmp_path / "model").exists()
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.stage = 'train_stage1'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_registered_models() == []


class _CreatesAFile:
    """Unpickling this runs code: `open(path, "w")` creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_code_in_a_checkpoint_or_weights_file_is_refused_not_run(prepared, tmp_path):
    """The trainer's checkpoint beside its output and backbone weights are read with
    torch.load(weights_only=True) (or as safetensors): a file that runs code when
    unpickled is refused, and the code never runs."""
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": _CreatesAFile(marker)}, "fingerprint": "x"}, evil)
    torch.load(evil, weights_only=False)  # the file really runs code when unpickled...
    assert marker.exists()
    marker.unlink()
    env = base_env()

    # ...as a checkpoint found beside the output (a retried pod's restored checkpoint)
    ckpt = tmp_path / "model.ckpt"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(evil.read_bytes())
    res = _train(prepared, tmp_path / "model", env, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2 and "Traceback" not in out, tail(out)
    assert re.search(r"checkpoint .*last\.pt.*refused", out), tail(out)
    assert not marker.exists() and not (tmp_path / "model").exists()
    # ...and as backbone weights: tests/test_model.py::test_pickled_code_is_refused
    from cladapter_core.errors import ModelError
    from cladapter_core.model.weights import read_state_dict
    with pytest.raises(ModelError, match="refused or unreadable"):
        read_state_dict(evil)
    assert not marker.exists()


# -- secrets ---------------------------------------------------------------------------------
# Built from parts, so that this file does not match its own patterns.
_KEY = "PRIVATE" + " KEY-----"
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(
        r"(?i)aws_secret_access_key['\"]?\s*[:=]\s*['\"]?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )*" + re.escape(_KEY)),
    "GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    "password in a URI": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^@\s'\"/]+)@"),
    "credential assigned": re.compile(
        r"(?i)\b[a-z_]*(?:password|passwd|secret_access_key|secret_key|api_key|apikey"
        r"|access_token|auth_token)['\"]?\s*[:=]\s*['\"]([^'\"]+)['\"]"),
}
# Placeholders, and the obviously fake values tests use to check refusals and redaction.
ALLOWED = {"REPLACE_ME", "PASSWORD", "password", "***", "testing", "setup", "wrong", "secret", "hunter2",
           "AKIAWRONGWRONGWRONG0"}
# A line that holds a fake credential on purpose (a redaction test's input, a psql variable)
# says so, as detect-secrets' marker does; the scan skips that line only.
MARKER = "pragma: allowlist " + "secret"


def secret_findings(name: str, text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if MARKER in line:
            continue
        for what, pattern in SECRET_PATTERNS.items():
            for m in pattern.finditer(line):
                value = m.group(m.lastindex or 0)
                if value in ALLOWED or value.startswith(("$", "<", "{")):
                    continue
                found.append(f"{name}:{number}: {what}: {line.strip()[:120]}")
    return found


def test_no_secret_in_the_repository():
    """Every file git would commit (tracked, or new and not ignored): no key, token,
    private key or password. Credentials come from the environment or Kubernetes Secrets
    (tests/test_infra.py checks the manifests, the templates and the image)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    findings, scanned = [], 0
    for name in filter(None, files):
        path = REPO / name
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue  # binary, or removed meanwhile
        scanned += 1
        findings += secret_findings(name, text)
    assert scanned > 50
    assert not findings, "\n".join(findings)


@pytest.mark.parametrize("line", [
    "AWS_ACCESS_KEY_ID=" + "AKIA" + "Q3EXAMPLE7REALKY",
    "aws_secret_" + "access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY",
    "-----BEGIN RSA " + _KEY,
    "token: " + "ghp_" + "a1B2" * 9,
    "uri: postgresql://mlflow:" + "s3cr3tPass" + "@db:5432/mlflow",
    'MLFLOW_TRACKING_PASSWORD = "' + "correct-horse" + '"',
])
def test_the_secret_scan_catches_real_looking_values(line):
    assert secret_findings("sample", line), line
    assert not secret_findings("sample", "uri: postgresql://mlflow:REPLACE_ME@db:5432/mlflow")
    assert not secret_findings("sample", 'password = os.environ["MLFLOW_TRACKING_PASSWORD"]')
    assert not secret_findings("sample", line + "  # " + MARKER)  # a fake on purpose, marked
