"""The `cladapter` command's shape: plugin commands (`cladapter pipeline`) come in through
the `cladapter.commands` entry points, a broken plugin leaves the rest of the CLI working,
and cladapter_core imports nothing of the KFP side (pipelines/, components/)."""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tomllib
import types
from importlib.metadata import EntryPoint, entry_points

import pytest

from cladapter_core import cli
from helpers import BIN, REPO

KFP_SIDE = ("pipelines", "components")


def test_pipeline_help_through_the_installed_console_script(tmp_path):
    # Run outside the checkout: the command must come from the installed metadata.
    proc = subprocess.run([str(BIN / "cladapter"), "pipeline", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no plugin warning
    assert proc.stdout.startswith("usage: cladapter pipeline")
    for action in ("compile", "submit", "run-local"):
        assert action in proc.stdout
    top = subprocess.run([str(BIN / "cladapter"), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert top.returncode == 0 and "Kubeflow pipeline: compile, submit, run-local" in top.stdout


def test_pipeline_entry_point_is_declared_and_installed():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared[cli.PLUGIN_GROUP] == {"pipeline": "pipelines.cli:register"}
    installed = {ep.name: ep.value for ep in entry_points(group=cli.PLUGIN_GROUP)}
    assert installed.get("pipeline") == "pipelines.cli:register", (
        "the installed metadata lacks the entry point: run `pip install -e .` again")


def _imported_modules(tree: ast.AST):
    """Every module an import statement (at any depth) or a literal import_module names."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.args[0].value


def test_core_imports_nothing_of_the_kfp_side():
    files = sorted((REPO / "cladapter_core").rglob("*.py"))
    assert len(files) > 10
    offenders = [f"{path.relative_to(REPO)} imports {name}"
                 for path in files
                 for name in _imported_modules(ast.parse(path.read_text(), str(path)))
                 if name.split(".")[0] in KFP_SIDE]
    assert not offenders, offenders


def test_building_the_parser_does_not_import_kfp():
    code = ("import sys; from cladapter_core import cli; cli.build_parser(); "
            "assert 'kfp' not in sys.modules and 'pipelines.cladapter_pipeline' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('kfp', 'pipelines')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_command_is_explained():
    ap = cli.build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(cli.COMMANDS) | {"pipeline"}
    assert all(helps.values()), helps
    text = ap.format_help()
    for name, help_text in helps.items():
        assert name in text and help_text.split()[0] in text


# ---------------------------------------------------------------- plugins


def _plugins(monkeypatch, **registers):
    """Entry points named after `registers`' keys, each loading the given register function."""
    eps = []
    for name, register in registers.items():
        if isinstance(register, str):  # an entry point value as written in pyproject.toml
            eps.append(EntryPoint(name, register, cli.PLUGIN_GROUP))
            continue
        module = types.ModuleType(f"_test_plugin_{name}")
        module.register = register
        monkeypatch.setitem(sys.modules, module.__name__, module)
        eps.append(EntryPoint(name, f"{module.__name__}:register", cli.PLUGIN_GROUP))
    monkeypatch.setattr(cli.plugins, "_plugin_entry_points", lambda: eps)


def test_a_plugin_command_runs_through_main(monkeypatch, capsys):
    calls = []

    def register(sub):
        p = sub.add_parser("hello", help="say hello")
        p.add_argument("--name", default="world")
        return lambda args: calls.append(args.name)

    _plugins(monkeypatch, hello=register)
    assert cli.main(["hello", "--name", "you"]) == 0
    assert calls == ["you"]
    assert "say hello" in cli.build_parser().format_help()
    assert capsys.readouterr().err == ""


def test_broken_plugins_are_left_out_with_a_warning(monkeypatch, capsys, tmp_path):
    def half_added(sub):
        sub.add_parser("half", help="never finished")
        raise ValueError("boom")

    def takes_a_core_name(sub):
        sub.add_parser("prepare", help="a second prepare")
        return print

    _plugins(monkeypatch, missing="no_such_module_anywhere.cli:register", half=half_added,
             prepare=takes_a_core_name, nohandler=lambda sub: sub.add_parser("nohandler") and None,
             wrongname=lambda sub: sub.add_parser("othername") and print)
    ap = cli.build_parser()
    err = capsys.readouterr().err
    for name, why in (("missing", "ModuleNotFoundError"), ("half", "ValueError: boom"),
                      ("prepare", "conflicting subparser"), ("nohandler", "not the command's handler"),
                      ("wrongname", "did not add a 'wrongname' command")):
        line = next((ln for ln in err.splitlines() if f"command plugin '{name}'" in ln), None)
        assert line is not None, err
        assert line.startswith("cladapter: warning:") and why in line and "left out" in line
    text = ap.format_help()
    for name in ("half", "nohandler", "othername", "never finished", "a second prepare"):
        assert name not in text
    with pytest.raises(SystemExit):
        ap.parse_args(["half"])
    # The rest of the CLI still works, the core `prepare` untouched.
    assert ap.parse_args(["prepare", "--out", "x"]).out == "x"
    assert cli.main(["summary", "--out", str(tmp_path)]) == 2
    assert "not found; run `dvc repro`" in capsys.readouterr().err
