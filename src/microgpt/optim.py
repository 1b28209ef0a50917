"""Optimizers that need more than a parameter list: Muon for the blocks' matrices, AdamW for the rest.

Muon (Jordan et al. 2024) replaces each 2-D weight's momentum update by its nearest semi-orthogonal
matrix, computed with a few Newton-Schulz iterations, so every direction of the update moves at the same
rate. It suits the hidden matrices of the transformer blocks; embeddings, the output head, norms and
biases keep AdamW. One optimizer object holds both kinds of parameter group, so Lightning, the learning
rate schedule, checkpoints and exact resume see a single ordinary `torch.optim.Optimizer`.

LitGPT passes parameter groups carrying `param_names` (torch's own key for named groups); a parameter
goes to Muon when it is 2-D and lives inside a transformer block (`blocks.` in its name).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

# quintic Newton-Schulz coefficients that push singular values towards 1 fast (Jordan et al. 2024)
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (approximately: singular values land in ~[0.7, 1.2])."""
    a, b, c = NS_COEFFS
    x = g.float()
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


class MuonAdamW(Optimizer):
    """Muon on block matrices, AdamW on everything else, one learning rate for both.

    The Muon update is rescaled by 0.2 * sqrt(max(rows, cols)) so its RMS matches a typical AdamW update
    (Liu et al. 2025, "Muon is scalable"): the AdamW learning rate and schedule carry over unchanged.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        muon_lr_scale: float = 1.0,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        split: list[dict[str, Any]] = []
        for g in groups:
            names = g.get("param_names")
            if names is None:
                raise ValueError("MuonAdamW needs named parameter groups ('param_names'); build it from LitGPT")
            rest = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            muon = [(n, p) for n, p in zip(names, g["params"]) if p.dim() == 2 and "blocks." in n]
            adam = [(n, p) for n, p in zip(names, g["params"]) if not (p.dim() == 2 and "blocks." in n)]
            for use_muon, members in ((True, muon), (False, adam)):
                if members:
                    split.append(
                        {
                            **rest,
                            "params": [p for _, p in members],
                            "param_names": [n for n, _ in members],
                            "use_muon": use_muon,
                        }
                    )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            muon_lr_scale=muon_lr_scale,
            use_muon=False,
        )
        super().__init__(split, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd:
                    p.mul_(1 - lr * wd)  # decoupled weight decay, as AdamW
                if group["use_muon"]:
                    self._muon(p, group, lr)
                else:
                    self._adamw(p, group, lr)
        return loss

    def _muon(self, p: torch.Tensor, group: dict[str, Any], lr: float) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        update = orthogonalize(g, group["ns_steps"])
        scale = 0.2 * max(p.shape) ** 0.5 * group["muon_lr_scale"]
        p.add_(update, alpha=-lr * scale)

    def _adamw(self, p: torch.Tensor, group: dict[str, Any], lr: float) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(p.grad, 1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
