"""Errors the platform reports to users: each names the file or field and what is wrong."""


class CLAdapterError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class ParamsError(CLAdapterError):
    """params.yaml or a flag holds a bad value."""


class DataError(CLAdapterError):
    """An input file, folder or manifest is unusable."""


class ModelError(CLAdapterError):
    """A backbone name, adapter option, weights file or model directory is wrong."""


class TrackingError(CLAdapterError):
    """The MLflow server or registry cannot do what was asked."""


class TrainingError(CLAdapterError):
    """Training cannot go on (non-finite loss, inconsistent inputs)."""


class CacheError(CLAdapterError):
    """The stage-1 feature cache cannot be used as asked (unfrozen backbone, bad settings,
    too large to fit)."""


class Preempted(CLAdapterError):
    """SIGTERM arrived (or a step limit): a checkpoint was saved; run again to resume."""


class TuneError(CLAdapterError):
    """The search cannot run as asked (empty space, bad storage, no completed trial)."""
