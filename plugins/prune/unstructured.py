"""Unstructured pruning: per-weight masks, the gradual (cubic) sparsity schedule and an L1 term.

Masks are bool buffers (True = keep) held by one submodule, `model.prune_masks`, keyed by the name of
the parameter they mask. Registering them is a converter (`prune`), recorded in the model config, so
`microgpt.load` and resume rebuild the buffers before the state_dict (which holds their values) is
loaded strictly. The masked parameters themselves stay plain `weight`s of plain modules, so other
converters that swap modules (QAT) neither lose nor break the masks, and the stored weights are the
zeroed ones: a checkpoint is sparse on disk-level inspection, with or without this plugin.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fnmatch import fnmatch

import torch
import torch.nn as nn

from microgpt.errors import ConfigError
from microgpt.registry import CONVERTER

MASKS_ATTR = "prune_masks"
DEFAULT_TARGETS = ("blocks.*.weight",)


def _key(param_name: str) -> str:
    return param_name.replace(".", "__")  # buffer names cannot contain dots


class MaskSet(nn.Module):
    """Bool masks, one per masked parameter of the model that owns this module (True = keep)."""

    def __init__(self, shapes: dict[str, torch.Size]):
        super().__init__()
        self.param_names: dict[str, str] = {}
        for name, shape in shapes.items():
            self.register_buffer(_key(name), torch.ones(shape, dtype=torch.bool))
            self.param_names[_key(name)] = name

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(parameter name, mask) pairs."""
        for key, name in self.param_names.items():
            yield name, getattr(self, key)

    def set(self, param_name: str, mask: torch.Tensor) -> None:
        getattr(self, _key(param_name)).copy_(mask)

    def extra_repr(self) -> str:
        return f"{len(self.param_names)} masks"


def target_names(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Names of the matrices (dim >= 2) that match any of the fnmatch patterns in `targets`."""
    if isinstance(targets, str):
        targets = [targets]
    return [n for n, p in model.named_parameters() if p.dim() >= 2 and any(fnmatch(n, t) for t in targets)]


@CONVERTER.register("prune")
def add_masks(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, enabled: bool = True) -> nn.Module:
    """Converter: give `model` all-ones masks for the matching matrices (values come from the checkpoint)."""
    if not enabled:
        return model
    if hasattr(model, MASKS_ATTR):
        raise ConfigError("the model already has pruning masks; list the `prune` converter once")
    names = target_names(model, targets)
    if not names:
        have = ", ".join(n for n, p in model.named_parameters() if p.dim() >= 2)
        raise ConfigError(f"prune targets {list(targets)} match no weight matrix; the model has: {have}")
    params = dict(model.named_parameters())
    model.add_module(MASKS_ATTR, MaskSet({n: params[n].shape for n in names}).to(params[names[0]].device))
    # weights that come from elsewhere (DeepSpeed's fp32 master copy in a consolidated checkpoint, a
    # hand-edited state_dict) are masked as they load, so a loaded model always honours its masks
    model.register_load_state_dict_post_hook(_mask_after_load)
    return model


def _mask_after_load(module: nn.Module, incompatible_keys) -> None:
    apply_masks_(module)


def get_masks(model: nn.Module) -> MaskSet | None:
    return getattr(model, MASKS_ATTR, None)


def _masked(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    masks = get_masks(model)
    if masks is None:
        return
    for name, mask in masks.items():
        yield model.get_parameter(name), mask


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Zero every masked weight in place (after an optimizer step, after loading)."""
    for p, m in _masked(model):
        p.masked_fill_(~m, 0)


@torch.no_grad()
def mask_grads_(model: nn.Module) -> None:
    """Zero the gradients of pruned weights: gradient clipping and the optimizer then ignore them."""
    for p, m in _masked(model):
        if p.grad is not None:
            p.grad.masked_fill_(~m, 0)


def sparsity_at(step: int, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) gradual schedule: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3.

    `initial` before `start`, `final` from `end` on; steep early (while the weights are redundant),
    flat towards the end (when each removal costs more).
    """
    if step < start:
        return initial
    if step >= end:
        return final
    frac = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


def is_update_step(step: int, start: int, end: int, frequency: int) -> bool:
    """Masks change at start, start + frequency, ... and at end (Zhu & Gupta's t0 + n*dt)."""
    return start <= step <= end and ((step - start) % frequency == 0 or step == end)


@torch.no_grad()
def update_masks_(model: nn.Module, sparsity: float, scope: str = "layer") -> None:
    """Prune the smallest-|w| weights so that `sparsity` of each masked matrix (scope=layer) or of all
    of them together (scope=global) is zero. Already pruned weights stay pruned (masks only shrink)."""
    masks = get_masks(model)
    if masks is None:
        raise ConfigError("the model has no pruning masks; enable the `prune` converter (model.converters.prune)")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    pairs = [(name, model.get_parameter(name), m) for name, m in masks.items()]
    # already-pruned weights score -1 (below any |w|): they are the first to be counted as pruned
    scores = [
        torch.where(m, p.detach().abs().float(), torch.full_like(p, -1.0, dtype=torch.float32)) for _, p, m in pairs
    ]
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores])
        new = _keep_mask(flat, sparsity)
        offset = 0
        for (name, p, _), s in zip(pairs, scores):
            masks.set(name, new[offset : offset + s.numel()].view_as(p))
            offset += s.numel()
    elif scope == "layer":
        for (name, p, _), s in zip(pairs, scores):
            masks.set(name, _keep_mask(s.flatten(), sparsity).view_as(p))
    else:
        raise ConfigError(f"plugins.prune.scope must be 'layer' or 'global', got {scope!r}")
    apply_masks_(model)


def _keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(round(sparsity * scores.numel()))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(scores, k, largest=False, sorted=False).indices] = False
    return keep


def sparsity_of(model: nn.Module, names: Sequence[str] | None = None) -> float:
    """Fraction of exactly-zero entries over the masked matrices (or `names`)."""
    if names is None:
        masks = get_masks(model)
        names = [n for n, _ in masks.items()] if masks is not None else target_names(model)
    total = zeros = 0
    for n in names:
        p = model.get_parameter(n)
        total += p.numel()
        zeros += int((p == 0).sum())
    return zeros / max(1, total)


def bake_masks(model: nn.Module) -> nn.Module:
    """Apply the masks for good and drop them (and the `prune` converter): a plain model with zeros."""
    if get_masks(model) is None:
        return model
    apply_masks_(model)
    delattr(model, MASKS_ATTR)
    model.config.converters = [c for c in model.config.converters if c.get("name") != "prune"]
    return model


class L1Term:
    """A loss term (LitGPT.add_loss_term): weight * mean(|w|) over the target matrices (sparsity-inducing).

    The mean (not the sum) keeps `weight` meaningful across model sizes. Not an nn.Module: it holds no
    state of its own and must stay outside the LightningModule's module tree.
    """

    def __init__(self, weight: float, targets: Sequence[str] = DEFAULT_TARGETS):
        self.weight = weight
        self.targets = list(targets)
        self._names: tuple[int, list[str]] = (0, [])

    def names(self, model: nn.Module) -> list[str]:
        """The target matrices of `model` (looked up again when another plugin replaced the model)."""
        if self._names[0] != id(model):
            self._names = (id(model), target_names(model, self.targets))
        return self._names[1]

    def __call__(self, module, batch, out) -> dict[str, torch.Tensor]:
        ps = [module.model.get_parameter(n) for n in self.names(module.model)]
        l1 = sum(p.abs().sum() for p in ps) / sum(p.numel() for p in ps)
        return {"loss": self.weight * l1, "l1": l1.detach()}
