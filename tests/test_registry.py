"""The model registry against real stores: the embedded SQLite store for the logic, and
the production topology in miniature (mlflow server + PostgreSQL + S3 with IAM auth)."""
import json
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest

from cladapter_core import identity, registry, tracking
from cladapter_core.errors import TrackingError
from cladapter_core.registry import owners
from fixtures_services import CLASS_NAMES, s3_client, tracked_params, write_metrics
from helpers import REPO


def _client():
    from mlflow import MlflowClient
    return MlflowClient()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _champion(name):
    mv = registry._alias(_client(), name, registry.CHAMPION)
    return None if mv is None else int(mv.version)


def _versions(name):
    return sorted(int(v.version) for v in _client().search_model_versions(f"name = '{name}'"))


# -- register ---------------------------------------------------------------------------
def test_register_tags_the_version_sets_challenger_and_is_idempotent(
        embedded_mlflow, tiny_model_dirs, tmp_path):
    name = _name("reg")
    params = tracked_params(name)
    ev = write_metrics(tmp_path / "eval", accuracy=0.75, macro_f1=0.7, roc_auc=None)
    first = registry.register(tiny_model_dirs[0], ev, params, data_hash="d41d8.dir")
    assert first["created"] and first["version"] == 1 and first["aliases"] == ["challenger"]
    assert first["metrics"] == {"accuracy": 0.75, "macro_f1": 0.7}
    tags = first["tags"]
    assert tags["run_id"] == first["run_id"] and tags["data_hash"] == "d41d8.dir"
    assert tags["model_hash"] == identity.content_hash(tiny_model_dirs[0])
    assert tags[registry.STATE_TAG] == "complete"
    run = _client().get_run(first["run_id"])
    assert run.data.tags["stage"] == "register" and run.data.metrics["test_macro_f1"] == 0.7
    assert "evaluation" in {a.path for a in _client().list_artifacts(first["run_id"])}
    # Same model again (e.g. `dvc repro` re-running the stage): the same version.
    again = registry.register(tiny_model_dirs[0], ev, params)
    assert (again["created"], again["version"]) == (False, 1)
    assert _versions(name) == [1]
    # Another model: version 2 becomes the challenger.
    second = registry.register(tiny_model_dirs[1], ev, params)
    assert second["version"] == 2 and second["aliases"] == ["challenger"]
    assert _client().get_model_version(name, "1").aliases == []


def test_register_refuses_metrics_without_the_promotion_metric(embedded_mlflow, tiny_model_dirs,
                                                              tmp_path):
    name = _name("nometric")
    ev = write_metrics(tmp_path / "eval", accuracy=0.9)
    with pytest.raises(TrackingError, match=r"metrics.json: no value for 'macro_f1'.*accuracy"):
        registry.register(tiny_model_dirs[0], ev, tracked_params(name))
    (ev / "metrics.json").write_text(json.dumps({"macro_f1": "high"}))
    with pytest.raises(TrackingError, match="'macro_f1' must be a number"):
        registry.register(tiny_model_dirs[0], ev, tracked_params(name))
    with pytest.raises(TrackingError, match="no such file"):
        registry.register(tiny_model_dirs[0], tmp_path / "missing", tracked_params(name))
    assert _client().search_registered_models(f"name = '{name}'") == []


def test_a_half_made_version_left_by_a_killed_process_is_replaced(embedded_mlflow,
                                                                  tiny_model_dirs, tmp_path):
    import mlflow
    name = _name("halfmade")
    params = tracked_params(name)
    ev = write_metrics(tmp_path / "eval", macro_f1=0.6)
    # What a register killed after creating the version (before its alias) leaves behind:
    # its maker, a process on this machine, is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    with tracking.stage_run(params, "register"):
        uri = tracking.log_model(tiny_model_dirs[2])
    mlflow.register_model(uri, name, tags={
        "model_hash": identity.content_hash(tiny_model_dirs[2]), registry.STATE_TAG: "pending",
        registry.OWNER_TAG: f"{owners.host()}:{dead}:0badf00d", "metric.macro_f1": "0.6"})
    with pytest.raises(TrackingError, match="half-made registration"):
        registry.promote(params, version=1)
    done = registry.register(tiny_model_dirs[2], ev, params)
    assert done["created"] and done["version"] == 2
    assert _versions(name) == [2]
    assert done["tags"][registry.STATE_TAG] == "complete" and done["aliases"] == ["challenger"]


