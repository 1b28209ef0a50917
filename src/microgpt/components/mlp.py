"""Position-wise feed-forward blocks: (B, T, C) -> (B, T, C).

Every matrix is a plain nn.Linear so quantizers and pruners reach it; the output projection is
named `proj` so GPT-2-style scaled init (and structured pruning) can find it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt.registry import MLP


@MLP.register("gelu")
class GeluMLP(nn.Module):
    # exact (erf) GELU, as nanoGPT's nn.GELU(); on CPU it costs half the tanh approximation's time
    approximate = "none"

    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


@MLP.register("gelu_tanh")
class GeluTanhMLP(GeluMLP):
    # the tanh approximation GPT-2 was trained with (HF's "gelu_new"): HF GPT-2 weights load exactly
    approximate = "tanh"


@MLP.register("relu2")
class ReluSquaredMLP(GeluMLP):
    """relu(x)^2 (Primer, So et al. 2021; used by modded-nanogpt): as cheap as ReLU, trains like GELU or better."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.relu(self.fc(x)).square()))


@MLP.register("swiglu")
class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)  # value
        self.gate = nn.Linear(cfg.n_embd, cfg.hidden_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.silu(self.gate(x)) * self.fc(x)))
