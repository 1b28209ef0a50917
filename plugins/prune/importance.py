"""Importance of structures (attention heads or key/value groups, MLP neurons, whole layers).

Removing a structure is exactly zeroing its *output* weights O: the `attn.proj` columns of its query
heads, the `mlp.proj` column of a neuron, a block's `attn.proj` and `mlp.proj` (weights and biases:
the pre-norm block is then the identity). Its other weights (qkv rows, fc/gate rows) go with it but
no longer matter. Scores (higher = more important):
  magnitude  ||w||_2 over all of the structure's weights (input and output side)
  taylor     mean over batches of |sum_{i in O} w_i g_i|   the first-order Taylor estimate of the loss
                                                             change when the structure is removed
  fisher     1/2 sum_{i in O} w_i^2 E[g_i^2]               its second-order estimate with the empirical
                                                             Fisher diagonal as Hessian (Optimal Brain Damage)
g is the gradient of the mean next-token cross-entropy of one batch. Sums over batches (and their
count) are all-reduced when torch.distributed is initialized, so every rank ranks the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt.errors import ConfigError

METHODS = ("magnitude", "taylor", "fisher")
STRUCTURES = ("heads", "mlp", "layers")


def head_mode(cfg, mode: str = "auto") -> str:
    """'group': the unit is a key/value group (its query heads + its k and v heads); 'query': the unit is
    one query head (k/v untouched). auto: group unless there is a single k/v head (MQA)."""
    if mode == "auto":
        return "group" if cfg.n_kv_head > 1 else "query"
    if mode not in ("group", "query"):
        raise ConfigError(f"head_mode must be auto, group or query, got {mode!r}")
    if mode == "query" and cfg.n_kv_head == cfg.n_head:
        raise ConfigError(
            "head_mode=query removes query heads inside k/v groups, but this model has one query head per k/v head (mha); use group"
        )
    return mode


def _check_block(block: nn.Module, structures: Iterable[str]) -> None:
    if "heads" in structures and not (hasattr(block.attn, "qkv") and hasattr(block.attn, "proj")):
        raise ConfigError(
            f"head pruning needs the built-in attention (fused qkv + proj), not {type(block.attn).__name__}"
        )
    if "mlp" in structures and not (hasattr(block.mlp, "fc") and hasattr(block.mlp, "proj")):
        raise ConfigError(f"neuron pruning needs an MLP with fc (+gate) and proj, not {type(block.mlp).__name__}")


def head_sums(t: dict[str, torch.Tensor], cfg, mode: str, output_only: bool = False) -> torch.Tensor:
    """Sum a per-element tensor t (keyed 'attn.qkv.weight', ...) over each head unit -> (n_units,)."""
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    per_q = torch.zeros(nh, dtype=torch.float64)
    per_kv = torch.zeros(nkv, dtype=torch.float64)
    for suffix in ("weight", "bias"):
        qkv = t.get(f"attn.qkv.{suffix}")
        if qkv is None or output_only:
            continue
        rows = qkv.double().reshape(nh + 2 * nkv, hd, -1).sum(dim=(1, 2))  # per head-row block
        per_q += rows[:nh]
        per_kv += rows[nh : nh + nkv] + rows[nh + nkv :]
    proj = t["attn.proj.weight"].double()  # (C, nh*hd): input columns per query head
    per_q += proj.reshape(proj.shape[0], nh, hd).sum(dim=(0, 2))
    if mode == "query":
        return per_q
    return per_q.reshape(nkv, nh // nkv).sum(dim=1) + per_kv


def neuron_sums(t: dict[str, torch.Tensor], output_only: bool = False) -> torch.Tensor:
    """Sum a per-element tensor over each MLP hidden unit (fc row, gate row, proj column) -> (hidden,)."""
    out = t["mlp.proj.weight"].double().sum(dim=0)
    if output_only:
        return out
    for name in ("mlp.fc.weight", "mlp.gate.weight"):
        if name in t:
            out = out + t[name].double().sum(dim=1)
    for name in ("mlp.fc.bias", "mlp.gate.bias"):
        if name in t:
            out = out + t[name].double()
    return out


LAYER_OUTPUTS = ("attn.proj.weight", "attn.proj.bias", "mlp.proj.weight", "mlp.proj.bias")


def unit_sums(
    t_per_block: list[dict[str, torch.Tensor]], cfg, structures, mode: str, output_only: bool
) -> dict[str, torch.Tensor]:
    """{'heads': (n_blocks, n_units), 'mlp': (n_blocks, hidden), 'layers': (n_blocks,)}."""
    out: dict[str, torch.Tensor] = {}
    if "heads" in structures:
        out["heads"] = torch.stack([head_sums(t, cfg, mode, output_only) for t in t_per_block])
    if "mlp" in structures:
        out["mlp"] = torch.stack([neuron_sums(t, output_only) for t in t_per_block])
    if "layers" in structures:
        out["layers"] = torch.stack(
            [sum(v.double().sum() for k, v in t.items() if not output_only or k in LAYER_OUTPUTS) for t in t_per_block]
        )
    return out


def _per_block(model, fn) -> list[dict[str, torch.Tensor]]:
    return [{n: fn(p) for n, p in b.named_parameters()} for b in model.blocks]


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    # NCCL reduces only CUDA tensors; gloo takes CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for t in tensors:
        moved = t.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        t.copy_(moved)


def importance(
    model,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    method: str = "taylor",
    structures: Iterable[str] = STRUCTURES,
    mode: str = "auto",
) -> dict[str, torch.Tensor]:
    """Scores per unit, one row per (unique) block: higher = more important. Scores are float64 on CPU.

    `batches` (x, y) are needed for taylor and fisher; with several ranks, pass each rank its own.
    Runs in eval mode (no dropout) and leaves the model's gradients and mode as they were.
    """
    structures = tuple(structures)
    unknown = set(structures) - set(STRUCTURES)
    if unknown:
        raise ConfigError(f"unknown structures {sorted(unknown)}; choose from {', '.join(STRUCTURES)}")
    if method not in METHODS:
        raise ConfigError(f"importance method must be one of {', '.join(METHODS)}, got {method!r}")
    for b in model.blocks:
        _check_block(b, structures)
    mode = head_mode(model.config, mode) if "heads" in structures else mode
    if method == "magnitude":
        sq = unit_sums(
            _per_block(model, lambda p: p.detach().double().cpu() ** 2), model.config, structures, mode, False
        )
        return {k: v.sqrt() for k, v in sq.items()}
    if batches is None:
        raise ConfigError(f"importance method {method} needs data batches (magnitude does not)")

    was_training = model.training
    saved_grads = {p: p.grad for p in model.parameters()}
    model.eval()
    taylor: dict[str, torch.Tensor] | None = None
    grad_sq = _per_block(model, lambda p: torch.zeros(p.shape, dtype=torch.float64))
    n = torch.zeros((), dtype=torch.float64)
    device = next(model.parameters()).device
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            logits = model(x.to(device))
            logits = logits if logits.dtype == torch.float64 else logits.float()
            F.cross_entropy(logits.view(-1, logits.size(-1)), y.to(device).view(-1)).backward()
            if method == "taylor":
                wg = _per_block(model, lambda p: (p.detach().double() * _grad(p).double()).cpu())
                s = {k: v.abs() for k, v in unit_sums(wg, model.config, structures, mode, True).items()}
                taylor = s if taylor is None else {k: taylor[k] + s[k] for k in s}
            else:
                for acc, b in zip(grad_sq, model.blocks):
                    for name, p in b.named_parameters():
                        acc[name] += _grad(p).double().cpu() ** 2
            n += 1
    finally:
        for p, g in saved_grads.items():
            p.grad = g
        model.train(was_training)
    if n == 0:
        raise ConfigError("importance got no batches; pass at least one (x, y) batch")
    if method == "taylor":
        keys = sorted(taylor)
        _all_reduce([taylor[k] for k in keys] + [n])
        return {k: taylor[k] / n for k in keys}
    _all_reduce([t for acc in grad_sq for t in acc.values()] + [n])
    fisher = [
        {name: 0.5 * p.detach().double().cpu() ** 2 * acc[name] / n for name, p in b.named_parameters()}
        for acc, b in zip(grad_sq, model.blocks)
    ]
    return unit_sums(fisher, model.config, structures, mode, True)


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)