def test_a_registration_in_progress_is_waited_for_not_deleted(embedded_mlflow, tiny_model_dirs, tmp_path):
    """Two runs of one commit register the same weights at once: the second finds the
    first's version still pending, waits for it and returns it, instead of deleting it (which
    failed the first run). A pending version whose maker is unknown is deleted only once
    older than the configured age."""
    import threading
    import time

    import mlflow
    name = _name("twice")
    params = tracked_params(name)
    ev = write_metrics(tmp_path / "eval", macro_f1=0.6)
    with tracking.stage_run(params, "register"):  # the first run, between its version and "complete"
        uri = tracking.log_model(tiny_model_dirs[0])
    mlflow.register_model(uri, name, tags={
        "model_hash": identity.content_hash(tiny_model_dirs[0]), registry.STATE_TAG: "pending",
        registry.OWNER_TAG: owners.new_owner(), "metric.macro_f1": "0.6"})  # alive: this process
    second = {}
    thread = threading.Thread(target=lambda: second.update(registry.register(tiny_model_dirs[0], ev, params)))
    thread.start()
    time.sleep(3)
    assert thread.is_alive() and _versions(name) == [1]  # waiting, nothing deleted
    _client().set_model_version_tag(name, "1", registry.STATE_TAG, "complete")  # the first one ends
    thread.join(timeout=60)
    assert (second["version"], second["created"]) == (1, False) and _versions(name) == [1]

    # Left by a register of an older cladapter (no maker recorded): waited for while young...
    other = _name("orphan")
    with tracking.stage_run(params, "register"):
        uri = tracking.log_model(tiny_model_dirs[1])
    mlflow.register_model(uri, other, tags={"model_hash": identity.content_hash(tiny_model_dirs[1]),
                                            registry.STATE_TAG: "pending"})
    done = {}
    thread = threading.Thread(target=lambda: done.update(registry.register(
        tiny_model_dirs[1], ev, tracked_params(other), stale_pending_after=4.0)))
    thread.start()
    time.sleep(1.5)
    assert thread.is_alive() and _versions(other) == [1]
    thread.join(timeout=120)  # ...deleted once older than the configured age, and registered anew
    assert done["created"] and done["version"] == 2 and _versions(other) == [2]


# -- promote ----------------------------------------------------------------------------
def test_promotion_compares_on_the_metric_with_margin_and_dry_run(embedded_mlflow,
                                                                 tiny_model_dirs, tmp_path):
    name = _name("promo")
    params = tracked_params(name, margin=0.05)
    reg = lambda i, f1: registry.register(tiny_model_dirs[i], write_metrics(  # noqa: E731
        tmp_path / f"eval{i}", macro_f1=f1, accuracy=0.5), params)
    reg(0, 0.60)
    with pytest.raises(TrackingError, match="no 'challenger'"):
        registry.promote(tracked_params(_name("empty")))
    dry = registry.promote(params, dry_run=True)
    assert (dry["decision"], dry["dry_run"], _champion(name)) == ("promoted", True, None)
    first = registry.promote(params)
    assert first["decision"] == "promoted" and "first model" in first["reason"]
    assert _champion(name) == 1
    assert registry.promote(params)["decision"] == "unchanged"

    reg(1, 0.62)  # better, but by less than the margin
    small = registry.promote(params)
    assert (small["decision"], _champion(name)) == ("rejected", 1)
    assert "below margin 0.05" in small["reason"]
    tags = _client().get_model_version(name, "2").tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.compared_with"] == "1"
    assert tags["promotion.reason"] == small["reason"]

    reg(2, 0.70)
    assert registry.promote(params, dry_run=True)["decision"] == "promoted"
    assert _champion(name) == 1  # the dry run changed nothing
    assert "promotion.decision" not in _client().get_model_version(name, "3").tags
    big = registry.promote(params)
    assert (big["decision"], big["champion_before"], _champion(name)) == ("promoted", 1, 3)
    assert _client().get_model_version(name, "1").tags["promotion.replaced_by"] == "3"
    # An explicit older, worse version is compared the same way.
    assert registry.promote(params, version=2)["decision"] == "rejected"
    assert _champion(name) == 3


