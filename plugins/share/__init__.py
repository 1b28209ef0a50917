"""share: cross-layer weight sharing and embedding tying for a *trained* GPT.

    python train.py init_from=runs/teacher/checkpoints/best.ckpt +plugin=share plugins.share.n_unique=2

turns the trained model into one whose `n_layer` layers reuse `n_unique` blocks cyclically (ALBERT
style, the model's own `n_unique_layers` option: depth i runs `blocks[i % n_unique]`), and whose output
head reads the token embedding (`tie_embeddings`). Each shared block starts as the element-wise MEAN of
the layers it replaces (block j: the layers i with i % n_unique == j), the tied embedding as the mean of
the embedding and the old head; training then goes on from there (alone, or with `distill` / `qat`).

The result is written through GPTConfig's own fields (`n_unique_layers`, `tie_embeddings`), not through
a converter: the run's checkpoints hold a plain shared model, so `microgpt.load`, `microgpt.export`
(int8, safetensors) and resume need nothing from this plugin, and converters that other plugins record
(prune masks, qat fake quantization) apply to the shared blocks. The structure is changed in the
callback's `prepare` (called by `microgpt.train.run` after the `init_from` weights are loaded and before
the optimizer exists); resuming (`ckpt_path=`) rebuilds the shared model from the checkpoint, and
`prepare` then finds nothing left to do.

Python API: `share_model(model, n_unique, tie_embeddings)` returns the shared copy of a GPT;
`fold_state_dict(sd, n_layer, n_unique, tie_embeddings)` maps a state_dict; `groups(n_layer, n_src, k)`
says which layers each shared block averages.
"""

from __future__ import annotations

import math
import re
from typing import Any

import lightning as L
import torch

from microgpt.config import GPTConfig
from microgpt.errors import CheckpointError, ConfigError, first_line

__all__ = ["Share", "check_config", "fold_state_dict", "groups", "resolve_n_unique", "share_model"]

# a block's entry in a state_dict: `blocks.3.attn.qkv.weight`, or a buffer keyed by a parameter name
# with its dots replaced (the prune plugin's masks: `prune_masks.blocks__3__attn__qkv__weight`)
_BLOCK_KEY = re.compile(r"^(?P<head>(?:.*\.)?)blocks(?P<sep>\.|__)(?P<i>\d+)(?P=sep)(?P<tail>.+)$")


def resolve_n_unique(n_unique: Any, n_layer: int) -> int:
    """`n_unique` as a block count: None -> n_layer (no layer sharing); a fraction in (0, 1) -> that share
    of n_layer rounded up (0.5 of 4 layers -> 2); a whole number >= 1 -> itself (at most n_layer)."""
    if n_unique is None:
        return n_layer
    if isinstance(n_unique, bool) or not isinstance(n_unique, (int, float)) or not n_unique > 0:
        raise ConfigError(
            f"plugins.share.n_unique must be a fraction in (0, 1) or a block count >= 1, got {n_unique!r}"
        )
    if n_unique < 1:
        return max(1, math.ceil(n_unique * n_layer - 1e-9))
    if not float(n_unique).is_integer():
        raise ConfigError(f"plugins.share.n_unique={n_unique} must be a fraction in (0, 1) or a whole block count")
    k = int(n_unique)
    if k > n_layer:
        raise ConfigError(f"plugins.share.n_unique={k} is more than the model's n_layer={n_layer}")
    return k


def groups(n_layer: int, n_src: int, k: int) -> list[list[int]]:
    """For each new block j < k, the source blocks it averages: depth d runs source block d % n_src now and
    will run block d % k, so block j is the mean over the depths d with d % k == j (a source block used at
    several of those depths counts once per use)."""
    return [[d % n_src for d in range(n_layer) if d % k == j] for j in range(k)]


def _combine(values: list[torch.Tensor]) -> torch.Tensor:
    first = values[0]
    if len(values) == 1:
        return first.clone()
    if any(v.shape != first.shape for v in values):
        raise ConfigError(f"cannot share layers whose weights differ in shape: {[tuple(v.shape) for v in values]}")
    if first.is_floating_point():  # the mean, accumulated in float32 at least
        acc = torch.float64 if first.dtype == torch.float64 else torch.float32
        return torch.stack([v.to(acc) for v in values]).mean(0).to(first.dtype)
    if first.dtype == torch.bool:  # masks (True = keep): keep a weight that any replaced layer kept
        return torch.stack(values).any(0)
    return first.clone()


