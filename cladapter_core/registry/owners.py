"""Who holds something in the registry (the promotion lock, a registration in progress), and
whether that holder is known to be dead."""
from __future__ import annotations

import os
import socket
import uuid


def host() -> str:
    """This machine (and PID namespace: containers may share a host name)."""
    try:
        return f"{socket.gethostname()}#{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def new_owner() -> str:
    """``<host>:<pid>:<random>``: one holder, told apart from another thread's or a reused PID's."""
    return f"{host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_gone(owner: str | None) -> bool:
    """A holder on this machine whose process no longer exists (killed while holding)
    is known dead; one on another machine, or of unknown form, never is."""
    where, _, pid = (owner or "").rpartition(":")[0].rpartition(":")
    if where != host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False