def test_a_champion_without_the_metric_is_an_error_and_stays_champion(embedded_mlflow,
                                                                      tiny_model_dirs, tmp_path):
    name = _name("nochamp")
    params = tracked_params(name)
    registry.register(tiny_model_dirs[0], write_metrics(tmp_path / "a", macro_f1=0.5), params)
    registry.promote(params)
    _client().delete_model_version_tag(name, "1", "metric.macro_f1")
    registry.register(tiny_model_dirs[1], write_metrics(tmp_path / "b", macro_f1=0.9), params)
    with pytest.raises(TrackingError, match=r"champion .* v1 has no metric 'macro_f1'.*"
                                            r"v1 stays champion"):
        registry.promote(params)
    assert _champion(name) == 1
    assert "promotion.decision" not in _client().get_model_version(name, "2").tags
    # The lock was released despite the error: the next promotion is not blocked.
    _client().set_model_version_tag(name, "1", "metric.macro_f1", "0.5")
    assert registry.promote(params, lock_timeout=1)["decision"] == "promoted"


def test_a_held_promotion_lock_blocks_and_a_stale_one_is_broken(embedded_mlflow,
                                                                tiny_model_dirs, tmp_path):
    name = _name("lock")
    params = tracked_params(name)
    registry.register(tiny_model_dirs[0], write_metrics(tmp_path / "a", macro_f1=0.5), params)
    with registry.promotion_lock(name):
        with pytest.raises(TrackingError, match="another promotion holds the lock"):
            registry.promote(params, lock_timeout=0.5)
        with registry.promotion_lock(name, stale_after=0):  # as if its holder had died
            pass
    assert _champion(name) is None
    assert registry.promote(params)["decision"] == "promoted"
    # The lock is a run, not a registered model; its slots name every holder, the broken
    # one included, and every slot was released.
    client = _client()
    assert [m.name for m in client.search_registered_models(f"name LIKE '{name}%'")] == [name]
    exp = client.get_experiment_by_name(registry.LOCK_EXPERIMENT)
    (lock,) = client.search_runs([exp.experiment_id], f"tags.`{registry.LOCK_FOR_TAG}` = '{name}'")
    slots = lock.data.params
    assert sorted(k for k in slots if k.startswith("lock.")) == ["lock.1", "lock.2", "lock.3"]
    assert all(f"release.{n}" in slots for n in (1, 2, 3)), slots
    assert slots["release.1"].startswith("broken by "), slots  # its holder's own release came late


SLOW_HOLDER = textwrap.dedent("""
    import sys, time
    from cladapter_core import registry
    name, stale = sys.argv[1], float(sys.argv[2])
    with registry.promotion_lock(name, stale_after=stale) as held:
        print("holding", held, flush=True)
        time.sleep(3 * stale)   # a promotion three times longer than the staleness
        held.confirm()          # what promote does before it writes: still ours
        print("confirmed", flush=True)
""")


def _lock_slots(name) -> dict:
    client = _client()
    exp = client.get_experiment_by_name(registry.LOCK_EXPERIMENT)
    (lock,) = client.search_runs([exp.experiment_id], f"tags.`{registry.LOCK_FOR_TAG}` = '{name}'")
    return lock.data.params


