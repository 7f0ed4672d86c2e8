"""The fault-injection driver: run a pipeline stage as a real `cladapter` process, kill it
with SIGKILL (after a seeded random delay, or at a chosen call through killpoint.py), and
check what it left behind.

Seed: `CLADAPTER_FAULT_SEED` (default 1). Every random choice of a test (delays, which
checkpoint write, which registry step) comes from `rng(name)`, a `random.Random` seeded
by (seed, name), so one test replays alone: `CLADAPTER_FAULT_SEED=7 pytest tests/faults -k prepare`.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))
from tiny import TINY  # noqa: E402

SEED = int(os.environ.get("CLADAPTER_FAULT_SEED", "1"))
# The `prepared` fixture's split, plus a registered model name.
FLAGS = [f"--set={o}" for o in TINY + ["data.shots_per_class=12", "data.val_fraction=0.05",
                                       "data.test_fraction=0.05",
                                       "register.model_name=cladapter-faults"]]
REPLAY = f"fault seed {SEED} (replay: CLADAPTER_FAULT_SEED={SEED} pytest tests/faults)"


def rng(name: str) -> random.Random:
    return random.Random(f"{SEED}:{name}")


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "CLADAPTER_"))}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CLADAPTER_TRACKING="0",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Result:
    code: int
    output: str
    killed: bool = False           # we (or a tripwire) sent SIGKILL before it ended
    seconds: float = 0.0
    notes: list = field(default_factory=list)


class Stage:
    """One `cladapter <command> ...` invocation, run as often as a test likes."""

    def __init__(self, command: str, args: list[str], params: Path, cwd: Path, env: dict):
        self.argv = [command, "--params", str(params), *args, *FLAGS]
        self.cwd, self.env = cwd, env

    def _popen(self, prefix: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *prefix, *self.argv], cwd=self.cwd, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def run(self, timeout: float = 400) -> Result:
        t0 = time.monotonic()
        proc = self._popen(["-m", "cladapter_core.cli"])
        out, _ = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out, seconds=time.monotonic() - t0)

    def run_killed_after(self, delay: float, timeout: float = 400) -> Result:
        """Start it; SIGKILL its whole process group `delay` seconds later (if still running)."""
        t0 = time.monotonic()
        proc = self._popen(["-m", "cladapter_core.cli"])
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            proc.wait(delay)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
            killed = True
        reader.join(timeout)
        return Result(proc.returncode, "".join(chunks), killed=killed,
                      seconds=time.monotonic() - t0)

    def run_killed_at(self, at: str, nth: int = 1, when: str = "after", match: str = "",
                      timeout: float = 400) -> Result:
        """Run it with a tripwire (killpoint.py) that SIGKILLs it at the nth matching call."""
        t0 = time.monotonic()
        proc = self._popen([str(HERE / "killpoint.py"), "--at", at, "--nth", str(nth),
                            "--when", when, "--match", match, "--"])
        out, _ = proc.communicate(timeout=timeout)
        return Result(proc.returncode, out, killed="killpoint: SIGKILL" in out,
                      seconds=time.monotonic() - t0)


def stages(root: Path, out: Path, env: dict, prepared: Path | None = None) -> SimpleNamespace:
    """The pipeline's five commands writing under `out` (inputs: `prepared`, default
    `out/prepared`), as `dvc.yaml` runs them."""
    prepared = prepared or out / "prepared"
    params = root / "empty.yaml"

    def stage(command, *args):
        return Stage(command, [str(a) for a in args], params, out, env)

    return SimpleNamespace(
        dir=out,
        prepare=stage("prepare", "--source", root / "digits", "--out", out / "prepared"),
        train1=stage("train", "--stage", 1, "--prepared", prepared, "--out", out / "stage1"),
        train2=stage("train", "--stage", 2, "--prepared", prepared, "--init-from",
                     root / "ref" / "stage1", "--out", out / "stage2"),
        evaluate=stage("evaluate", "--model", root / "ref" / "stage2", "--prepared", prepared,
                       "--out", out / "eval"),
        register=stage("register", "--model", root / "ref" / "stage2", "--eval",
                       root / "ref" / "eval", "--promote", "--out", out / "registry.json"),
    )


def fault_stages(reference, name: str, **env) -> SimpleNamespace:
    """The stages writing under a fresh `root/<name>` (same depth as `ref`, so a prepared
    folder's relative data root resolves the same), reading the reference's outputs."""
    out = reference.root / name
    out.mkdir()
    return stages(reference.root, out, base_env(**env), prepared=reference.dir / "prepared")


def must_succeed(res: Result, what: str) -> Result:
    assert res.code == 0, f"{what}: exit {res.code}; {REPLAY}\n{tail(res.output)}"
    return res


def must_be_killed(res: Result, what: str) -> Result:
    assert res.killed and res.code == -signal.SIGKILL, \
        f"{what}: expected a SIGKILL, got exit {res.code}; {REPLAY}\n{tail(res.output)}"
    return res


def tail(text: str, n: int = 4000) -> str:
    # tqdm redraws with carriage returns: keep the last state of each line
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(lines)[-n:]


def visible(folder: Path) -> list[str]:
    """Entries a user (or DVC, or KFP) would take for outputs: not dot-named."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# -- what complete outputs look like ------------------------------------------------------
def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def snapshot(folder: Path, files: dict) -> dict:
    """{name: parsed content} of a stage output; raises if a file is missing or torn.
    `files`: name -> "json" | "csv" | "bytes" | "exists"."""
    out = {}
    for name, kind in files.items():
        path = folder / name
        if kind == "json":
            out[name] = read_json(path)
        elif kind == "csv":
            out[name] = read_csv(path)
        elif kind == "bytes":
            out[name] = path.read_bytes()
        else:
            assert path.is_file() and path.stat().st_size > 0, f"{path}: missing or empty"
    return out


PREPARED_FILES = {"manifest.csv": "bytes", "classes.json": "bytes", "summary.json": "json"}
MODEL_FILES = {"model.safetensors": "bytes", "config.json": "json", "history.json": "json",
               "train_summary.json": "json"}
EVAL_FILES = {"metrics.json": "json", "classification_report.json": "json",
              "confusion_matrix.json": "json", "predictions.csv": "csv",
              "param_report.json": "json", "report.html": "exists",
              "confusion_matrix.png": "exists", "curves.png": "exists"}


def without_timing(obj):
    """History and summaries carry wall-clock seconds; everything else must be equal."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in ("seconds",)}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def comparable(snap: dict) -> dict:
    return {k: without_timing(v) for k, v in snap.items()}


def plant_previous(folder: Path, reference: Path, files: dict) -> dict:
    """A complete earlier output at `folder` that differs from the reference (its first
    JSON file gains `"previous": true`, and a PREVIOUS marker file is added), so a later
    look tells the earlier output, the new one and a mix of both apart. Returns its
    comparable snapshot."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(reference, folder)
    first_json = next(name for name, kind in files.items() if kind == "json")
    data = read_json(folder / first_json)
    data["previous"] = True
    (folder / first_json).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (folder / "PREVIOUS").write_text("an earlier complete output\n")
    return comparable(snapshot(folder, files))


def classify(folder: Path, files: dict, reference: dict, previous: dict | None = None) -> str:
    """'absent', 'previous' (the planted earlier output, untouched) or 'complete' (equal to
    the uninterrupted run); anything else - a torn file, a mix of old and new - fails."""
    if not folder.exists():
        return "absent"
    try:
        snap = comparable(snapshot(folder, files))
    except (OSError, ValueError, AssertionError) as e:
        raise AssertionError(f"{folder}: torn output ({type(e).__name__}: {e}); {REPLAY}") from e
    if (folder / "PREVIOUS").exists():
        assert previous is not None and snap == previous, \
            f"{folder}: the earlier output was changed in place (a mix of old and new); {REPLAY}"
        return "previous"
    assert snap == reference, f"{folder}: differs from the uninterrupted run; {REPLAY}"
    return "complete"
