"""A pipeline step's set-up: the first call of every component body."""
from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

from cladapter_core.errors import CLAdapterError
from cladapter_core.settings import settings, var

log = logging.getLogger(__name__)
SCRATCH_ENV = var("scratch")


# Secret keys a deployment may leave empty: the Secrets always hold every key (the oldest
# supported KFP backend cannot mark a key optional), and an empty value means "not set".
OPTIONAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ENDPOINT_URL",
                "MLFLOW_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "CLADAPTER_TUNE_STORAGE",
                "CLADAPTER_CHECKPOINT_ROOT")


def drop_empty_env(names=OPTIONAL_ENV) -> list[str]:
    """Unset the variables of `names` that are set but empty (boto3 and MLflow would take
    an empty endpoint or region for a real one); returns those unset."""
    dropped = [n for n in names if n in os.environ and not os.environ[n].strip()]
    for n in dropped:
        del os.environ[n]
    return dropped


def check_writable(folder, *, create: bool = False) -> Path:
    """`folder`, proven writable by this process (a file is created in it and removed);
    `create`: make it (and its parents) first. Raises CLAdapterError naming the folder, its
    owner and mode, this process's user and the fix: a volume whose root is root-owned
    (a block-storage CSI volume without fsGroup) is not writable by the image's UID 10001,
    and falling back to the container's own disk would fill the node's root file system."""
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        return folder
    except OSError as e:
        try:
            st = folder.stat()
            what = f"owner uid {st.st_uid} gid {st.st_gid}, mode {stat.filemode(st.st_mode)}"
        except OSError:
            what = "it does not exist"
        raise CLAdapterError(
            f"{SCRATCH_ENV}={folder} is not writable by this process (uid {os.getuid()}, gid {os.getgid()}; "
            f"{what}): {e.strerror or e}. The scratch volume must be writable by the image's user: "
            f"an emptyDir (the compiled pipeline mounts one) or a volume whose root that user owns; "
            f"unset {SCRATCH_ENV} to use the system's temporary folder") from e


def use_scratch() -> str | None:
    """Temporary files (downloads, torchrun's params) on the step's scratch volume,
    `$CLADAPTER_SCRATCH`. A folder that exists but is not writable is an error (a clear
    one, at the step's start); one that does not exist means no volume is mounted (kfp.local
    sets the variable but mounts nothing): the system's temporary folder, said in the log."""
    folder = settings().scratch
    if not folder:
        return None
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise CLAdapterError(f"{SCRATCH_ENV}={folder} is not a folder")
        log.warning("%s=%s is not mounted: temporary files go to %s", SCRATCH_ENV, folder,
                    tempfile.gettempdir())
        return None
    tempfile.tempdir = str(check_writable(folder))
    return str(folder)


def start_step() -> None:
    """A pipeline step's set-up, the first call of every component body (importing this
    module changes nothing): Secret keys left empty unset, temporary files on the step's
    scratch volume, the library's log lines in the pod's log."""
    from cladapter_core.console import configure
    configure()
    drop_empty_env()
    use_scratch()
