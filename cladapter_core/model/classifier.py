"""The adapted model: backbone -> (CLAdapter -> mean over tokens) -> linear head.

Modes:
- ``cla``: backbone tokens -> CLAdapter -> mean over tokens -> head.
- ``linear``, ``full``, ``lp-ft``: head on the backbone's usual pooled feature (class
  token for ViTs, average pool for CNNs); they differ only in what training unfreezes.
- ``linear-mean``: a linear probe on the mean of the backbone's tokens, the pooling that
  CLAdapter uses, so comparing it with ``cla`` measures the adapter and not the pooling.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .adapter import CLAdapter
from ..outputs import atomic_dir, write_json
from .backbones import Backbone
from .config import FROZEN_MODES, MODES, AdapterConfig  # noqa: F401 (re-exported)
from ..errors import ModelError
from ..param_models import ADAPTER_FIELDS, Model, Train, check


WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class CLAdapterModel(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, mode: str = "cla",
                 adapter_config: AdapterConfig | None = None,
                 class_names: list[str] | None = None):
        super().__init__()
        if mode not in MODES:
            raise ModelError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ModelError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.mode = mode
        self.backbone = backbone
        self.adapter_config = adapter_config if adapter_config is not None else AdapterConfig()
        self.adapter = CLAdapter(backbone.dim, self.adapter_config) if mode == "cla" else None
        self.head = nn.Linear(backbone.dim, num_classes)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ModelError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.stage = 2
        # Stages that train the backbone keep its BatchNorm running statistics as they were
        # (the trainer sets this from train.batchnorm): re-estimating them from small batches
        # undoes a pretrained backbone in one epoch.
        self.freeze_norm_stats = True
        # The training data's intensity range (lo, hi) that the decoder maps to [0, 1], from
        # prepare's summary; None: 8-bit-style fixed scaling. Saved in config.json so that
        # predict and serving scale new images as training did.
        self.intensity: list | None = None

    # -- forward -----------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature (B, D) that the head sees."""
        if self.adapter is None:
            return self.backbone_output(x)
        return self.adapter(self.backbone.forward_tokens(x)).mean(dim=1)

    def head_features(self, tokens_or_pooled: torch.Tensor) -> torch.Tensor:
        """Logits from backbone output: tokens (B, N, D) in `cla` mode, else pooled (B, D).
        Used by the stage-1 feature cache, which stores the frozen backbone's output."""
        if self.adapter is None:
            return self.head(tokens_or_pooled)
        return self.head(self.adapter(tokens_or_pooled).mean(dim=1))

    def backbone_output(self, x: torch.Tensor) -> torch.Tensor:
        """What `head_features` takes: tokens in `cla` mode, the pooled feature otherwise
        (the mean of the tokens in `linear-mean` mode, the backbone's own pooling else)."""
        if self.adapter is not None:
            return self.backbone.forward_tokens(x)
        if self.mode == "linear-mean":
            return self.backbone.forward_tokens(x).mean(dim=1)
        return self.backbone.forward_pooled(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    # -- staged fine-tuning --------------------------------------------------------------
    def set_stage(self, stage: int) -> "CLAdapterModel":
        """Stage 1: backbone frozen (no gradients; BatchNorm and dropout in eval mode).
        Stage 2: everything trainable; the backbone's BatchNorm layers stay in eval mode
        (running statistics kept, their weight and bias still trained) while
        `freeze_norm_stats` is set."""
        if stage not in (1, 2):
            raise ModelError(f"stage must be 1 or 2, got {stage!r}")
        self.stage = stage
        for p in self.backbone.parameters():
            p.requires_grad_(stage == 2)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "CLAdapterModel":
        super().train(mode)
        if self.stage == 1:
            self.backbone.eval()  # frozen statistics: BatchNorm running stats, no dropout
        elif mode and self.freeze_norm_stats:
            for layer in batchnorm_layers(self.backbone):
                layer.eval()
        return self

    def param_report(self) -> dict:
        def count(module, trainable=False):
            if module is None:
                return 0
            return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
        backbone, adapter, head = count(self.backbone), count(self.adapter), count(self.head)
        return {"total": backbone + adapter + head, "backbone": backbone, "adapter": adapter,
                "head": head, "trainable": count(self, trainable=True),
                "adapter_overhead_pct": 100.0 * adapter / backbone if backbone else 0.0}

    def config_dict(self) -> dict:
        dc = self.backbone.data_config
        cfg = self.adapter_config.model_dump()
        return {"backbone": self.backbone.name, "backbone_kwargs": self.backbone.kwargs,
                "mode": self.mode, **cfg, "num_classes": self.num_classes,
                "class_names": self.class_names, "input_size": dc["input_size"],
                "mean": dc["mean"], "std": dc["std"], "interpolation": dc["interpolation"],
                "intensity": self.intensity, "is_3d": self.backbone.is_3d}


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d) in `module`."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def build_model(backbone: str, num_classes: int, mode: str = Train.model_fields["mode"].default, *,
                class_names: list[str] | None = None, grad_checkpointing: bool = False,
                **options) -> CLAdapterModel:
    """Build a backbone (timm name or torchvision video model) with a CLAdapter and head.

    `options`: any field of params.yaml's `model:` section (`param_models.Model` declares
    each with its default: pretrained, weights, backbone_kwargs, input_size, num_centers,
    rank, depth, mlp_ratio, temperature, init, dropout), validated as params.yaml is; other
    keywords go to `timm.create_model` (img_size, patch_size, in_chans...), and
    `backbone_kwargs` carries those whose names clash with the adapter's (timm's `depth`).
    `pretrained=True` uses timm's/torchvision's normal download (needs internet);
    `weights` loads backbone weights from a path, file:// or s3:// URI instead.
    `input_size` (H, [H, W] or [T, H, W]) sets what images are resized to; by default the
    backbone's pretrained configuration (or timm's `img_size`).
    """
    # Validate the cheap things before building a possibly large backbone.
    if mode not in MODES:
        raise ModelError(f"mode must be one of {MODES}, got {mode!r}")
    given = {k: v for k, v in options.items() if k in Model.model_fields}
    timm_kwargs = {k: v for k, v in options.items() if k not in Model.model_fields}
    resolved, problems = check({"model": {**given, "backbone": backbone}})
    if problems:
        raise ModelError("invalid model options: " + "; ".join(problems))
    m = resolved.model
    adapter_config = AdapterConfig(**{name: getattr(m, name) for name in ADAPTER_FIELDS})
    bb = Backbone(backbone, pretrained=m.pretrained, weights=m.weights, input_size=m.input_size,
                  **{**(m.backbone_kwargs or {}), **timm_kwargs})
    model = CLAdapterModel(bb, num_classes, mode, adapter_config, class_names)
    if model.adapter is not None:
        model.adapter.grad_checkpointing = grad_checkpointing
    return model


