"""distill: train a student against a frozen teacher's soft targets.

loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * D(teacher_T || student_T) [+ w * hidden MSE]

The teacher is loaded from a microgpt checkpoint, frozen, put in eval mode on the student's device
in its own dtype, and held by the objective -- a plain Python object -- so it is never part of the
LightningModule's module tree: not in the student's state_dict, optimizer or DeepSpeed/FSDP
partitioning. Teacher and student must share the tokenizer; a mismatch stops the run at start.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from microgpt.data.chat_template import IGNORE_INDEX
from microgpt.errors import ConfigError
from microgpt.io.checkpoint import model_from_checkpoint, read_checkpoint

DIVERGENCES = ("forward_kl", "reverse_kl", "js")


def check_config(cfg) -> None:
    """Fail at start, before anything is built, on settings the plugin cannot run with."""
    d = cfg.plugins.distill
    if not d.get("teacher"):
        raise ConfigError(
            "plugins.distill.teacher is not set; train a teacher first (e.g. `python train.py model=mini "
            "hydra.run.dir=runs/teacher`) and pass plugins.distill.teacher=runs/teacher/checkpoints/best.ckpt"
        )
    if not str(d.teacher).startswith("hf:") and not Path(d.teacher).exists():
        raise ConfigError(
            f"teacher checkpoint {d.teacher} does not exist; train one first (`python train.py model=mini`) "
            "and pass its .ckpt as plugins.distill.teacher"
        )
    if d.divergence not in DIVERGENCES:
        raise ConfigError(
            f"plugins.distill.divergence={d.divergence!r} is unknown; choose one of {', '.join(DIVERGENCES)}"
        )
    if not 0.0 <= d.alpha <= 1.0 or (d.alpha_end is not None and not 0.0 <= d.alpha_end <= 1.0):
        raise ConfigError(f"plugins.distill.alpha must be in [0, 1], got {d.alpha} (alpha_end {d.alpha_end})")
    if d.temperature <= 0:
        raise ConfigError(f"plugins.distill.temperature must be > 0, got {d.temperature}")


def divergence(
    s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float, kind: str, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over tokens of D(teacher || student) between temperature-softened distributions, (..., V).
    `mask` (...,): only the True positions count (the positions the CE term is trained on: chat data leaves
    prompts and padding out); all False gives 0."""
    V = s_logits.size(-1)
    if mask is not None:
        keep = mask.reshape(-1)
        s_logits, t_logits = s_logits.reshape(-1, V)[keep], t_logits.reshape(-1, V)[keep]
        if s_logits.numel() == 0:
            return s_logits.sum() * 0.0
    s = F.log_softmax(s_logits.float().view(-1, V) / temperature, dim=-1)
    t = F.log_softmax(t_logits.float().view(-1, V) / temperature, dim=-1)
    if kind == "forward_kl":  # mass-covering: the student must cover everything the teacher considers
        per_tok = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse_kl":  # mode-seeking: the student may drop teacher modes it cannot fit
        per_tok = (s.exp() * (s - t)).sum(-1)
    else:  # Jensen-Shannon: symmetric and bounded
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - math.log(2.0)
        per_tok = 0.5 * ((t.exp() * (t - m)).sum(-1) + (s.exp() * (s - m)).sum(-1))
    return per_tok.mean()


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE over the positions of `mask` (B, T) only, (B, T, C) inputs; no mask: plain MSE."""
    if mask is None:
        return F.mse_loss(a, b)
    if not bool(mask.any()):
        return a.sum() * 0.0
    return F.mse_loss(a[mask], b[mask])


class DistillObjective:
    """The training objective with a teacher. Not an nn.Module on purpose (see module docstring)."""

    def __init__(self, teacher: nn.Module, temperature, alpha, alpha_end, alpha_steps, kind, hidden_weight, layer_map):
        self.teacher = teacher
        self.temperature = temperature
        self.alpha, self.alpha_end, self.alpha_steps = alpha, alpha_end, alpha_steps
        self.kind = kind
        self.hidden_weight = hidden_weight
        self.layer_map = layer_map

    def alpha_at(self, step: int) -> float:
        if self.alpha_end is None or not self.alpha_steps:
            return self.alpha
        frac = min(1.0, step / self.alpha_steps)
        return self.alpha + frac * (self.alpha_end - self.alpha)

    def __call__(self, module, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        use_hidden = self.hidden_weight > 0
        if use_hidden:
            s_logits, s_hidden = module.model(x, return_hidden=True)
        else:
            s_logits = module(x)
        with torch.no_grad():
            out = self.teacher(x, return_hidden=use_hidden)
        t_logits, t_hidden = out if use_hidden else (out, None)
        ce = F.cross_entropy(s_logits.view(-1, s_logits.size(-1)), y.view(-1), ignore_index=IGNORE_INDEX)
        labelled = y != IGNORE_INDEX  # the same positions as the CE term (chat data: replies only)
        mask = None if bool(labelled.all()) else labelled
        kd = divergence(s_logits, t_logits, self.temperature, self.kind, mask) * self.temperature**2
        a = self.alpha_at(module.global_step)
        loss = (1 - a) * ce + a * kd
        result = {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "logits": s_logits}
        if use_hidden:
            hid = sum(
                _masked_mse(module.distill_proj[str(si)](s_hidden[si]), t_hidden[ti].float(), mask)
                for si, ti in self.layer_map.items()
            ) / len(self.layer_map)
            loss = loss + self.hidden_weight * hid
            result.update(loss=loss, hidden=hid.detach())
        return result


class Distill(L.Callback):
    def __init__(
        self,
        teacher: str,
        temperature: float = 2.0,
        alpha: float = 0.5,
        alpha_end: float | None = None,
        alpha_steps: int | None = None,
        divergence: str = "forward_kl",
        hidden_weight: float = 0.0,
        layer_map: dict | None = None,
    ):
        self.path = teacher
        self.opts = dict(
            temperature=temperature, alpha=alpha, alpha_end=alpha_end, alpha_steps=alpha_steps, kind=divergence
        )
        self.hidden_weight = hidden_weight
        self.layer_map = {int(k): int(v) for k, v in (layer_map or {}).items()}
        self.teacher: nn.Module | None = None

    def prepare(self, module, datamodule) -> None:
        """Called by microgpt.train.run before fit: load and check the teacher, add trainable pieces."""
        ckpt = read_checkpoint(self.path)
        t_tok = ckpt["hyper_parameters"].get("tokenizer")
        s_tok = module.tokenizer_record
        if t_tok != s_tok:
            t_v = ckpt["hyper_parameters"]["model"]["vocab_size"]
            raise ConfigError(
                f"teacher {self.path} uses a different tokenizer ({t_tok.get('name')}, vocab {t_v}) than the student "
                f"({s_tok.get('name')}, vocab {module.model.config.vocab_size}); distill on the teacher's data/tokenizer "
                "(same data.tokenizer and data.path)"
            )
        teacher = model_from_checkpoint(ckpt).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        if self.hidden_weight > 0:
            s_cfg, t_cfg = module.model.config, teacher.config
            if not self.layer_map:
                self.layer_map = {s_cfg.n_layer - 1: t_cfg.n_layer - 1}
            bad = [
                f"{s}->{t}"
                for s, t in self.layer_map.items()
                if not (0 <= s < s_cfg.n_layer and 0 <= t < t_cfg.n_layer)
            ]
            if bad:
                raise ConfigError(f"plugins.distill.layer_map has layers out of range: {bad}")
            # learned projections student width -> teacher width: part of the training state (resume),
            # not of the student model (microgpt.load reads only `model.*`)
            module.add_trainable(
                "distill_proj",
                nn.ModuleDict({str(s): nn.Linear(s_cfg.n_embd, t_cfg.n_embd, bias=False) for s in self.layer_map}),
            )
        module.set_objective(
            DistillObjective(teacher, hidden_weight=self.hidden_weight, layer_map=self.layer_map, **self.opts),
            owner="distill",
        )

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.teacher is None:  # used outside microgpt.train.run
            self.prepare(pl_module, trainer.datamodule)
        # same device as the student, but its own dtype (mixed precision autocasts its matmuls anyway)
        self.teacher.to(pl_module.device)
