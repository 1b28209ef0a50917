"""Positional information.

A position module has two hooks, so that absolute and rotary schemes fit one model:
  forward(x, pos)  -> x      applied to the token embeddings (B, T, C)
  rotary(pos)      -> (cos, sin) of shape (T, head_dim/2), or None; attention rotates q and k with it
"""

from __future__ import annotations

import torch
import torch.nn as nn

from microgpt.registry import POSITION


@POSITION.register("learned")
class LearnedPosition(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x + self.wpe(pos)  # (B, T, C) + (T, C)

    def rotary(self, pos: torch.Tensor) -> None:
        return None


@POSITION.register("rope")
class RotaryPosition(nn.Module):
    """Rotary embeddings (RoPE): relative position enters through q.k, so no learned table and no
    hard cap at block_size for generation."""

    def __init__(self, cfg):
        super().__init__()
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        # not persistent: derived from the config, so checkpoints stay small and dtype-agnostic
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x

    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(pos.float(), self.inv_freq)  # (T, hd/2)
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (x[..., :h], x[..., h:]) of x (B, nh, T, hd) by the angles in rot (T, hd/2)."""
    cos, sin = rot
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)