def test_a_slow_holder_renews_its_lock_and_the_next_promoter_waits_or_fails_clearly(
        embedded_mlflow, tmp_path):
    """The holder is another process that holds 3x the staleness (2 s here, 120 s by
    default): its renewals keep the lock; a promoter that cannot wait fails naming it, one
    that waits gets the lock once it is released, never by breaking it."""
    import os
    import time
    name, stale = _name("slow"), 2.0
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
    holder = subprocess.Popen([sys.executable, "-c", SLOW_HOLDER, name, str(stale)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        owner = holder.stdout.readline().split()[-1]  # it holds the lock now
        assert owner, holder.stderr.read()[-3000:]
        taken = time.monotonic()
        with pytest.raises(TrackingError, match=rf"another promotion holds the lock \({owner}, renewed "
                                                r"[0-9]s ago.*parameter lock\.1"):
            with registry.promotion_lock(name, timeout=2 * stale, stale_after=stale):
                pass
        assert time.monotonic() - taken > stale  # it did wait past the staleness, in vain
        with registry.promotion_lock(name, timeout=60, stale_after=stale) as second:
            waited = time.monotonic() - taken
            assert _lock_slots(name)["release.1"] == owner  # its holder had released it first
        out, err = holder.communicate(timeout=60)
    finally:
        holder.kill()
    assert holder.returncode == 0 and "confirmed" in out, err[-3000:]
    assert waited >= 3 * stale - 1
    slots = _lock_slots(name)
    assert slots["release.1"] == owner  # released by its holder, not "broken by" anyone
    assert slots["lock.2"].startswith(second) and slots["release.2"] == second


def test_a_holder_that_lost_its_lock_is_stopped_before_it_writes(embedded_mlflow):
    """A holder that stalled past another promoter's staleness (no renewal landed: here its
    renewal interval is far longer) has lost the lock: `confirm`, which `promote` calls
    before it changes anything, refuses."""
    import contextlib
    import time
    name = _name("stolen")
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(registry.promotion_lock(name, stale_after=600))
        first.confirm()  # held and renewed: fine
        time.sleep(0.6)
        with registry.promotion_lock(name, timeout=5, stale_after=0.5) as second:
            with pytest.raises(TrackingError, match=r"no longer holds its lock \(slot lock\.1 .* "
                                                    r"released by another: 'broken by .*nothing was changed"):
                first.confirm()
            second.confirm()
    slots = _lock_slots(name)
    assert slots["release.1"].startswith(f"broken by {second}") and slots["release.2"] == second


# -- lineage ----------------------------------------------------------------------------
def test_lineage_from_alias_or_version(embedded_mlflow, tiny_model_dirs, tmp_path):
    name = _name("lineage")
    params = tracked_params(name)
    with tracking.stage_run(params, "train-stage2", data_hash="feed.dir"):
        pass
    out = registry.register(tiny_model_dirs[0], write_metrics(tmp_path / "e", macro_f1=0.8),
                            params, data_hash="feed.dir")
    registry.promote(params)
    info = registry.lineage(f"models:/{name}@champion")
    assert info["model"]["version"] == 1 and info["model"]["aliases"] == ["challenger", "champion"]
    assert info["run"]["run_id"] == out["run_id"] and info["run"]["stage"] == "register"
    assert info["data_hash"] == "feed.dir" and info["git_commit"]
    assert info["params"]["register.model_name"] == name
    assert [s["stage"] for s in info["pipeline"]["stages"]] == ["train-stage2", "register"]
    assert registry.lineage(f"models:/{name}/1")["model"] == info["model"]
    text = registry.format_lineage(info)
    assert f"{name} v1" in text and "data hash:  feed.dir" in text and "- register:" in text
    with pytest.raises(TrackingError, match="expected models:/<name>@<alias>"):
        registry.lineage(f"runs:/{out['run_id']}/model")
    with pytest.raises(TrackingError, match="has no alias 'nope'"):
        registry.lineage(f"models:/{name}@nope")


# -- the production topology in miniature ------------------------------------------------
def test_production_topology_register_promote_serve(remote_mlflow, tiny_model_dirs, tmp_path):
    import mlflow
    assert tracking.check_tracking() == remote_mlflow.uri
    name = _name("prod")
    params = tracked_params(name)
    good = registry.register(tiny_model_dirs[0], write_metrics(tmp_path / "a", macro_f1=0.8),
                             params)
    assert registry.promote(params)["decision"] == "promoted"
    worse = registry.register(tiny_model_dirs[1], write_metrics(tmp_path / "b", macro_f1=0.6),
                              params)
    decision = registry.promote(params)
    assert (decision["decision"], decision["candidate"]) == ("rejected", worse["version"])
    assert _champion(name) == good["version"]
    # The artifacts went through the server into the S3 bucket.
    keys = [o["Key"] for o in s3_client(remote_mlflow.s3).list_objects_v2(
        Bucket=remote_mlflow.s3.bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith("model.safetensors") for k in keys)
    # Serving: the champion predicts labels and probabilities.
    batch = np.random.default_rng(1).random((4, 3, 32, 32), dtype=np.float32)
    out = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(batch)
    assert len(out) == 4 and set(out["label"]) <= set(CLASS_NAMES)
    np.testing.assert_allclose(out[[f"prob_{c}" for c in CLASS_NAMES]].sum(axis=1), 1, rtol=1e-5)
    info = registry.lineage(f"models:/{name}@champion")
    assert info["run"]["run_id"] == good["run_id"] and info["params"]["model.num_centers"] == "4"
    # A champion that lost its metric: clear error, and it stays champion.
    _client().delete_model_version_tag(name, str(good["version"]), "metric.macro_f1")
    with pytest.raises(TrackingError, match="stays champion"):
        registry.promote(params)
    assert _champion(name) == good["version"]


def test_wrong_s3_credentials_leave_no_registration(remote_mlflow, tiny_model_dirs, tmp_path):
    # Artifacts written by the client straight to S3 (no proxy), with a wrong key pair.
    experiment = _name("direct-s3")
    s3 = remote_mlflow.s3_iam  # an S3 server that checks credentials
    _client().create_experiment(experiment, artifact_location=f"s3://{s3.bucket}/direct")
    mp = remote_mlflow.monkeypatch
    mp.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)
    mp.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = _name("badcreds")
    params = tracked_params(name)
    params["tracking"] = {"experiment": experiment}
    with pytest.raises(TrackingError, match=r"InvalidAccessKeyId|AWS_ACCESS_KEY_ID") as err:
        registry.register(tiny_model_dirs[2], write_metrics(tmp_path / "e", macro_f1=0.9), params)
    assert remote_mlflow.uri in str(err.value)
    assert _client().search_registered_models(f"name = '{name}'") == []
    assert _client().search_model_versions(f"name = '{name}'") == []


PROMOTE_SCRIPT = textwrap.dedent("""
    import json, sys
    from cladapter_core import registry
    from fixtures_services import tracked_params
    print(json.dumps(registry.promote(tracked_params(sys.argv[1]), version=int(sys.argv[2]))))
""")


def test_two_concurrent_promotions_end_with_the_better_champion(remote_mlflow, tiny_model_dirs,
                                                                tmp_path):
    import os
    name = _name("race")
    params = tracked_params(name)
    for i, f1 in enumerate((0.7, 0.9)):  # no champion yet: each promote alone would win
        registry.register(tiny_model_dirs[i], write_metrics(tmp_path / f"e{i}", macro_f1=f1),
                          params)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}
    procs = [subprocess.Popen([sys.executable, "-c", PROMOTE_SCRIPT, name, str(v)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v in (1, 2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert _champion(name) == 2
    holders = [v for v in (1, 2) if "champion" in _client().get_model_version(name, str(v)).aliases]
    assert holders == [2]
    worse, better = results
    assert better["decision"] == "promoted"
    # Whoever took the lock second compared against the first one's result.
    if worse["decision"] == "promoted":
        assert better["champion_before"] == 1
    else:
        assert worse["decision"] == "rejected" and worse["champion_before"] == 2
