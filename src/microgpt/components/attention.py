"""Causal self-attention variants on F.scaled_dot_product_attention: (B, T, C) -> (B, T, C).

One module covers all built-ins because they differ only in two numbers:
  mha      n_kv_head == n_head         every query head has its own key/value head
  gqa      n_head % n_kv_head == 0     groups of query heads share a key/value head (smaller KV cache)
  mqa      n_kv_head == 1              all query heads share one key/value head
  sliding  window = w                  each query sees only the last w positions (itself included)
Projections are plain nn.Linear layers (no nn.MultiheadAttention) so quantizers and pruners reach
every matrix; q, k, v come from one fused matmul (faster on small models) laid out as
[q heads | k heads | v heads] along the output dim, so heads can be sliced out by row.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt.components.position import apply_rotary
from microgpt.registry import ATTENTION


class KVCache:
    """Keys and values of the positions seen so far by one attention layer, (B, n_kv_head, S, hd)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


def causal_mask(t_q: int, past: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Bool (t_q, past + t_q) mask, True where query i (absolute position past+i) may attend key j."""
    qpos = torch.arange(past, past + t_q, device=device)[:, None]
    kpos = torch.arange(past + t_q, device=device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= qpos - kpos < window
    return allowed


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, n_kv_head: int | None = None, window: int | None = None):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = n_kv_head or cfg.n_kv_head
        self.head_dim = cfg.head_dim
        self.window = window
        self.qk_norm = getattr(cfg, "qk_norm", False)
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias  # Qwen2: biases on q, k, v only
        self.qkv = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rot=None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.qk_norm:  # unit-RMS queries and keys: attention logits stay bounded, higher lr is stable
            q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
        if rot is not None:
            q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(k, v)  # (B, nkv, past+T, hd)
        if nkv != nh:  # expand shared kv heads to every query head of their group
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(nh // nkv, dim=1)
        mask, is_causal = None, False
        if self.window is not None or (past > 0 and T > 1):
            mask = causal_mask(T, past, self.window, x.device)
        elif past == 0:
            is_causal = T > 1  # the fused kernels' own causal path: no mask tensor to build
        # past > 0 and T == 1 without a window: the one new query may see every cached key
        # bf16-mixed on a CPU: attention in fp32, the matmuls around it stay bf16 (torch's CPU bf16 attention
        # backward is ~7x slower than fp32's at these sizes; bench/README.md, trainer.precision=auto)
        fp32_attn = q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if fp32_attn:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if fp32_attn else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.attn_dropout if self.training else 0.0
            )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)  # re-assemble heads side by side
        return self.resid_dropout(self.proj(y))


@ATTENTION.register("mha")
def mha(cfg) -> CausalSelfAttention:
    return CausalSelfAttention(cfg, n_kv_head=cfg.n_head)


@ATTENTION.register("gqa")
def gqa(cfg) -> CausalSelfAttention:
    return CausalSelfAttention(cfg, n_kv_head=cfg.n_kv_head)


@ATTENTION.register("mqa")
def mqa(cfg) -> CausalSelfAttention:
    return CausalSelfAttention(cfg, n_kv_head=1)


@ATTENTION.register("sliding")
def sliding(cfg) -> CausalSelfAttention:
    return CausalSelfAttention(cfg, n_kv_head=cfg.n_kv_head, window=cfg.window)
