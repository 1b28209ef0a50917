"""Evaluate a checkpoint on text: loss, perplexity and bits per byte over the whole val split.

    python -m microgpt.evaluate ckpt=PATH data=text data.path=FILE
The last line printed is one JSON object (val_loss, perplexity, bits_per_byte, tokens, ...).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from microgpt.cli import CONF_DIR, exit_on_error, quiet_env
from microgpt.errors import ConfigError


@torch.no_grad()
def evaluate_model(model, batches: Iterable, bytes_per_token: float, max_batches: int | None = None) -> dict:
    """Token-weighted mean cross-entropy over `batches` of (x, y)."""
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x)
        nll += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
        tokens += y.numel()
    if tokens == 0:
        raise ConfigError("nothing to evaluate: the val split holds less than one block; use a longer text")
    loss = nll / tokens
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss / math.log(2) / bytes_per_token,
        "tokens": tokens,
    }


def evaluate(cfg: DictConfig) -> dict:
    from microgpt import load
    from microgpt.train import _instantiate

    model, tokenizer = load(cfg.ckpt, map_location=cfg.device)
    dm = _instantiate(cfg.data, "data", tokenizer_obj=tokenizer, block_size=model.config.block_size)
    dm.setup("validate")
    result = evaluate_model(model, dm.full_val_batches(cfg.batch_size), dm.bytes_per_token, cfg.max_batches)
    result["ckpt"] = str(cfg.ckpt)
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
@exit_on_error
def main(cfg: DictConfig) -> None:
    print(json.dumps(evaluate(cfg)), flush=True)


if __name__ == "__main__":
    quiet_env()
    main()
