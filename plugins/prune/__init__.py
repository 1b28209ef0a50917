"""prune: make a trained GPT sparser (unstructured) or genuinely smaller (structured, head reduction).

During training (`+plugin=prune`): gradual magnitude pruning. Masks (converter `prune`, recorded in
the model config) grow on Zhu & Gupta's cubic schedule from `start_step` to `end_step` up to
`sparsity`; pruned weights are zeroed after every optimizer step and their gradients before it (so
clipping and the optimizer ignore them). An optional L1 term (`l1`) is added to the objective.
Masks live in the checkpoint: `microgpt.load` rebuilds them, and resume continues the schedule exactly.

On a checkpoint (a command, see docs/prune.md):
    python plugins/prune/cli.py ckpt=PATH heads=0.5 mlp=0.5 [layers=1] [kv_heads=2] out=PRUNED.ckpt
removes heads / MLP neurons / layers ranked by magnitude, first-order Taylor or Fisher importance,
and/or merges key/value heads (MHA -> GQA/MQA); the result is a smaller model that loads with
`microgpt.load` and trains on with `python train.py init_from=PRUNED.ckpt ...`.

Python API: `importance`, `prune_structured`, `to_gqa`, `sparsity_at`, `update_masks_`, `bake_masks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from microgpt.errors import ConfigError

from .importance import METHODS, importance
from .structured import apply_plan, plan, prune_structured, pruned_checkpoint, to_gqa
from .unstructured import (
    DEFAULT_TARGETS,
    L1Term,
    add_masks,
    apply_masks_,
    bake_masks,
    get_masks,
    is_update_step,
    mask_grads_,
    sparsity_at,
    sparsity_of,
    target_names,
    update_masks_,
)

__all__ = [
    "METHODS",
    "L1Term",
    "Prune",
    "add_masks",
    "apply_masks_",
    "apply_plan",
    "bake_masks",
    "importance",
    "plan",
    "prune_structured",
    "pruned_checkpoint",
    "sparsity_at",
    "sparsity_of",
    "to_gqa",
    "update_masks_",
]


def needs_full_weights(cfg) -> bool:
    """Masks need the whole weight matrix on every rank (the contract refuses sharding strategies)."""
    return cfg.plugins.prune.sparsity > 0


def bake(model):
    """The contract's "plain weights" hook: apply the masks for good and drop them (see `bake_masks`)."""
    return bake_masks(model)


def check_config(cfg) -> None:
    """Fail at start on settings the plugin cannot run with."""
    p = cfg.plugins.prune
    if not 0.0 <= p.sparsity < 1.0:
        raise ConfigError(f"plugins.prune.sparsity must be in [0, 1), got {p.sparsity}")
    if not 0.0 <= p.initial_sparsity <= p.sparsity:
        raise ConfigError(
            f"plugins.prune.initial_sparsity must be in [0, sparsity={p.sparsity}], got {p.initial_sparsity}"
        )
    if p.frequency is None or p.frequency < 1:
        raise ConfigError(f"plugins.prune.frequency must be >= 1 step, got {p.frequency}")
    if p.start_step < 0 or (p.end_step is not None and p.end_step <= p.start_step):
        raise ConfigError(f"plugins.prune needs 0 <= start_step < end_step, got {p.start_step} and {p.end_step}")
    if p.scope not in ("layer", "global"):
        raise ConfigError(f"plugins.prune.scope must be 'layer' or 'global', got {p.scope!r}")
    if p.l1 < 0:
        raise ConfigError(f"plugins.prune.l1 must be >= 0, got {p.l1}")


class Prune(L.Callback):
    """Gradual magnitude pruning (+ optional L1) during training; see the module docstring."""

    def __init__(
        self,
        sparsity: float = 0.5,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int = 10,
        scope: str = "layer",
        targets: Sequence[str] = DEFAULT_TARGETS,
        l1: float = 0.0,
    ):
        self.sparsity = float(sparsity)
        self.initial = float(initial_sparsity)
        self.start = int(start_step)
        self.end = end_step
        self.frequency = int(frequency)
        self.scope = scope
        self.targets = list(targets)
        self.l1 = float(l1)
        self._prepared = False
        self._last_update: int | None = None

    def prepare(self, module, datamodule=None) -> None:
        """Before fit: make sure the model has masks (init_from models bring their own config)."""
        model = module.model
        if self.sparsity > 0 and get_masks(model) is None:
            specs = [c for c in model.config.converters if c.get("name") == "prune"]
            if specs:  # recorded but disabled: the checkpoint would not reload with masks added now
                raise ConfigError("plugins.prune.sparsity > 0 needs masks, but model.converters.prune.enabled=false")
            # recorded in the model config, so checkpoints of this run rebuild the masks on load / resume
            module.add_converter({"name": "prune", "targets": list(self.targets), "enabled": True})
            model = module.model
        if self.l1 > 0 and not target_names(model, self.targets):
            raise ConfigError(f"plugins.prune.targets {self.targets} match no weight matrix for the L1 term")
        if self.l1 > 0:  # resolves its matrices on the model it finds (share may replace the model after us)
            module.add_loss_term("prune_l1", L1Term(self.l1, self.targets))
        self._prepared = True

    def end_step(self, trainer) -> int:
        end = self.end if self.end is not None else max(self.start + 1, int(0.75 * trainer.max_steps))
        if end <= self.start:
            raise ConfigError(f"plugins.prune.end_step={end} must be after start_step={self.start}")
        return end

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self._prepared:  # used outside microgpt.train.run
            self.prepare(pl_module, trainer.datamodule)
        self._end = self.end_step(trainer)
        apply_masks_(pl_module.model)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        mask_grads_(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        model = pl_module.model
        if get_masks(model) is None:
            return
        step = trainer.global_step  # optimizer steps done
        if step != self._last_update and is_update_step(step, self.start, self._end, self.frequency):
            update_masks_(model, sparsity_at(step, self.sparsity, self.start, self._end, self.initial), self.scope)
            self._last_update = step
        else:
            apply_masks_(model)  # the optimizer (momentum, weight decay) must not revive pruned weights
        if step % max(1, trainer.log_every_n_steps) == 0:
            pl_module.log("prune_sparsity", sparsity_of(model), on_step=True, on_epoch=False)
