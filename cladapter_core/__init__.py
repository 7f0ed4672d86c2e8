"""CLAdapter: Cluster Attention Adapter for adapting foundation vision models to small
scientific datasets, with Staged Fine-Tuning (NeurIPS 2025), and the platform around it."""
from .errors import CLAdapterError, DataError, ModelError, ParamsError, TrackingError

__version__ = "0.1.0"
__all__ = ["CLAdapter", "ClusterAttention", "AdapterConfig", "CLAdapterModel", "build_model",
           "load_model", "save_model", "CLAdapterError", "DataError", "ModelError",
           "ParamsError", "TrackingError", "__version__"]
_MODEL = ("CLAdapter", "ClusterAttention", "AdapterConfig", "CLAdapterModel", "build_model", "load_model",
          "save_model")


def __getattr__(name: str):
    # The model (and torch) load on first use: the pipeline's light steps (params,
    # registration, closing the run) import this package in an image without torch.
    if name in _MODEL:
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