def save_model(model: CLAdapterModel, out_dir: str | Path, extra_files: dict | None = None) -> Path:
    """Write `model.safetensors` + `config.json` (and `extra_files`: name -> JSON-able
    object) into out_dir atomically: a temp dir beside it is renamed into place."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        write_json(tmp / CONFIG_FILE, model.config_dict())
        for name, obj in (extra_files or {}).items():
            write_json(tmp / name, obj)
    return out_dir


def load_model(model_dir: str | Path, map_location: str = "cpu") -> CLAdapterModel:
    """Rebuild a model saved by `save_model` (no download: weights come from the dir)."""
    from safetensors.torch import load_file
    model_dir = Path(model_dir)
    cfg_path, w_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ModelError(f"model directory {model_dir}: missing {p.name}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path}: not valid JSON ({e})") from e
    model = build_model(cfg["backbone"], cfg["num_classes"], mode=cfg["mode"], pretrained=False,
                        class_names=cfg["class_names"], backbone_kwargs=cfg.get("backbone_kwargs"),
                        input_size=cfg["input_size"][1:], **{k: cfg[k] for k in ADAPTER_FIELDS})
    state = load_file(str(w_path), device=map_location)
    from .weights import load_into
    load_into(model, state, source=str(w_path))
    model.intensity = cfg.get("intensity")
    return model.eval()
