"""The trainer's resume checkpoint mirrored off the pod (an `s3://` prefix or a folder), so a
retried step on a new node with an empty disk resumes where the last attempt stopped."""
from __future__ import annotations

import contextlib
import threading
import warnings
from pathlib import Path

from cladapter_core.settings import settings, var
from cladapter_core import storage
from cladapter_core.errors import DataError, ParamsError


CKPT_FILE = "last.pt"
SYNC_ENV = var("checkpoint_sync_s")
# -- checkpoints that outlive the pod ------------------------------------------------------
CHECKPOINT_ROOT_ENV = var("checkpoint_root")  # the install's default (ConfigMap cladapter-pipeline)
NO_CHECKPOINT = ("none", "off", "false")


def checkpoint_root(checkpoint_prefix: str = "") -> str | None:
    """Where a training step mirrors its checkpoint: `checkpoint_prefix` when given
    (`none`: nowhere), else the install's `$CLADAPTER_CHECKPOINT_ROOT` (every install
    overlay sets it, e.g. `s3://mlflow/checkpoints`); the step adds `<KFP run id>/<stage>/`
    to it, so it is run-scoped. None: no mirror, a retried step starts its stage over."""
    given = (checkpoint_prefix or "").strip()
    if given.lower() in NO_CHECKPOINT:
        return None
    root = given or settings().checkpoint_root.strip()
    if not root:
        print(f"no checkpoint_prefix and no ${CHECKPOINT_ROOT_ENV}: the checkpoint stays on this pod; "
              "a retried step starts its stage over")
    return root or None


class ResumeMirror:
    """The trainer's checkpoint (`<out>.ckpt/last.pt`) mirrored at
    `<prefix>/<pipeline id>/<stage>/last.pt`, an `s3://` prefix or a folder.

    A retried step is a new pod, maybe on another node, with an empty disk: `restore`
    fetches the mirrored checkpoint so `train` resumes from it (it resumes only a
    checkpoint whose params, data and starting weights match). `watch` copies the
    checkpoint each time the trainer rewrites it (every epoch; at SIGTERM mid-epoch);
    `clear` removes it once the stage is done. A failed copy is warned about and
    retried: it never stops training.
    """

    def __init__(self, prefix: str, pipeline_id: str, stage: str):
        if not pipeline_id:
            raise ParamsError("checkpoint_prefix needs the pipeline run id to keep runs apart")
        self.prefix = prefix.rstrip("/")
        self.key = f"{pipeline_id}/{stage}/{CKPT_FILE}"
        self.uri = f"{self.prefix}/{self.key}"
        self._pushed: tuple | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def is_s3(self) -> bool:
        return storage.scheme(self.prefix) == "s3"

    def restore(self, local: Path) -> bool:
        """Fetch the mirrored checkpoint to `local` (whole or not at all: written under a
        temporary name, then renamed); False when there is none."""
        try:
            storage.download(self.uri, local)
        except storage.NotFound:
            return False
        except storage.StorageError as e:
            raise DataError(f"cannot read checkpoint {self.uri}: {e.reason} (check the cladapter-s3 "
                            "credentials)") from e
        self._pushed = self._stamp(local)
        return True

    @staticmethod
    def _stamp(path: Path):
        st = path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def push(self, local: Path) -> bool:
        """Copy `local` to the store if it changed since the last copy."""
        with self._lock:
            try:
                stamp = self._stamp(local)
            except FileNotFoundError:
                return False
            if stamp == self._pushed:
                return False
            try:  # one open handle, which survives the trainer's rename; on disk: renamed into place
                storage.upload(local, self.uri)
            except Exception as e:  # noqa: BLE001 - a failed copy must not stop training
                if not self._warned:
                    warnings.warn(f"checkpoint copy to {self.uri} failed ({type(e).__name__}: {e}); "
                                  "training goes on, a retried step may start over")
                    self._warned = True
                return False
            self._pushed = stamp
            return True

    def clear(self) -> None:
        """Remove the mirrored checkpoint (the stage is done)."""
        with contextlib.suppress(Exception):
            storage.remove(self.uri)
            if not storage.is_remote(self.uri):  # folders exist only on disk: drop the empty ones
                path = Path(storage.local_path(self.uri))
                for folder in (path.parent, path.parent.parent):  # <stage>/, <pipeline id>/
                    folder.rmdir()  # only when empty; stops at the first non-empty one

    @contextlib.contextmanager
    def watch(self, local: Path, interval: float | None = None):
        """Push `local` whenever it changes (polled), and once more on the way out."""
        interval = settings().checkpoint_sync_s if interval is None else interval
        stop = threading.Event()

        def loop():
            while not stop.wait(interval):
                self.push(local)

        thread = threading.Thread(target=loop, name="checkpoint-sync", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.push(local)  # the checkpoint of an interrupted run (SIGTERM, error)
