"""SIGKILL each pipeline stage at chosen and at seeded random moments, run it again, and
compare with the uninterrupted reference run (conftest `reference`).

After every kill the stage's output is either absent, the earlier complete output, or
complete - never torn or a mix; after the rerun it equals the reference: bit-identical
weights, equal metrics, the same registry state with one model version. The kill points
and delays are drawn from `faultkit.rng` (seed: CLADAPTER_FAULT_SEED, printed on failure).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import torch
import yaml

from faultkit import (EVAL_FILES, FLAGS, MODEL_FILES, PREPARED_FILES, REPLAY, base_env,
                      classify, comparable, fault_stages, must_be_killed, must_succeed,
                      plant_previous, read_json, rng, snapshot, tail, visible)


def reference_of(reference, name: str, files: dict) -> dict:
    return comparable(snapshot(reference.dir / name, files))


def random_kill(stage, window: float, r, what: str):
    """SIGKILL after a seeded random share of the reference's wall time (it may finish first)."""
    delay = r.uniform(0.15, 1.0) * window
    print(f"{what}: SIGKILL after {delay:.2f}s")
    res = stage.run_killed_after(delay)
    assert res.killed or res.code == 0, f"{what}: exit {res.code}; {REPLAY}\n{tail(res.output)}"
    return res


def checkpoint_is_whole(ckpt_dir) -> None:
    """A checkpoint beside the output, when there is one, loads (weights only)."""
    path = ckpt_dir / "last.pt"
    if path.exists():
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "epoch", "fingerprint"} <= set(ck), f"{path}: {REPLAY}"


# -- prepare ----------------------------------------------------------------------------
def test_prepare_killed_anywhere_leaves_old_or_nothing_and_reruns_to_the_same_split(reference):
    run, r = fault_stages(reference, "f_prepare"), rng("prepare")
    out = run.dir / "prepared"
    ref = reference_of(reference, "prepared", PREPARED_FILES)

    # An earlier output in place, killed after it was moved aside, before the new one
    # was renamed in: nothing is at the output path (DVC sees the stage as not done).
    previous = plant_previous(out, reference.dir / "prepared", PREPARED_FILES)
    must_be_killed(run.prepare.run_killed_at("os:replace", 1, "after", "prepared"), "prepare")
    assert classify(out, PREPARED_FILES, ref, previous) == "absent"

    # No earlier output; killed with the new one complete in its temp dir, not yet renamed.
    must_be_killed(run.prepare.run_killed_at("os:replace", 1, "before", "prepared"), "prepare")
    assert classify(out, PREPARED_FILES, ref) == "absent"

    # A seeded random moment, with an earlier output in place.
    previous = plant_previous(out, reference.dir / "prepared", PREPARED_FILES)
    random_kill(run.prepare, reference.seconds["prepare"], r, "prepare kill")
    assert classify(out, PREPARED_FILES, ref, previous) in ("previous", "absent", "complete")

    must_succeed(run.prepare.run(), "prepare after the kills")
    assert classify(out, PREPARED_FILES, ref) == "complete"
    assert visible(run.dir) == ["prepared"]  # temp and set-aside folders are dot-named


# -- training ---------------------------------------------------------------------------
def test_stage1_killed_at_checkpoints_and_saving_resumes_to_identical_weights(reference):
    run, r = fault_stages(reference, "f_train1"), rng("train1")
    out, ckpt = run.dir / "stage1", run.dir / "stage1.ckpt"
    ref = reference_of(reference, "stage1", MODEL_FILES)

    # Killed around the first epoch's checkpoint write (before: the old one stays; after:
    # the new one is in place): nothing at the output path, the checkpoint loads.
    when = r.choice(["before", "after"])
    must_be_killed(run.train1.run_killed_at("os:replace", 1, when, "last.pt"), "stage 1")
    assert classify(out, MODEL_FILES, ref) == "absent"
    checkpoint_is_whole(ckpt)

    # Resumed, then killed with the model complete in its temp dir, not yet in place.
    res = must_be_killed(run.train1.run_killed_at("os:replace", 1, "before", ".stage1.tmp-"),
                         "stage 1 saving")
    assert ("resuming" in res.output) == (when == "after"), tail(res.output)
    assert classify(out, MODEL_FILES, ref) == "absent"
    checkpoint_is_whole(ckpt)

    random_kill(run.train1, reference.seconds["train1"], r, "stage 1 kill")
    classify(out, MODEL_FILES, ref)
    if not out.exists():
        must_succeed(run.train1.run(), "stage 1 after the kills")
    assert classify(out, MODEL_FILES, ref) == "complete"  # bit-identical weights
    assert not ckpt.exists() and visible(run.dir) == ["stage1"]


