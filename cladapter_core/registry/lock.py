"""The promotion lock.

Concurrent promotions are serialised by a lock built on the one write-once value MLflow
has: a run parameter. Logging a parameter key a second time with another value is refused
by every database-backed store (the unique key (run, key); INVALID_PARAMETER_VALUE), over
the REST API too. The lock of model ``<name>`` is a run in the experiment
``cladapter-promotion-locks`` (tag ``cladapter.lock_for = <name>``, a run, not a
registered model: the registry shows only real models); its parameters are numbered
slots: ``lock.<n>`` names the holder of the n-th promotion and the time it began,
``release.<n>`` ends it (written by the holder, or by whoever breaks a dead holder's lock).
To take the lock a promoter writes ``lock.<n+1>`` after the last slot ``n`` was released;
only one writer gets a given slot. So two ``promote`` commands against the same server (or
SQLite file) run one after the other, and the second compares against the champion the
first left: the better model ends as the one champion. A lock older than
``STALE_LOCK_S``, or one whose holder on this machine no longer runs (a killed promote),
is broken. Should two first promotions of a model each create a lock run, both take every
lock run they see, in order: the first run created is seen by all, so they still exclude
each other. The plain-file store (``./mlruns``) cannot refuse a parameter atomically: use a
database (``sqlite:///mlflow.db``, the default) or a server for concurrent promotions.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import time
import uuid

from .. import tracking
from ..errors import TrackingError
from .versions import LOCK_EXPERIMENT, LOCK_FOR_TAG, STALE_LOCK_S, _client, _code


# -- the lock ---------------------------------------------------------------------------
def _host() -> str:
    """This machine (and PID namespace: containers may share a host name)."""
    try:
        return f"{socket.gethostname()}#{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _holder_gone(owner: str | None) -> bool:
    """A lock taken on this machine by a process that no longer exists (a promote killed
    while holding it) is broken at once instead of after ``STALE_LOCK_S``."""
    host, _, rest = (owner or "").rpartition(":")[0].rpartition(":")
    if host != _host() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _lock_runs(client, name: str) -> list[str]:
    """Ids of the lock runs of registered model `name`, created when there is none."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    exp = client.get_experiment_by_name(LOCK_EXPERIMENT)
    if exp is None:
        try:
            exp_id = client.create_experiment(LOCK_EXPERIMENT, tags={
                "mlflow.note.content": "Promotion locks of `cladapter promote` (one run per "
                                       "registered model). Do not delete."})
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp_id = client.get_experiment_by_name(LOCK_EXPERIMENT).experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage != "active":
            client.restore_experiment(exp_id)
    flt = f"tags.`{LOCK_FOR_TAG}` = '{name}'"

    def search():
        return sorted(r.info.run_id for r in client.search_runs(
            [exp_id], flt, run_view_type=ViewType.ACTIVE_ONLY, max_results=100))

    found = search()
    if not found:
        run = client.create_run(exp_id, run_name=f"promotion lock: {name}", tags={
            LOCK_FOR_TAG: name, "mlflow.note.content": f"Promotion lock of registered model "
                                                     f"{name!r}: lock.<n> / release.<n>"})
        client.set_terminated(run.info.run_id)  # its parameters still take writes
        found = search()
    return found


def _write_once(client, run_id: str, key: str, value: str) -> bool:
    """Log parameter `key` = `value`; True when it now holds `value`, False when another
    writer's value was there first."""
    from mlflow.exceptions import MlflowException
    try:
        client.log_param(run_id, key, value, synchronous=True)
        return True
    except MlflowException:
        held = client.get_run(run_id).data.params.get(key)
        if held is None:
            raise
        return held == value


def _lock_state(params: dict) -> tuple[int, str | None, float]:
    """(last slot n, its holder or None when released/never taken, when it was taken)."""
    slots = [int(k[5:]) for k in params if k.startswith("lock.") and k[5:].isdigit()]
    n = max(slots, default=0)
    if n == 0 or f"release.{n}" in params:
        return n, None, 0.0
    holder, _, since = params[f"lock.{n}"].rpartition("@")
    try:
        return n, holder, float(since)
    except ValueError:
        return n, holder, 0.0


def _take(client, run_id: str, name: str, owner: str, deadline: float,
          stale_after: float) -> int:
    """Take the lock run `run_id`; returns the slot taken."""
    while True:
        n, holder, since = _lock_state(client.get_run(run_id).data.params)
        if holder is None:
            now = math.floor(time.time() * 1000) / 1000  # never after the clock: age >= 0
            if _write_once(client, run_id, f"lock.{n + 1}", f"{owner}@{now:.3f}"):
                return n + 1
            continue  # another promoter took slot n + 1 first
        age = time.time() - since
        if age >= stale_after or _holder_gone(holder):  # its holder died: break it
            _write_once(client, run_id, f"release.{n}", f"broken by {owner} after {age:.0f}s")
            continue
        if time.monotonic() > deadline:
            raise TrackingError(f"registered model {name!r}: another promotion holds the lock "
                                f"({holder}, {age:.0f}s; run {run_id} of experiment "
                                f"{LOCK_EXPERIMENT!r}, parameter lock.{n}); retry later, or "
                                f"log parameter release.{n} on that run if no promote is running")
        time.sleep(0.2 + random.random() * 0.3)


@contextlib.contextmanager
def promotion_lock(name: str, timeout: float = 120.0, stale_after: float = STALE_LOCK_S):
    """Hold the promotion lock of registered model ``name`` (see the module docstring)."""
    client = _client()
    owner = f"{_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout
    held: list[tuple[str, int]] = []
    try:
        with tracking.errors(f"taking the promotion lock of {name!r}"):
            for run_id in _lock_runs(client, name):
                held.append((run_id, _take(client, run_id, name, owner, deadline, stale_after)))
        yield owner
    finally:
        for run_id, n in reversed(held):
            with contextlib.suppress(Exception):
                _write_once(client, run_id, f"release.{n}", owner)
