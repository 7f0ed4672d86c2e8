"""What a person sees while work runs: log lines and one kind of progress.

The library logs through `logging` (a logger per module, under `cladapter_core`) and never
configures it; the entry points do, with `configure()`: the `cladapter` command, a
pipeline step's `runtime.start_step()`, torchrun's per-rank script. On a terminal a line
is the message alone and long work shows a tqdm bar; without one (DVC, KFP pods, CI) each
line carries its time and level, and progress is a plain line at most once a minute, so a
long epoch shows signs of life without a line per redraw.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable

LOGGER = "cladapter_core"
log = logging.getLogger(__name__)


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a line is emitted (pytest's capture, a
    redirect set after `configure`), not the stream of the moment it was made."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def interactive() -> bool:
    """A person watches (stderr is a terminal), rather than a log file."""
    return sys.stderr.isatty()


def configure(level: int = logging.INFO) -> None:
    """Our loggers' lines to stdout: plain messages on a terminal, time and level in logs."""
    handler = _CurrentStdout()
    fmt = "%(message)s" if interactive() else "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, "%Y-%m-%d %H:%M:%S"))
    ours = logging.getLogger(LOGGER)
    ours.handlers[:] = [handler]  # once, however often an entry point is called in a process
    ours.setLevel(level)


class Silent:
    """Progress nobody sees (disabled, or a non-zero DDP rank)."""
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LogLines(Silent):
    """Progress for logs: one line at most every `EVERY_S` seconds, with rate and time left."""
    EVERY_S = 60.0

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n, self.postfix = total, desc, unit, 0, ""
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.EVERY_S and self.n < self.total:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-9)
            units = self.unit + ("es" if self.unit.endswith(("s", "ch", "sh", "x")) else "s")
            log.info("%s: %d/%d %s, %.2f %s/s, %.0f s left%s", self.desc, self.n, self.total, units, rate,
                     units, (self.total - self.n) / rate, self.postfix)

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())


def progress(total: int, desc: str, unit: str = "batch", enabled: bool = True):
    """A bar on a terminal, a line a minute in logs, nothing when not `enabled`; has
    `update`, `set_postfix`, `close` and works as a context manager."""
    if not enabled:
        return Silent()
    if not interactive():
        return LogLines(total, desc, unit)
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, mininterval=1.0)


def tracked(iterable: Iterable, desc: str, total: int | None = None, unit: str = "batch"):
    """Iterate `iterable` with `progress` (its length when `total` is not given)."""
    total = total if total is not None else len(iterable)  # type: ignore[arg-type]
    with progress(total, desc, unit) as bar:
        for item in iterable:
            yield item
            bar.update(1)