def test_stage2_killed_while_replacing_an_earlier_model_resumes_to_identical_weights(reference):
    run, r = fault_stages(reference, "f_train2"), rng("train2")
    out = run.dir / "stage2"
    ref = reference_of(reference, "stage2", MODEL_FILES)

    random_kill(run.train2, reference.seconds["train2"], r, "stage 2 kill")
    classify(out, MODEL_FILES, ref)
    checkpoint_is_whole(run.dir / "stage2.ckpt")

    # An earlier model at the output path; killed between setting it aside and renaming
    # the new one in, or just before that: the path is empty, never half of each.
    previous = plant_previous(out, reference.dir / "stage2", MODEL_FILES)
    match, when = r.choice([(".stage2.old-", "after"), (".stage2.tmp-", "before")])
    must_be_killed(run.train2.run_killed_at("os:replace", 1, when, match), "stage 2 saving")
    assert classify(out, MODEL_FILES, ref, previous) == "absent"

    must_succeed(run.train2.run(), "stage 2 after the kills")
    assert classify(out, MODEL_FILES, ref) == "complete"
    assert visible(run.dir) == ["stage2"]


# -- evaluate ---------------------------------------------------------------------------
def test_evaluate_killed_leaves_old_or_nothing_and_reruns_to_equal_metrics(reference):
    run, r = fault_stages(reference, "f_eval"), rng("evaluate")
    out = run.dir / "eval"
    ref = reference_of(reference, "eval", EVAL_FILES)

    previous = plant_previous(out, reference.dir / "eval", EVAL_FILES)
    must_be_killed(run.evaluate.run_killed_at("os:replace", 1, "after", ".eval.old-"), "evaluate")
    assert classify(out, EVAL_FILES, ref, previous) == "absent"

    previous = plant_previous(out, reference.dir / "eval", EVAL_FILES)
    random_kill(run.evaluate, reference.seconds["evaluate"], r, "evaluate kill")
    assert classify(out, EVAL_FILES, ref, previous) in ("previous", "absent", "complete")

    must_succeed(run.evaluate.run(), "evaluate after the kills")
    assert classify(out, EVAL_FILES, ref) == "complete"
    assert visible(run.dir) == ["eval"]


# -- register + promote -----------------------------------------------------------------
CLIENT = "mlflow.tracking.client:MlflowClient."
REGISTRATION_POINTS = [  # (function, when, argument text): each step of `register`
    ("mlflow:register_model", "after", ""),                               # version pending
    (CLIENT + "set_registered_model_alias", "after", "challenger"),      # alias on it
    (CLIENT + "set_model_version_tag", "after", "complete"),             # registration done
]
CHAMPION_POINT = CLIENT + "set_registered_model_alias"  # promote, holding its lock


# Tags that differ between any two runs: the run, the time, the registering process, and the
# integrity record (the logged MLmodel holds its own id and creation time).
VARYING_TAGS = ("run_id", "promotion.time", "cladapter.registered_by", "integrity.sha256",
                "integrity.manifest")


