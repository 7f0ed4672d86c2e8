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
first left: the better model ends as the one champion.

A live holder renews its lock: a thread rewrites the run tag ``heartbeat.<n>`` (holder and
time) every quarter of ``stale_after``, however long the promotion takes (re-scoring the
champion on a large validation set). A lock whose last renewal is older than
``stale_after`` (``STALE_LOCK_S``), or whose holder on this machine no longer runs (a
killed promote), is broken. Before it changes anything, the holder confirms it still holds
the lock (``HeldLock.confirm``: it renews, then checks that nobody released its slot), so a
holder that stalled longer than ``stale_after`` and lost its lock stops instead of moving
the alias; renewed just before, it has ``stale_after`` seconds to write. Staleness compares
one machine's clock with another's: keep them synchronised (NTP), well within
``stale_after``.

Should two first promotions of a model each create a lock run, both take every lock run
they see, in order: the first run created is seen by all, so they still exclude each other.
The plain-file store (``./mlruns``) cannot refuse a parameter atomically: use a database
(``sqlite:///mlflow.db``, the default) or a server for concurrent promotions.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time

from .. import tracking
from ..errors import TrackingError
from .owners import holder_gone, new_owner
from .versions import LOCK_EXPERIMENT, LOCK_FOR_TAG, STALE_LOCK_S, _client, _code

log = logging.getLogger(__name__)


# -- the lock ---------------------------------------------------------------------------
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


def _lock_state(run) -> tuple[int, str | None, float]:
    """(last slot n, its holder or None when released/never taken, when it was taken or
    last renewed by that holder)."""
    params, tags = run.data.params, run.data.tags
    slots = [int(k[5:]) for k in params if k.startswith("lock.") and k[5:].isdigit()]
    n = max(slots, default=0)
    if n == 0 or f"release.{n}" in params:
        return n, None, 0.0
    holder, since = _stamp(params[f"lock.{n}"])
    renewer, renewed = _stamp(tags.get(f"heartbeat.{n}", ""))
    return n, holder, max(since, renewed) if renewer == holder else since


def _stamp(value: str) -> tuple[str, float]:
    """``<owner>@<unix time>`` -> (owner, time); time 0 when unreadable."""
    who, _, when = value.rpartition("@")
    try:
        return who, float(when)
    except ValueError:
        return who, 0.0


def _take(client, run_id: str, name: str, owner: str, deadline: float,
          stale_after: float) -> int:
    """Take the lock run `run_id`; returns the slot taken."""
    while True:
        n, holder, since = _lock_state(client.get_run(run_id))
        if holder is None:
            now = math.floor(time.time() * 1000) / 1000  # never after the clock: age >= 0
            if _write_once(client, run_id, f"lock.{n + 1}", f"{owner}@{now:.3f}"):
                return n + 1
            continue  # another promoter took slot n + 1 first
        age = time.time() - since
        if age >= stale_after or holder_gone(holder):  # its holder died or stalled: break it
            _write_once(client, run_id, f"release.{n}", f"broken by {owner} after {age:.0f}s "
                                                        "without renewal")
            continue
        if time.monotonic() > deadline:
            raise TrackingError(f"registered model {name!r}: another promotion holds the lock "
                                f"({holder}, renewed {age:.0f}s ago; run {run_id} of experiment "
                                f"{LOCK_EXPERIMENT!r}, parameter lock.{n}); retry later, or "
                                f"log parameter release.{n} on that run if no promote is running")
        time.sleep(0.2 + random.random() * 0.3)


class HeldLock(str):
    """The holder's name (a str, as written in ``lock.<n>``), renewed by a thread while held."""

    def __new__(cls, owner: str, *args):
        return super().__new__(cls, owner)

    def __init__(self, owner: str, client, name: str, stale_after: float):
        self.client, self.name, self.stale_after = client, name, stale_after
        self.slots: list[tuple[str, int]] = []
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"promotion-lock-{name}", daemon=True)

    def renew(self) -> None:
        """Write this holder's heartbeat on each of its slots; then note any slot released
        by someone else (the lock was broken: this holder lost it)."""
        now = f"{self}@{time.time():.3f}"
        for run_id, n in self.slots:
            self.client.set_tag(run_id, f"heartbeat.{n}", now, synchronous=True)
        for run_id, n in self.slots:
            released = self.client.get_run(run_id).data.params.get(f"release.{n}")
            if released is not None and released != self:
                self.lost = f"slot lock.{n} of run {run_id} was released by another: {released!r}"

    def confirm(self) -> None:
        """Renew now and make sure the lock is still this holder's: call it right before
        changing the registry. A TrackingError when it was lost (or cannot be renewed)."""
        if self.lost is None:
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001  (not renewed: ownership unproven)
                self.lost = f"it could not be renewed ({type(e).__name__}: {e})"
        if self.lost is not None:
            raise TrackingError(f"registered model {self.name!r}: this promotion no longer holds its "
                                f"lock ({self.lost}; not renewed within {self.stale_after:g}s); "
                                "nothing was changed: run promote again")

    def _beat(self) -> None:
        while not self._stop.wait(max(self.stale_after / 4, 0.2)) and self.lost is None:
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001  (a missed beat: the next one may land)
                log.warning("promotion lock of %r: renewal failed: %s", self.name, e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@contextlib.contextmanager
def promotion_lock(name: str, timeout: float = 120.0, stale_after: float = STALE_LOCK_S):
    """Hold the promotion lock of registered model ``name`` (see the module docstring);
    yields the ``HeldLock``, renewed until the block ends."""
    client = _client()
    held = HeldLock(new_owner(), client, name, stale_after)
    deadline = time.monotonic() + timeout
    try:
        with tracking.errors(f"taking the promotion lock of {name!r}"):
            for run_id in _lock_runs(client, name):
                held.slots.append((run_id, _take(client, run_id, name, held, deadline, stale_after)))
        held._thread.start()
        yield held
    finally:
        held.stop()
        for run_id, n in reversed(held.slots):
            with contextlib.suppress(Exception):
                _write_once(client, run_id, f"release.{n}", str(held))
