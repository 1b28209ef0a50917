"""The GPT: token embedding -> blocks -> final norm -> output head, parts from the registries.

Imports neither Lightning nor Hydra: `GPT(GPTConfig(...))` is all it takes to use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import microgpt.components  # noqa: F401  (registers the built-in components)
from microgpt.components.attention import KVCache
from microgpt.config import GPTConfig
from microgpt.registry import ATTENTION, CONVERTER, MLP, NORM, POSITION


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = NORM.build(cfg.norm, cfg)
        self.attn = ATTENTION.build(cfg.attention, cfg)
        self.norm2 = NORM.build(cfg.norm, cfg)
        self.mlp = MLP.build(cfg.mlp, cfg)

    def forward(self, x: torch.Tensor, rot=None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rot, cache)
        return x + self.mlp(self.norm2(x))


class Cache:
    """One KVCache per layer *position* (not per unique block: shared blocks see different inputs)."""

    def __init__(self, n_layer: int):
        self.layers = [KVCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos = POSITION.build(config.position, config)
        self.drop = nn.Dropout(config.dropout)
        # cross-layer sharing (ALBERT): only n_unique blocks own parameters; depth reuses them cyclically
        n_unique = config.n_unique_layers or config.n_layer
        self.blocks = nn.ModuleList(Block(config) for _ in range(n_unique))
        self.norm_f = NORM.build(config.norm, config)
        # tied head: no module of its own, the forward reads wte.weight. Tying by *module* (rather than
        # assigning one Parameter to two modules) keeps it tied when a strategy swaps parameters (FSDP).
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale residual output projections by 1/sqrt(2 * depth) so the residual stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def layer(self, i: int) -> Block:
        """The block used at depth i (shared blocks repeat)."""
        return self.blocks[i % len(self.blocks)]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, each shared tensor counted once. non_embedding drops the position table, as
        nanoGPT reports it (the token embedding stays: it doubles as the output head when tied)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self.pos, "wpe"):
            n -= self.pos.wpe.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, cache: Cache | None = None, return_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """idx (B, T) token ids -> logits (B, T, vocab). With return_hidden, also each layer's output."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if self.config.position == "learned" and past + T > self.config.block_size:
            raise ValueError(f"sequence of length {past + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.drop(self.pos(self.wte(idx), pos))  # (B, T, C)
        rot = self.pos.rotary(pos)
        hidden = []
        for i in range(self.config.n_layer):
            block = self.blocks[i % len(self.blocks)]
            if self.config.grad_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rot, use_reentrant=False)
            else:
                x = block(x, rot, cache.layers[i] if cache is not None else None)
            if return_hidden:
                hidden.append(x)
        x = self.norm_f(x)
        logits = F.linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return (logits, hidden) if return_hidden else logits

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield (B, 1) new tokens one at a time, using a KV cache. temperature 0 means greedy."""
        cap = self.config.block_size
        cache = Cache(self.config.n_layer)
        logits = self(idx[:, -cap:], cache)[:, -1, :]
        seq = idx
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield nxt
            seq = torch.cat([seq, nxt], dim=1)
            if (
                cache.length + 1 > cap
            ):  # context full: recompute over the last block_size tokens (nanoGPT crops the same way)
                cache = Cache(self.config.n_layer)
                logits = self(seq[:, -cap:], cache)[:, -1, :]
            else:
                logits = self(nxt, cache)[:, -1, :]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
        """idx (B, T) -> (B, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, **kw))
        return torch.cat([idx, *new], dim=1) if new else idx


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def build_model(config: GPTConfig) -> GPT:
    """Build a GPT and apply its recorded converters in order (plugins must already be imported)."""
    model = GPT(config)
    for spec in config.converters:
        spec = dict(spec)
        model = CONVERTER.get(spec.pop("name"))(model, **spec)
    return model
