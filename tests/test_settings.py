"""Deployment settings: declared once (cladapter_core/settings.py), read nowhere else."""
import ast
import json
import os
from pathlib import Path

import pytest
from helpers import REPO

from cladapter_core import settings as settings_module
from cladapter_core.settings import Settings, export, settings, tracking_on, var

CORE = REPO / "cladapter_core"


def _environ_uses(path: Path) -> list[str]:
    """`os.environ` / `os.getenv` / `environ` imported from os, anywhere in a module."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "unsetenv") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            found.append(f"{path.name}:{node.lineno} os.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "os" \
                and any(a.name in ("environ", "getenv") for a in node.names):
            found.append(f"{path.name}:{node.lineno} from os import")
    return found


def test_no_environment_read_outside_the_settings_module():
    uses = [use for path in sorted(CORE.rglob("*.py")) if path.name != "settings.py"
            for use in _environ_uses(path)]
    assert uses == []
    assert _environ_uses(CORE / "settings.py")  # the check sees what it looks for


def test_each_variable_is_declared_once_with_help():
    names = [var(name) for name in Settings.model_fields]
    assert len(names) == len(set(names))
    assert all(f.description for f in Settings.model_fields.values())
    assert var("device") == "CLADAPTER_DEVICE" and var("s3_endpoint") == "AWS_ENDPOINT_URL"


def test_values_types_and_empty_means_unset(monkeypatch):
    for name in ("CLADAPTER_TRACKING", "RANK", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                 "MLFLOW_S3_ENDPOINT_URL", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    s = settings()
    assert s.tracking is True and s.rank == 0 and s.tracking_uri == "sqlite:///mlflow.db"
    assert s.s3_endpoint is None and s.cuda_visible_devices is None
    monkeypatch.setenv("CLADAPTER_TRACKING", "0")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # a Secret's unused key: not set
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU on purpose: kept, unlike the others
    s = settings()  # read now, not cached at import
    assert s.tracking is False and s.rank == 3 and s.tracking_uri == "sqlite:///mlflow.db"
    assert s.s3_endpoint == "http://127.0.0.1:9000" and s.cuda_visible_devices == ""
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(Exception, match="RANK"):
        settings()


@pytest.mark.parametrize("asked,env,rank,on", [
    (True, None, "0", True), (False, None, "0", False), (True, "0", "0", False), (True, "1", "1", False)])
def test_tracking_on_is_one_rule(monkeypatch, asked, env, rank, on):
    if env is None:
        monkeypatch.delenv("CLADAPTER_TRACKING", raising=False)
    else:
        monkeypatch.setenv("CLADAPTER_TRACKING", env)
    monkeypatch.setenv("RANK", rank)
    assert tracking_on(asked) is on


def test_export_hands_a_setting_to_child_processes(monkeypatch):
    import os
    import subprocess
    import sys
    monkeypatch.delenv("CLADAPTER_DEVICE", raising=False)
    export(device="cpu")
    try:
        out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['CLADAPTER_DEVICE'])"],
                             capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "cpu"
        assert os.environ["CLADAPTER_DEVICE"] == "cpu"
    finally:
        export(device=None)
    assert "CLADAPTER_DEVICE" not in os.environ and not hasattr(settings_module, "IMAGE")


def test_importing_the_components_changes_no_global_state(tmp_path):
    """Step set-up (empty Secret keys unset, the scratch volume for temporary files) is
    `runtime.start_step()`, the first call of every component body, not an import."""
    import subprocess
    import sys
    code = ("import json, os, tempfile\n"
            "import torch._dynamo, timm, kfp, mlflow  # their own import-time settings: not ours\n"
            "before = (dict(os.environ), tempfile.tempdir)\n"
            "import components, components.runtime, components.stages, components.multinode\n"
            "import components.dataref, components.lineage, components.tuning, pipelines.cladapter_pipeline\n"
            "print(json.dumps([before == (dict(os.environ), tempfile.tempdir), tempfile.tempdir]))\n"
            "components.runtime.start_step()\n"
            "print(json.dumps(['AWS_ENDPOINT_URL' in os.environ, tempfile.tempdir]))\n")
    env = {**os.environ, "AWS_ENDPOINT_URL": "", "CLADAPTER_SCRATCH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=CORE.parent, check=True).stdout.splitlines()
    assert json.loads(out[0])[0] is True and json.loads(out[0])[1] != str(tmp_path)
    assert json.loads(out[1]) == [False, str(tmp_path)]
