"""The Cluster Attention Adapter (CLAdapter).

Equations (DESIGN.md section 1), per block:

    Y = LN_1(X);  q = mean_tokens(Y)                         (B, D)
    a = softmax_k(cos(q, c_k) / tau)                         (B, K)
    M = sum_k a_k T_k                                        (B, r, r)
    Z = Up(Down(Y) @ M)                                      (B, N, D)
    X = Z + MLP(LN_2(Z))

with X = LN_in(H) before the first block and H' = LN_out(X) after the last.
There is deliberately no residual around the cluster-attention step (as in the
reference code). M is formed with an einsum, never as a (B, K, r, r) tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import AdapterConfig
from ..errors import ModelError

__all__ = ["CLAdapter", "AdapterBlock", "ClusterAttention", "Mlp"]


class ClusterAttention(nn.Module):
    """K learnable centers attend to the pooled tokens and mix K r x r transforms."""

    def __init__(self, dim: int, config: AdapterConfig):
        super().__init__()
        self.dim, self.num_centers, self.rank = dim, config.num_centers, config.rank
        self.temperature = config.temperature
        self.centers = nn.Parameter(torch.empty(config.num_centers, dim))
        self.transforms = nn.Parameter(torch.empty(config.num_centers, config.rank, config.rank))
        self.down = nn.Linear(dim, config.rank)
        self.up = nn.Linear(config.rank, dim)
        self.reset_cluster_parameters(config.init)

    @torch.no_grad()
    def reset_cluster_parameters(self, init: str = "paper") -> None:
        # The reference code draws centers and transforms from N(0, 1).
        nn.init.normal_(self.centers)
        if init == "identity":
            self.transforms.copy_(torch.eye(self.rank).expand_as(self.transforms))
        else:
            nn.init.normal_(self.transforms)

    def assignments(self, x: torch.Tensor) -> torch.Tensor:
        """Soft cluster weights a (B, K) of the (already normalised) tokens x (B, N, D)."""
        q = x.mean(dim=1)
        cos = F.normalize(q, dim=-1) @ F.normalize(self.centers, dim=-1).t()
        return torch.softmax(cos / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.assignments(x)
        m = torch.einsum("bk,kij->bij", a, self.transforms.to(a.dtype))
        return self.up(torch.bmm(self.down(x), m.to(x.dtype)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class AdapterBlock(nn.Module):
    def __init__(self, dim: int, config: AdapterConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClusterAttention(dim, config)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.attn(self.norm1(x))
        return z + self.mlp(self.norm2(z))


class CLAdapter(nn.Module):
    """Maps backbone tokens (B, N, D) to adapted tokens (B, N, D).

    `CLAdapter(dim, num_centers=5, rank=64)`: `dim` is the backbone's token width D; the
    options (num_centers K, rank r, depth, mlp_ratio, temperature tau, init, dropout) are
    params.yaml's `model:` fields, declared with their defaults in `param_models.Model`;
    or pass a ready `config` (AdapterConfig). `grad_checkpointing` recomputes each block
    in backward to save activation memory (a way to run, not part of the model).
    """

    def __init__(self, dim: int, config: AdapterConfig | None = None, *,
                 grad_checkpointing: bool = False, **options):
        super().__init__()
        if config is not None and options:
            raise ModelError(f"CLAdapter: give a config or options, not both (got {sorted(options)})")
        self.config = config if config is not None else AdapterConfig(**options)
        if dim < 1:
            raise ModelError(f"adapter dim must be >= 1, got {dim}")
        self.dim = dim
        self.grad_checkpointing = grad_checkpointing
        self.norm_in = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(AdapterBlock(dim, self.config) for _ in range(self.config.depth))
        self.norm_out = nn.LayerNorm(dim)

    def assignments(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Soft cluster weights (B, K) of every block, for plotting."""
        out, x = [], self.norm_in(tokens)
        for blk in self.blocks:
            out.append(blk.attn.assignments(blk.norm1(x)))
            x = blk(x)
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ModelError(f"CLAdapter expects tokens (B, N, {self.dim}), got {tuple(tokens.shape)}")
        x = self.norm_in(tokens)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm_out(x)
