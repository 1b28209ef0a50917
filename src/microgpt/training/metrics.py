"""Language-model metrics as a torchmetrics Metric, so they reduce correctly across ranks."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class LMMetrics(Metric):
    """Token-weighted mean cross-entropy -> loss (nats/token), perplexity and bits per byte.

    bits_per_byte = loss / ln 2 / bytes_per_token: comparable across tokenizers (char, byte, BPE),
    which loss and perplexity are not.
    """

    full_state_update = False

    def __init__(self, bytes_per_token: float = 1.0):
        super().__init__()
        self.bytes_per_token = float(bytes_per_token)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mean_loss: torch.Tensor, n_tokens: int) -> None:
        self.nll_sum += mean_loss.detach().double() * n_tokens
        self.tokens += n_tokens

    def compute(self) -> dict[str, torch.Tensor]:
        loss = (self.nll_sum / self.tokens.clamp(min=1)).float()
        return {
            "loss": loss,
            "perplexity": loss.exp(),
            "bits_per_byte": loss / math.log(2) / self.bytes_per_token,
        }
