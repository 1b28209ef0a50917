"""Structured pruning and head reduction that make a genuinely smaller GPT.

`prune_structured` removes attention heads (or whole key/value groups), MLP neurons and whole layers,
chosen by importance scores (see importance.py), and returns a new GPT whose GPTConfig says so
(n_head, n_kv_head, mlp_hidden, n_layer; head_dim is written explicitly because n_embd // n_head no
longer holds). `to_gqa` merges key/value heads (mean within each group) to turn MHA into GQA/MQA.
Both return plain models (no converter to replay): they load with `microgpt.load` and train on with
`init_from=`. Every layer keeps the same number of heads and neurons (one GPTConfig for all blocks);
*which* ones each layer keeps is decided per layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from microgpt.config import GPTConfig
from microgpt.errors import ConfigError, first_line
from microgpt.model import GPT

from .importance import head_mode
from .unstructured import bake_masks


def _plain(model: GPT) -> GPT:
    """Structural surgery needs the bare GPT: bake unstructured masks, refuse other converters."""
    model = bake_masks(model)
    other = [c["name"] for c in model.config.converters]
    if other:
        raise ConfigError(
            f"structured pruning needs a model without converters, this one has {other}; "
            "prune first, then apply them (e.g. prune -> share -> qat)"
        )
    return model


def n_removed(amount: float | int, total: int, what: str) -> int:
    """amount in [0, 1): a fraction of `total` (rounded); an integer >= 1: a count. Keeps at least one."""
    if amount is None or amount == 0:
        return 0
    if isinstance(amount, bool) or amount < 0:
        raise ConfigError(f"{what}={amount!r} must be a fraction in [0, 1) or a count >= 1")
    if amount < 1:
        d = int(round(amount * total))
        if d == 0:
            raise ConfigError(f"{what}={amount} removes nothing out of {total}; raise it (or pass a count)")
    elif float(amount).is_integer():
        d = int(amount)
    else:
        raise ConfigError(f"{what}={amount} must be a fraction in [0, 1) or a whole count")
    if d >= total:
        raise ConfigError(f"{what}={amount} would remove all {total}; keep at least one")
    return d


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in their original order (ties: lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def plan(
    model: GPT,
    scores: dict[str, torch.Tensor],
    heads: float | int = 0,
    mlp: float | int = 0,
    layers: float | int = 0,
    mode: str = "auto",
    mlp_multiple: int = 1,
) -> dict[str, Any]:
    """What to keep: {'layers': [old block ids], 'q': {block: [q heads]}, 'kv': {block: [kv heads]},
    'neurons': {block: [units]}, 'config': new GPTConfig}. Block ids index `model.blocks`."""
    cfg = model.config
    nb = len(model.blocks)
    nh, nkv, hidden = cfg.n_head, cfg.n_kv_head, cfg.hidden_dim
    group = nh // nkv
    keep_layers = list(range(nb))
    d_layers = n_removed(layers, cfg.n_layer, "layers")
    if d_layers:
        if cfg.n_unique_layers is not None:
            raise ConfigError(
                "layer pruning of a cross-layer-shared model (n_unique_layers) is not supported; prune heads/mlp only"
            )
        keep_layers = _top(scores["layers"], nb - d_layers)

    keep_q = {b: list(range(nh)) for b in keep_layers}
    keep_kv = {b: list(range(nkv)) for b in keep_layers}
    new_nh, new_nkv = nh, nkv
    if heads:
        mode = head_mode(cfg, mode)
        if mode == "group":
            d = n_removed(heads, nkv, "heads (key/value groups)")
            for b in keep_layers:
                groups = _top(scores["heads"][b], nkv - d)
                keep_kv[b] = groups
                keep_q[b] = [g * group + j for g in groups for j in range(group)]
            new_nkv, new_nh = nkv - d, (nkv - d) * group
        else:  # the same number of query heads leaves every group: n_head stays a multiple of n_kv_head
            d = n_removed(heads, group, "heads (query heads per key/value group)")
            for b in keep_layers:
                s = scores["heads"][b]
                keep_q[b] = [g * group + j for g in range(nkv) for j in _top(s[g * group : (g + 1) * group], group - d)]
            new_nh = nkv * (group - d)

    keep_n = {b: list(range(hidden)) for b in keep_layers}
    new_hidden = hidden
    if mlp:
        d = n_removed(mlp, hidden, "mlp")
        new_hidden = min(hidden, int(math.ceil((hidden - d) / mlp_multiple) * mlp_multiple))
        for b in keep_layers:
            keep_n[b] = _top(scores["mlp"][b], new_hidden)

    attention = cfg.attention
    if attention == "mha" and new_nkv != new_nh:
        attention = "gqa"
    new_cfg = GPTConfig.from_dict(
        {
            **cfg.to_dict(),
            "n_layer": cfg.n_layer - d_layers,
            "n_head": new_nh,
            "n_kv_head": new_nkv,
            "head_dim": cfg.head_dim,
            "mlp_hidden": cfg.mlp_hidden if new_hidden == hidden else new_hidden,
            "attention": attention,
            "converters": [],
        }
    )
    return {"layers": keep_layers, "q": keep_q, "kv": keep_kv, "neurons": keep_n, "config": new_cfg}


def _rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    return t[torch.tensor(idx, dtype=torch.long, device=t.device)]


def _head_rows(heads: list[int], hd: int, offset: int = 0) -> list[int]:
    return [offset + h * hd + i for h in heads for i in range(hd)]


@torch.no_grad()
def apply_plan(model: GPT, p: dict[str, Any]) -> GPT:
    """Copy the kept weights into a new GPT built from p['config']."""
    cfg, new_cfg = model.config, p["config"]
    nh, nkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    new = GPT(new_cfg).to(next(model.parameters()).device, next(model.parameters()).dtype)
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    for new_i, b in enumerate(p["layers"]):
        q, kv, neurons = p["q"][b], p["kv"][b], p["neurons"][b]
        qkv_rows = _head_rows(q, hd) + _head_rows(kv, hd, nh * hd) + _head_rows(kv, hd, (nh + nkv) * hd)
        cols = _head_rows(q, hd)
        prefix = f"blocks.{b}."
        for key, v in sd.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if name in ("attn.qkv.weight", "attn.qkv.bias"):
                v = _rows(v, qkv_rows)
            elif name == "attn.proj.weight":
                v = v[:, torch.tensor(cols, dtype=torch.long, device=v.device)]
            elif name in ("mlp.fc.weight", "mlp.fc.bias", "mlp.gate.weight", "mlp.gate.bias"):
                v = _rows(v, neurons)
            elif name == "mlp.proj.weight":
                v = v[:, torch.tensor(neurons, dtype=torch.long, device=v.device)]
            out[f"blocks.{new_i}.{name}"] = v.clone()
    try:
        new.load_state_dict(out, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"cannot prune this model's blocks ({first_line(e)}); unsupported component layout") from None
    return new


def prune_structured(
    model: GPT,
    scores: dict[str, torch.Tensor],
    heads: float | int = 0,
    mlp: float | int = 0,
    layers: float | int = 0,
    mode: str = "auto",
    mlp_multiple: int = 1,
) -> GPT:
    """A new, smaller GPT without the lowest-scored heads/groups, neurons and layers."""
    model = _plain(model)
    return apply_plan(model, plan(model, scores, heads, mlp, layers, mode, mlp_multiple))


@torch.no_grad()
def to_gqa(model: GPT, n_kv_head: int) -> GPT:
    """Head reduction: merge key/value heads by their mean within each group of n_kv_head -> n_kv_head.

    Query heads keep their weights; query head h reads merged k/v head h // (n_head / n_kv_head), the
    group its old k/v head belongs to. 1 gives MQA. With identical k/v heads inside each group the
    result computes exactly what the original did.
    """
    model = _plain(model)
    cfg = model.config
    nh, old, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    if not isinstance(n_kv_head, int) or n_kv_head < 1 or old % n_kv_head or nh % n_kv_head:
        raise ConfigError(
            f"kv_heads={n_kv_head} must divide the current n_kv_head={old} (and n_head={nh}); "
            f"choose one of {[d for d in range(1, old + 1) if old % d == 0]}"
        )
    r = old // n_kv_head  # old k/v heads merged into each new one
    attention = cfg.attention
    if attention in ("mha", "gqa", "mqa"):
        attention = "mqa" if n_kv_head == 1 else "gqa"
    new_cfg = GPTConfig.from_dict({**cfg.to_dict(), "n_kv_head": n_kv_head, "attention": attention, "head_dim": hd})
    new = GPT(new_cfg).to(next(model.parameters()).device, next(model.parameters()).dtype)
    sd = dict(model.state_dict())
    for key in list(sd):
        if not (key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias")):
            continue
        v = sd[key]
        q, k, vv = v[: nh * hd], v[nh * hd : (nh + old) * hd], v[(nh + old) * hd :]
        rest = v.shape[1:]
        k = k.reshape(n_kv_head, r, hd, *rest).mean(dim=1).reshape(n_kv_head * hd, *rest)
        vv = vv.reshape(n_kv_head, r, hd, *rest).mean(dim=1).reshape(n_kv_head * hd, *rest)
        sd[key] = torch.cat([q, k, vv])
    new.load_state_dict(sd, strict=True)
    return new


def pruned_checkpoint(ckpt: dict[str, Any], model: GPT, info: dict[str, Any]) -> dict[str, Any]:
    """A microgpt checkpoint for `model` that keeps the source's tokenizer and plugins (weights only:
    optimizer state belongs to the old shapes; train on with init_from=)."""
    hp = dict(ckpt["hyper_parameters"])
    hp["model"] = model.config.to_dict()
    return {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": hp,
        "prune": info,
    }