def registry_state(db) -> dict:
    """Every registered model with its versions' aliases and tags (VARYING_TAGS left out)."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    state = {}
    for model in client.search_registered_models():
        versions = [client.get_model_version(model.name, v.version)  # search has no aliases
                    for v in client.search_model_versions(f"name = '{model.name}'")]
        state[model.name] = sorted(
            (sorted(v.aliases or []),
             sorted((k, val) for k, val in v.tags.items() if k not in VARYING_TAGS))
            for v in versions)
    return state


def test_register_and_promote_killed_at_each_step_end_as_one_champion_version(reference):
    run, r = fault_stages(reference, "f_register"), rng("register")
    db = run.dir / "mlflow.db"
    run.register.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    # One registration step (seeded), then promote - holding its lock - just before and
    # just after it moves `champion`: each rerun must finish what the killed one left, and
    # not wait for the dead process's lock to age.
    points = [r.choice(REGISTRATION_POINTS), (CHAMPION_POINT, "before", "champion"),
              (CHAMPION_POINT, "after", "champion")]
    for at, when, match in points:
        print(f"register: SIGKILL {when} {at} ~ {match!r}")
        must_be_killed(run.register.run_killed_at(at, 1, when, match), f"register at {at}")
        assert not (run.dir / "registry.json").exists()
        for name, versions in registry_state(db).items():
            for aliases, tags in versions:  # a champion is never a half-made version
                assert "champion" not in aliases or \
                    ("cladapter.registration", "complete") in tags, (name, aliases, tags, REPLAY)

    res = must_succeed(run.register.run(), "register after the kills")
    assert "champion is now" in res.output
    assert registry_state(db) == registry_state(reference.dir / "mlflow.db"), REPLAY
    got, want = read_json(run.dir / "registry.json"), read_json(reference.dir / "registry.json")
    assert got["registration"]["metrics"] == want["registration"]["metrics"]
    assert got["promotion"]["champion_after"] == got["registration"]["version"]


# -- DVC sees a killed stage as not done ------------------------------------------------
def test_dvc_repro_killed_mid_training_is_not_done_and_the_next_repro_resumes(reference):
    """`dvc repro` of the training stage, its whole process group SIGKILLed (a preempted
    node) once the first epoch's checkpoint is written: `dvc status` reports the stage as
    changed, and the next `dvc repro` resumes it to the reference weights."""
    proj = reference.root / "f_dvc"  # beside `ref`: the prepared folder's data root resolves
    proj.mkdir()
    bin_dir = os.path.dirname(sys.executable)
    env = base_env(PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    cmd = [sys.executable, "-m", "cladapter_core.cli", "train", "--params", "empty.yaml",
           "--stage", "1", "--prepared", str(reference.dir / "prepared"), "--out", "stage1",
           *FLAGS]
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train_stage1": {
        "cmd": shlex.join(cmd), "deps": [str(reference.dir / "prepared")], "outs": ["stage1"]}}}))
    (proj / "empty.yaml").write_text("")

    def dvc(*args, **kw):
        return subprocess.run([f"{bin_dir}/dvc", *args], cwd=proj, env=env, text=True,
                              capture_output=True, **kw)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    proc = subprocess.Popen([f"{bin_dir}/dvc", "repro"], cwd=proj, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ckpt = proj / "stage1.ckpt" / "last.pt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    out = proc.stdout.read()
    proc.stdout.close()
    assert ckpt.exists() and not (proj / "stage1").exists(), \
        "training ended before it could be killed\n" + tail(out)

    status = dvc("status", "--json")
    assert status.returncode == 0, status.stderr
    assert "train_stage1" in json.loads(status.stdout), status.stdout
    assert not (proj / "dvc.lock").exists() or "train_stage1" not in (proj / "dvc.lock").read_text()

    again = dvc("repro")
    assert again.returncode == 0, tail(again.stdout + again.stderr)
    assert "resuming" in again.stdout, tail(again.stdout)
    assert "train_stage1" in yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    ref = reference_of(reference, "stage1", MODEL_FILES)
    assert classify(proj / "stage1", MODEL_FILES, ref) == "complete"
