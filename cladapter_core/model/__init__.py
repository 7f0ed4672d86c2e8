"""The method and the model: the adapter (`adapter`, its options `config`), any timm or
torchvision video backbone behind one interface (`backbones`, their weights `weights`), and
the adapted classifier, backbone -> adapter -> head, built, saved and loaded (`classifier`)."""
from __future__ import annotations

from .adapter import AdapterBlock, CLAdapter, ClusterAttention, Mlp
from .classifier import (CONFIG_FILE, WEIGHTS_FILE, CLAdapterModel, batchnorm_layers, build_model, load_model,
                         save_model)
from .config import FROZEN_MODES, INITS, MODES, AdapterConfig

__all__ = ["AdapterBlock", "AdapterConfig", "CLAdapter", "CLAdapterModel", "CONFIG_FILE", "ClusterAttention",
           "FROZEN_MODES", "INITS", "MODES", "Mlp", "WEIGHTS_FILE", "batchnorm_layers", "build_model",
           "load_model", "save_model"]
