"""The LightningModule: a thin shell around GPT that owns the training step, metrics and optimizer.

Everything else (strategy, callbacks, loggers, the optimizer class) comes from Hydra `_target_`s.
Plugins change the model and the loss only through the contract methods below (add_converter,
replace_model, set_objective, add_loss_term, add_trainable; see microgpt.plugins.Preparer). This module
owns the model's config record: `hparams["model"]` is always `self.model.config`, also in checkpoints.
The objective and loss terms are plain callables, not submodules, so a distillation teacher an objective
holds never enters this module's state_dict, optimizer or sharding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from microgpt.config import GPTConfig
from microgpt.errors import ConfigError, TrainingError
from microgpt.model import GPT, build_model
from microgpt.registry import CONVERTER
from microgpt.training.metrics import LMMetrics


def cross_entropy(module: LitGPT, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The default objective: next-token cross-entropy, averaged over targets (labels of -100 are ignored)."""
    x, y = batch
    logits = module(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    return {"loss": loss, "logits": logits}  # the logits go along for loss terms (not logged)


def lr_lambda(
    step: int,
    warmup_steps: int,
    decay_steps: int,
    min_lr_ratio: float,
    shape: str = "cosine",
    cooldown_fraction: float = 0.2,
) -> float:
    """Linear warmup, then decay to min_lr_ratio at decay_steps, then flat.

    shape: cosine (nanoGPT's get_lr) | linear (straight line from peak to min_lr) | wsd (warmup-stable-decay:
    flat at the peak, then linear to min_lr over the last `cooldown_fraction` of the decay window).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    if shape == "cosine":
        return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)
    if shape == "wsd":
        progress = max(0.0, (progress - (1.0 - cooldown_fraction)) / cooldown_fraction)
    return 1.0 - progress * (1.0 - min_lr_ratio)


class LitGPT(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 100,
        decay_steps: int = 2000,
        min_lr: float = 1e-4,
        lr_shape: str = "cosine",
        cooldown_fraction: float = 0.2,
        tokenizer: dict[str, Any] | None = None,
        bytes_per_token: float = 1.0,
        compile: bool = False,
        plugins: dict[str, Any] | None = None,
        decay_embeddings: bool = False,
    ):
        super().__init__()
        # hyperparameters are plain data (no callables): a checkpoint loads with weights_only=True and
        # rebuilds model and tokenizer without Hydra
        self.save_hyperparameters(ignore=["optimizer"])
        self.model: GPT = build_model(GPTConfig.from_dict(dict(model)))
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-3)
        self.objective: Callable[[LitGPT, Any], dict[str, torch.Tensor]] = cross_entropy
        self._objective_owner: str | None = None
        self.loss_terms: dict[str, Callable[[LitGPT, Any, dict], dict[str, torch.Tensor]]] = {}
        self.val_metrics = LMMetrics(bytes_per_token)
        self._compiled: Callable | None = None

    # ---- the plugin contract: the only ways a plugin changes the model or the loss ----------------------

    def add_converter(self, spec: dict[str, Any]) -> None:
        """Apply the registered converter `spec["name"]` (with the other keys as options) to the model and
        record it in the model config, so checkpoints rebuild it on load and resume."""
        opts = dict(spec)
        name = opts.pop("name")
        self.model = CONVERTER.get(name)(self.model, **opts)
        self.model.config.converters = [*self.model.config.converters, {"name": name, **opts}]
        self._record_model()

    def replace_model(self, model: GPT) -> None:
        """Train `model` from now on (before fit); its config is what the checkpoints record."""
        self.model = model
        self._record_model()

    def set_objective(self, fn: Callable[[LitGPT, Any], dict[str, torch.Tensor]], owner: str) -> None:
        """Replace the base loss (next-token cross-entropy) by fn(module, batch) -> {"loss", **logs}; one
        plugin may own it, a second one is refused."""
        if self._objective_owner not in (None, owner):
            raise ConfigError(
                f"plugins {self._objective_owner} and {owner} both replace the training objective; use one of them"
            )
        self.objective, self._objective_owner = fn, owner

    def add_loss_term(self, name: str, fn: Callable[[LitGPT, Any, dict], dict[str, torch.Tensor]]) -> None:
        """Add fn(module, batch, out) -> {"loss": term, **logs} to the objective's loss. `out` is what the
        objective returned (its "loss", its logs and, from the shipped objectives, "logits"). Terms are
        added after the objective, in the order they were added (the order of `callbacks`); their logs
        join the objective's (as train_<key>)."""
        if name in self.loss_terms:
            raise ConfigError(f"a loss term named {name!r} is already added; each plugin adds its own")
        self.loss_terms[name] = fn

    def add_trainable(self, name: str, part: torch.nn.Module) -> None:
        """Train `part` with the model (its parameters join the optimizer, checkpoints and resume) without
        making it part of the model: `microgpt.load` and exports read only `model.*`."""
        if hasattr(self, name):
            raise ConfigError(f"cannot add trainable part {name!r}: the module already has an attribute of that name")
        self.add_module(name, part)

    def compute_loss(self, batch) -> dict[str, torch.Tensor]:
        """The objective, then each loss term in order: {"loss": total, **logs}."""
        out = dict(self.objective(self, batch))
        for fn in self.loss_terms.values():
            extra = dict(fn(self, batch, out))
            out["loss"] = out["loss"] + extra.pop("loss")
            out.update(extra)
        return out

    @property
    def tokenizer_record(self) -> dict[str, Any] | None:
        """The tokenizer this run trains with, as checkpoints record it (read-only for plugins)."""
        return self.hparams.get("tokenizer")

    @property
    def plugins_record(self) -> dict[str, str]:
        """The plugins that build this model -> the folder each came from, as checkpoints record it."""
        return dict(self.hparams.get("plugins") or {})

    def _record_model(self) -> None:
        self.hparams["model"] = self.model.config.to_dict()

    # ---- Lightning hooks ------------------------------------------------------------------------------

    def configure_model(self) -> None:
        # Lightning calls this before building optimizers and wrapping for DDP/DeepSpeed/FSDP:
        # sharding (FSDP2 under ModelParallelStrategy) happens here, never after
        from microgpt.training.strategies import shard_for_strategy

        shard_for_strategy(self)
        if self.hparams.compile and self._compiled is None:
            # compile the inner model but keep it out of the module tree: state_dict keys stay plain
            object.__setattr__(self, "_compiled", torch.compile(self.model))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # `is not None`: truth-testing torch.compile's wrapper raises
        return (self._compiled if self._compiled is not None else self.model)(idx)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        loss = out["loss"]
        # every step, so no checkpoint is ever written from NaN weights; one scalar read (a sync on a GPU)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"loss is {value} at step {self.global_step}; the last good checkpoint is kept. "
                "Lower optimizer.lr, raise warmup, or use trainer.gradient_clip_val"
            )
        if self._logging_step():
            self.log("train_loss", loss, prog_bar=True)
            for k, v in out.items():
                if k not in ("loss", "logits"):
                    self.log(f"train_{k}", v)
        return loss

    def _logging_step(self) -> bool:
        # Lightning writes step metrics to the loggers every trainer.log_every_n_steps only; self.log on the
        # other steps is discarded work (~2% of a baby GPT's CPU step), so skip it there
        connector = getattr(self._trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` twice around every hook call; nn.Module.__setattr__'s checks
        # for parameters and submodules cost ~1% of a baby GPT's step, and this name is neither
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        # targets only: chat data labels its prompts and padding -100 (cross_entropy's ignore_index)
        n = int((y != -100).sum())
        if n == 0:
            return
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        self.val_metrics.update(loss, n)

    def on_validation_epoch_end(self) -> None:
        m = self.val_metrics.compute()
        self.log("val_loss", m["loss"], prog_bar=True, sync_dist=False)
        self.log("val_ppl", m["perplexity"])
        self.log("val_bpb", m["bits_per_byte"], prog_bar=True)
        self.val_metrics.reset()

    def configure_optimizers(self):
        # weight decay by tensor dimension, as nanoGPT does: every >= 2-D tensor (a plugin's projections too),
        # not norms or biases, and the embedding tables (nn.Embedding, by type) only with decay_embeddings
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, torch.nn.Embedding)}
        decay, no_decay = [], []
        decay_names, no_decay_names = [], []
        for name, p in self.named_parameters():  # the model plus any trainable plugin parts
            if not p.requires_grad:
                continue
            is_embedding = id(p) in embeddings
            is_matrix = p.dim() >= 2 and (self.hparams.get("decay_embeddings", False) or not is_embedding)
            (decay if is_matrix else no_decay).append(p)
            (decay_names if is_matrix else no_decay_names).append(name)
        factory = self.optimizer_factory
        wd = getattr(factory, "keywords", {}).get("weight_decay", 0.0)
        # param_names (torch's own group key) lets an optimizer treat parameters by role (optimizer=muon)
        groups = [
            {"params": decay, "param_names": decay_names, "weight_decay": wd},
            {"params": no_decay, "param_names": no_decay_names, "weight_decay": 0.0},
        ]
        kwargs = {}
        # Lightning cannot clip gradients for a fused optimizer under mixed precision (it would unscale inside);
        # under bf16-mixed there is nothing to unscale, and this module clips (configure_gradient_clipping)
        trainer = self._trainer
        clipped_amp = (
            trainer is not None
            and "mixed" in str(trainer.precision)
            and bool(trainer.gradient_clip_val)
            and not _unscaled_mixed(trainer)
        )
        if "fused" not in getattr(factory, "keywords", {}) and not clipped_amp and _fused_ok(factory, decay + no_decay):
            kwargs["fused"] = True  # one kernel for the whole update instead of a loop over tensors
        optimizer = factory(groups, **kwargs)
        base_lr = optimizer.param_groups[0]["lr"]
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            partial(
                lr_lambda,
                warmup_steps=self.hparams.warmup_steps,
                decay_steps=self.hparams.decay_steps,
                min_lr_ratio=self.hparams.min_lr / base_lr,
                shape=self.hparams.get("lr_shape", "cosine"),
                cooldown_fraction=self.hparams.get("cooldown_fraction", 0.2),
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """trainer.gradient_clip_val for a fused optimizer under bf16-mixed, which Lightning refuses to clip for
        (it guards against fp16's loss scaler, absent here: the gradients are already the true ones). Clipped
        as Lightning clips them (the norm or the values of every parameter the optimizer holds)."""
        # (DeepSpeed's and other wrappers have no `defaults`; their precision plugins are not MixedPrecision)
        fused = (getattr(optimizer, "defaults", None) or {}).get("fused")
        if gradient_clip_val and fused and _unscaled_mixed(self._trainer):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # exact resume: dropout and sampling draw from torch's global RNG; keep it with the checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the model's config record is derived from the model itself, whatever happened to it since __init__
        checkpoint.setdefault("hyper_parameters", {})["model"] = self.model.config.to_dict()
        checkpoint["rng_torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["rng_cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_torch" in checkpoint:
            torch.set_rng_state(checkpoint["rng_torch"])
        if "rng_cuda" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])


def _unscaled_mixed(trainer) -> bool:
    """Lightning's own mixed-precision plugin without a loss scaler (bf16-mixed): gradients need no unscaling."""
    plugin = getattr(trainer, "precision_plugin", None)
    return type(plugin) is L.pytorch.plugins.precision.MixedPrecision and plugin.scaler is None


def _fused_ok(factory, params) -> bool:
    cls = getattr(factory, "func", factory)
    if cls not in (torch.optim.AdamW, torch.optim.Adam) or not params:
        return False
    dev = params[0].device.type
    # fused AdamW exists for CUDA and (torch >= 2.4) CPU; DTensor/meta params take the default path
    return dev in ("cuda", "cpu") and all(type(p) is torch.nn.Parameter for p in params)
