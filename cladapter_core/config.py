"""Adapter options: one dataclass of documented fields with defaults (as PEFT's configs)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ModelError

INITS = ("paper", "identity")
# What a model trains: `cla` (the adapter), the baselines, and which of them keep the
# backbone frozen in their single stage (model.py documents each).
MODES = ("cla", "linear", "linear-mean", "full", "lp-ft")
FROZEN_MODES = ("linear", "linear-mean")


@dataclass
class AdapterConfig:
    num_centers: int = 20
    """K: learnable cluster centers (the reference code's default is 20)."""
    rank: int = 256
    """r: size of the K transformation matrices (r x r)."""
    depth: int = 1
    """Number of adapter blocks."""
    mlp_ratio: float = 4.0
    """Hidden width of each block's MLP, as a multiple of the token width D."""
    temperature: float = 1.0
    """tau in softmax(cos(q, c_k) / tau)."""
    init: str = "paper"
    """'paper': centers and transforms from N(0, 1); 'identity': transforms start at I."""
    dropout: float = 0.0
    """Dropout inside the MLPs."""
    grad_checkpointing: bool = False
    """Recompute blocks in backward to save activation memory."""

    def validate(self) -> "AdapterConfig":
        problems = []
        for name in ("num_centers", "rank", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        if not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature!r}")
        if self.init not in INITS:
            problems.append(f"init must be one of {INITS}, got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if problems:
            raise ModelError("invalid adapter options: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)
