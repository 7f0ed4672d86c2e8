"""A pipeline step's set-up: the first call of every component body."""
from __future__ import annotations

import os
import tempfile

from cladapter_core.settings import settings


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


def use_scratch() -> str | None:
    """Temporary files (downloads, torchrun's params) on the step's ephemeral volume,
    `$CLADAPTER_SCRATCH`, when it is mounted (not under kfp.local)."""
    folder = settings().scratch
    if folder and os.path.isdir(folder) and os.access(folder, os.W_OK):
        tempfile.tempdir = str(folder)
        return str(folder)
    return None


def start_step() -> None:
    """A pipeline step's set-up, the first call of every component body (importing this
    module changes nothing): Secret keys left empty unset, temporary files on the step's
    scratch volume, the library's log lines in the pod's log."""
    from cladapter_core.console import configure
    configure()
    drop_empty_env()
    use_scratch()
