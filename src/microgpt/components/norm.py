"""Normalisation layers: (B, T, C) -> (B, T, C)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt.registry import NORM


@NORM.register("layernorm")
class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm can't drop only the bias on torch 2.4)."""

    def __init__(self, cfg, dim: int | None = None):
        super().__init__()
        dim = dim or cfg.n_embd
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if cfg.bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@NORM.register("rmsnorm")
class RMSNorm(nn.Module):
    """RMSNorm: no mean subtraction, no bias; cheaper and as good in practice (Llama)."""

    def __init__(self, cfg, dim: int | None = None):
        super().__init__()
        dim = dim or cfg.n_embd
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
