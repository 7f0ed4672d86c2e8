"""Every command the docs mark as runnable (fenced blocks whose info string is
`bash runnable`, in README.md and docs/*.md) runs as written, in order, on a fresh copy of
the repository, offline."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

BLOCK = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[tuple[str, str]]:
    out = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        out += [(doc.name, b) for b in BLOCK.findall(doc.read_text())]
    return out


def test_the_docs_have_runnable_blocks():
    blocks = runnable_blocks()
    assert any(name == "README.md" and "cladapter init" in b for name, b in blocks)


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs") / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    for f in filter(None, files.stdout.decode().split("\0")):
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@e.org", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e.org"}
    env.pop("CLADAPTER_PIPELINE_ID", None)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root, env


@pytest.mark.parametrize("doc,block", runnable_blocks(), ids=lambda v: v if v.endswith(".md") else "")
def test_a_runnable_block_runs_as_written(fresh_copy, doc, block):
    root, env = fresh_copy
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{doc} block failed:\n{block}\n{(proc.stdout + proc.stderr)[-6000:]}"
    if "predictions.csv" in block:  # the README's own-data story ends in predictions
        rows = (root / "predictions.csv").read_text().splitlines()
        assert rows[0].startswith("path,predicted,prob_") and len(rows) > 1
