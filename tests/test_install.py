"""Installed as users install it: the wheel, not the source tree.

The wheel is built once per session from a copy of the working tree (tracked and untracked,
not ignored files: what a checkout holds; nothing is written into the repository), with
`pip wheel --no-deps --no-build-isolation` (no internet: setuptools from this virtualenv).
It is installed NOT editable, with --no-deps, into a fresh virtual environment; a .pth file
added after that points at this virtualenv's site-packages for the dependencies (torch,
kfp, mlflow...). That directory holds no copy of the project (the editable install is a
finder in a .pth file, and .pth files of a directory named in a .pth file are not run), so
every import of cladapter_core, components and pipelines resolves to the wheel's copy: each
test checks that first. Then the installed code compiles the pipeline (its defaults from
pipelines/params/production.yaml, package data) and renders every file template it ships.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO, child_env

PACKAGES = ("cladapter_core", "components", "pipelines")


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once per test session from a copy of the working tree."""
    root = tmp_path_factory.mktemp("wheel")
    src, out = root / "src", root / "dist"
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                 cwd=REPO).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():  # a file deleted in the working tree but not in git
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--no-index", str(src), "-w", str(out)], cwd=root)
    (found,) = out.glob("cladapter_core-*.whl")
    return found


def _source_tree(wheel: Path) -> Path:
    """The copy of the working tree the wheel was built from."""
    return wheel.parent.parent / "src"


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh virtual environment holding the wheel (not editable) and, through a .pth
    file written after it, this virtualenv's packages: {"python", "bin", "site", "cwd"}."""
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--no-index", str(wheel)])
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).stdout.strip())
    (site / "zz_cladapter_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    cwd = root / "work"  # not the repository: '' on sys.path must not find the source tree
    cwd.mkdir()
    return {"python": python, "bin": venv / "bin", "site": site, "cwd": cwd}


def _env() -> dict:
    env = child_env()
    for name in ("PYTHONPATH", "CLADAPTER_IMAGE", "CLADAPTER_SCRATCH", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def _python(installed, code: str) -> str:
    return _run([str(installed["python"]), "-c", code], cwd=installed["cwd"], env=_env()).stdout


def test_the_wheel_holds_every_file_the_code_reads(wheel):
    """The package data pyproject.toml declares is in the wheel, and it is what the code
    reads at run time (the report template, the presets, the pipeline's params files, the
    TrainJob template); no infra/ file is needed."""
    names = set(zipfile.ZipFile(wheel).namelist())
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in declared.items():
        for pattern in patterns:
            sources = sorted((REPO / package).glob(pattern))
            assert sources, f"{package}/{pattern} matches no file in the source tree"
            for path in sources:
                assert path.relative_to(REPO).as_posix() in names, f"{path} is not in {wheel.name}"
    for needed in ("pipelines/params/production.yaml", "pipelines/params/demo.yaml",
                   "components/templates/trainjob-stage2.yaml", "cladapter_core/presets/paper.yaml",
                   "cladapter_core/evaluation/templates/report.html"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("infra/", "tests/"))]


def test_the_installed_copy_is_the_one_imported(installed):
    found = json.loads(_python(installed, (
        "import json, importlib.metadata, cladapter_core, components, pipelines, components.multinode as m\n"
        "print(json.dumps({'files': [cladapter_core.__file__, components.__file__, pipelines.__file__],"
        " 'template': str(m.TEMPLATE), 'dist': str(importlib.metadata.distribution('cladapter-core')"
        ".locate_file(''))}))")))
    site = installed["site"].resolve()
    for path in found["files"] + [found["template"]]:
        assert Path(path).resolve().is_relative_to(site), f"{path} is not the wheel's copy in {site}"
    assert Path(found["dist"]).resolve() == site  # the wheel's metadata (entry points) first
    assert not Path(found["files"][0]).resolve().is_relative_to(REPO)


def test_the_installed_package_compiles_the_pipeline(installed, wheel, tmp_path):
    """`import pipelines.cladapter_pipeline` and `cladapter pipeline compile` from the wheel:
    the same pipeline as the source tree the wheel was built from compiles (its defaults
    from the installed pipelines/params/production.yaml)."""
    out, reference = tmp_path / "pipeline.yaml", tmp_path / "reference.yaml"
    _run([str(installed["bin"] / "cladapter"), "pipeline", "compile", "--out", str(out)],
         cwd=installed["cwd"], env=_env())
    src = _source_tree(wheel)
    _run([sys.executable, "-c", "import sys; from pipelines import cladapter_pipeline as kp; "
          "kp.compile_pipeline(sys.argv[1])", str(reference)], cwd=src, env={**_env(), "PYTHONPATH": str(src)})
    compiled = list(yaml.safe_load_all(out.read_text()))
    assert compiled == list(yaml.safe_load_all(reference.read_text()))
    assert compiled[0]["pipelineInfo"]["name"] == "cladapter-pipeline"
    # the demo params too (run-local's), from the installed package
    demo = _python(installed, "from pipelines import cladapter_pipeline as kp\n"
                              "print(kp.load_pipeline_params(kp.DEMO_PARAMS)['model']['backbone'])")
    assert demo.strip()


def test_the_installed_package_renders_every_template(installed, tmp_path):
    """The TrainJob (the multi-node launcher's render command, validated against the
    Trainer's API models), the evaluation report's HTML template and the shipped preset."""
    proc = _run([str(installed["python"]), "-m", "components.multinode", "render", "--nodes", "3",
                 "--gpus-per-node", "2", "--image", "registry.example/cladapter:1", "--namespace", "team-a"],
                cwd=installed["cwd"], env=_env())
    doc = yaml.safe_load(proc.stdout)
    assert doc["kind"] == "TrainJob" and doc["metadata"]["namespace"] == "team-a"
    assert (doc["spec"]["trainer"]["numNodes"], doc["spec"]["trainer"]["image"]) == (3, "registry.example/cladapter:1")
    assert "# problem" not in proc.stderr
    html = _python(installed, (
        "from cladapter_core.evaluation.report import render_report\n"
        "print(render_report({'mode': 'cla', 'backbone': 'vit'}, {'accuracy': 0.5}, {}, {}, {}, {}))"))
    assert "<html" in html.lower() and "Evaluation of model: vit" in html and "${" not in html
    preset = _python(installed, "from cladapter_core.params import load_params, preset_path\n"
                                "print(preset_path('paper'))\n"
                                "print(load_params(None, preset='paper')['model']['backbone'])")
    path, backbone = preset.split()
    assert Path(path).resolve().is_relative_to(installed["site"].resolve()) and backbone


# -- the scratch volume, as the image's user (UID 10001) -------------------------------------
@pytest.fixture
def request_cleanup():
    """Folders to remove after the test."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_scratch_folder_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
    """No silent fallback to the container's disk: a scratch path that cannot hold files
    stops the step, naming the variable, the folder and the fix; a writable one is used
    for temporary files; one not mounted at all (kfp.local) is said in the log."""
    import tempfile

    from cladapter_core.errors import CLAdapterError
    from components import step
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(CLAdapterError, match=r"CLADAPTER_SCRATCH=.*a-file/scratch is not writable.*emptyDir"):
        step.check_writable(blocker / "scratch", create=True)  # even root cannot make a folder in a file
    monkeypatch.setenv("CLADAPTER_SCRATCH", str(blocker))
    with pytest.raises(CLAdapterError, match="is not a folder"):
        step.use_scratch()
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.setenv("CLADAPTER_SCRATCH", str(tmp_path))
    assert step.use_scratch() == str(tmp_path) and tempfile.gettempdir() == str(tmp_path)
    monkeypatch.setenv("CLADAPTER_SCRATCH", str(tmp_path / "not-mounted"))
    assert step.use_scratch() is None


def test_a_step_as_uid_10001_stops_on_a_root_owned_scratch(request_cleanup):
    """What a block-storage volume without fsGroup gives the image's user: a root-owned
    0755 root. A pipeline step's set-up and a TrainJob node, run as UID 10001 (setpriv),
    stop with the clear error; an emptyDir-like folder (mode 1777) is taken."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a process as UID 10001 on a root-owned folder")
    closed = [p for p in (REPO, *REPO.parents, Path(sys.prefix), *Path(sys.prefix).parents)
              if not p.stat().st_mode & 0o001]
    if closed:  # e.g. a clone inside `mktemp -d` (0700): UID 10001 cannot import the project
        pytest.skip(f"UID 10001 cannot reach the checkout or its interpreter: {closed[0]} is closed to "
                    "other users (mode " + oct(closed[0].stat().st_mode & 0o777) + ")")
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="cladapter-uid-test-", dir="/tmp"))  # pytest's tmp is 0700
    base.chmod(0o755)
    request_cleanup.append(base)
    root_owned, empty_dir, home = base / "scratch", base / "emptydir", base / "home"
    for folder, mode in ((root_owned, 0o755), (empty_dir, 0o1777), (home, 0o1777)):
        folder.mkdir()
        folder.chmod(mode)
    as_user = [shutil.which("setpriv") or "setpriv", "--reuid=10001", "--regid=10001", "--clear-groups"]
    env = {**_env(), "HOME": str(home), "MPLCONFIGDIR": str(home), "TMPDIR": str(home)}
    code = "from components.step import start_step; start_step(); import tempfile; print(tempfile.gettempdir())"
    step = subprocess.run(as_user + [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**env, "CLADAPTER_SCRATCH": str(root_owned)})
    assert step.returncode != 0
    assert f"CLADAPTER_SCRATCH={root_owned} is not writable by this process (uid 10001" in step.stderr, step.stderr
    assert "mode drwxr-xr-x" in step.stderr and "owner uid 0" in step.stderr
    node = subprocess.run(as_user + [sys.executable, "-m", "components.multinode", "node", "--spec-json", "{}",
                                     "--scratch", str(root_owned / "node")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert node.returncode != 0 and "is not writable by this process (uid 10001" in node.stderr, node.stderr
    ok = subprocess.run(as_user + [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**env, "CLADAPTER_SCRATCH": str(empty_dir)})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(empty_dir)
