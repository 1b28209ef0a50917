"""Positional information.

A position module has two hooks, so that absolute and rotary schemes fit one model:
  forward(x, pos)  -> x      applied to the token embeddings (B, T, C)
  rotary(pos)      -> (cos, sin) of shape (T, head_dim/2), or None; attention rotates q and k with it
"""

from __future__ import annotations

import math

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
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # not persistent: derived from the config, so checkpoints stay small and dtype-agnostic
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x

    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(pos.float(), self.inv_freq)  # (T, hd/2)
        return freqs.cos(), freqs.sin()


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The rotation speed of each of the head_dim/2 pairs, (head_dim/2,), optionally rescaled for long context."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":  # position interpolation: every frequency slowed by the same factor
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # Llama 3.1: slow only the low frequencies, blend in between
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def apply_rotary(x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate pairs (x[..., :h], x[..., h:]) of x (B, nh, T, hd) by the angles in rot (T, hd/2)."""
    cos, sin = rot
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)
