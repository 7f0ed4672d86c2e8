"""CLAdapter: Cluster Attention Adapter for adapting foundation vision models to small
scientific datasets, with Staged Fine-Tuning (NeurIPS 2025), and the platform around it."""
from .errors import CLAdapterError, DataError, ModelError, ParamsError, TrackingError
from .model import AdapterConfig, CLAdapter, CLAdapterModel, ClusterAttention, build_model, load_model, save_model

__version__ = "0.1.0"
__all__ = ["CLAdapter", "ClusterAttention", "AdapterConfig", "CLAdapterModel", "build_model",
           "load_model", "save_model", "CLAdapterError", "DataError", "ModelError",
           "ParamsError", "TrackingError", "__version__"]