def fold_state_dict(
    sd: dict[str, torch.Tensor], n_layer: int, n_unique: int, tie_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """A GPT state_dict -> the state_dict of the same model with `n_unique` blocks reused cyclically
    (block j = mean of the blocks it replaces, see `groups`) and, with tie_embeddings, no `lm_head`
    (wte = mean of wte and lm_head). Entries outside the blocks are kept as they are."""
    ids = {int(m["i"]) for k in sd if (m := _BLOCK_KEY.match(k)) and m["head"] == "" and m["sep"] == "."}
    if not ids:
        raise CheckpointError("the state_dict has no transformer blocks (blocks.N.*) to share")
    n_src = max(ids) + 1
    if n_unique > n_src:
        raise ConfigError(
            f"the model already shares its {n_layer} layers among {n_src} blocks; n_unique must be <= {n_src}"
        )
    out: dict[str, torch.Tensor] = {}
    by_entry: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _BLOCK_KEY.match(k)
        if m is None:
            out[k] = v
        else:
            by_entry.setdefault((m["head"], m["sep"], m["tail"]), {})[int(m["i"])] = v
    plan = groups(n_layer, n_src, n_unique)
    for (head, sep, tail), per_block in by_entry.items():
        for j, src in enumerate(plan):
            missing = [i for i in src if i not in per_block]
            if missing:
                raise CheckpointError(f"the state_dict lacks {head}blocks{sep}{missing[0]}{sep}{tail}")
            out[f"{head}blocks{sep}{j}{sep}{tail}"] = _combine([per_block[i] for i in src])
    if tie_embeddings:
        for k in [k for k in out if k.endswith(("lm_head.weight", "lm_head__weight"))]:
            head_w = out.pop(k)
            emb = k[: -len("lm_head.weight")] + ("wte.weight" if k.endswith(".weight") else "wte__weight")
            if emb in out:
                out[emb] = _combine([out[emb], head_w])
    return out


def share_model(model, n_unique: Any = 0.5, tie_embeddings: bool = True):
    """The shared version of a GPT: a new model whose config says `n_unique_layers` / `tie_embeddings`,
    with weights from `fold_state_dict`. Returns `model` itself when there is nothing to change.
    Recorded converters (prune masks, qat) are rebuilt on the new model; parameters frozen in the old
    model (freeze_layers) stay frozen under the same names."""
    from microgpt.model import build_model

    cfg = model.config
    k = resolve_n_unique(n_unique, cfg.n_layer)
    have = len(model.blocks)
    if k > have:
        raise ConfigError(
            f"the model already shares its {cfg.n_layer} layers among {have} blocks; plugins.share.n_unique "
            f"must be <= {have}, got {k}"
        )
    tie = bool(tie_embeddings) and not cfg.tie_embeddings
    if k == have and not tie:
        return model
    new_cfg = GPTConfig.from_dict(
        {
            **cfg.to_dict(),
            "n_unique_layers": None if k == cfg.n_layer else k,
            "tie_embeddings": cfg.tie_embeddings or tie,
        }
    )
    old = next(model.parameters())
    with torch.random.fork_rng(devices=[]):  # building draws an init we overwrite: leave the RNG as it was
        new = build_model(new_cfg)
    sd = fold_state_dict(model.state_dict(), cfg.n_layer, k, tie)
    try:
        new.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"cannot share this model's weights ({first_line(e)})") from None
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for n, p in new.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return new.to(device=old.device).train(model.training)


def check_config(cfg) -> None:
    """Fail at start on settings the plugin cannot run with."""
    s = cfg.plugins.share
    n_unique, tie = s.get("n_unique"), s.get("tie_embeddings")
    resolve_n_unique(n_unique, 10**6)  # the form only: the count is checked against the model in prepare
    if not isinstance(tie, bool):
        raise ConfigError(f"plugins.share.tie_embeddings must be true or false, got {tie!r}")
    if n_unique is None and not tie:
        raise ConfigError("plugins.share has nothing to do: set plugins.share.n_unique and/or tie_embeddings=true")
    if not cfg.get("init_from"):
        raise ConfigError(
            "plugins.share compresses a trained model: pass init_from=CKPT (e.g. init_from=runs/teacher/checkpoints/"
            "best.ckpt); to train a shared model from scratch set model.n_unique_layers=K (and "
            "model.tie_embeddings=true) instead"
        )
    if not (cfg.get("callbacks") or {}).get("share"):
        raise ConfigError("plugins.share needs callbacks.share (it shares the layers); enable it with +plugin=share")


class Share(L.Callback):
    """Shares the layers (and ties the head) of the model `init_from` loaded, before fit; see the module
    docstring. A model that is already shared as asked (a resumed run) is left as it is."""

    def __init__(self, n_unique: Any = 0.5, tie_embeddings: bool = True):
        self.n_unique = n_unique
        self.tie_embeddings = bool(tie_embeddings)
        self.summary: dict[str, Any] | None = None
        self._prepared = False

    def prepare(self, module, datamodule=None) -> None:
        """Called by microgpt.train.run before fit (after init_from's weights are in module.model)."""
        old = module.model
        before = old.num_params(non_embedding=False)
        new = share_model(old, self.n_unique, self.tie_embeddings)
        self._prepared = True
        if new is old:
            self.summary = {"changed": False, "params": before}
            return
        # the run's checkpoints record the shared architecture: microgpt.load and resume rebuild it directly
        module.replace_model(new)
        after = new.num_params(non_embedding=False)
        self.summary = {
            "changed": True,
            "n_layer": new.config.n_layer,
            "blocks_before": len(old.blocks),
            "blocks_after": len(new.blocks),
            "tied": new.config.tie_embeddings,
            "params_before": before,
            "params_after": after,
        }
        print(
            f"share: {len(old.blocks)} -> {len(new.blocks)} unique blocks over {new.config.n_layer} layers"
            f"{', output head tied to the embedding' if old.lm_head is not None and new.lm_head is None else ''}; "
            f"{before:,} -> {after:,} parameters ({after / before:.1%})",
            flush=True,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        # used outside microgpt.train.run: still before configure_model and the optimizer
        if not self._prepared and stage == "fit":
            self.prepare(pl_module, trainer.datamodule)
