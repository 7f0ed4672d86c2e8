"""Fixtures of the fault-injection suite: the seed, and one uninterrupted reference run of
the whole pipeline (prepare, stage 1, stage 2, evaluate, register + promote) as real
`cladapter` processes, against which every interrupted run is compared."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from faultkit import REPLAY, SEED, base_env, must_succeed, stages


def pytest_report_header(config):
    return f"fault injection: {REPLAY}"


@pytest.fixture(scope="session")
def fault_seed():
    print(f"fault injection: {REPLAY}")
    return SEED


@pytest.fixture(scope="session")
def reference(tmp_path_factory, fault_seed):
    """The demo digits and one uninterrupted run of every stage in `root/ref`; `seconds`
    holds each stage's wall time (the window random kills are drawn from)."""
    from cladapter_core.data import make_demo_data
    root = tmp_path_factory.mktemp("faults")
    make_demo_data(root / "digits")
    (root / "empty.yaml").write_text("")
    ref = root / "ref"
    ref.mkdir()
    env = base_env(MLFLOW_TRACKING_URI=f"sqlite:///{ref / 'mlflow.db'}")
    run = stages(root, ref, env)
    seconds = {}
    for name in ("prepare", "train1", "train2", "evaluate", "register"):
        seconds[name] = must_succeed(getattr(run, name).run(), f"reference {name}").seconds
    return SimpleNamespace(root=root, dir=ref, seconds=seconds)
