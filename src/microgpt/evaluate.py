"""Evaluate a checkpoint on text: loss, perplexity and bits per byte.

    python -m microgpt.evaluate ckpt=PATH data=text data.path=held_out.txt   # the whole file
    python -m microgpt.evaluate ckpt=outputs/DATE/TIME                       # the run's own val split

With `data=...` the text is scored whole (split=all); without it, the checkpoint's run config (config.yaml
in its run directory) gives the data and its val split is scored. `split=val` scores only the last
data.val_fraction of a given text. The last line printed is one JSON object (val_loss, perplexity,
bits_per_byte, tokens, split, ...); a one-line account goes to stderr.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from microgpt.cli import CONF_DIR, exit_on_error, quiet_env
from microgpt.errors import ConfigError, DataError

SPLITS = ("all", "val")


@torch.no_grad()
def evaluate_model(model, batches: Iterable, bytes_per_token: float, max_batches: int | None = None) -> dict:
    """Token-weighted mean cross-entropy over `batches` of (x, y)."""
    model.eval()
    device = getattr(model, "device", None) or next(model.parameters()).device  # OnnxGPT: no parameters
    nll, tokens = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x)
        # positions labelled -100 (a chat prompt, padding) are not scored: they count neither loss nor tokens
        nll += F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
        tokens += int((y != -100).sum())
    if tokens == 0:
        raise ConfigError("nothing to evaluate: the text holds less than two tokens; use a longer text")
    loss = nll / tokens
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss / math.log(2) / bytes_per_token,
        "tokens": tokens,
    }


def blocks(data: np.ndarray, block_size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping consecutive blocks over all of `data`: every token after the first is a target once;
    the tail shorter than a block comes last as a (1, r) batch."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}")
    T = block_size
    n_blocks = (len(data) - 1) // T
    for b in range(0, n_blocks, batch_size):
        rows = [
            np.asarray(data[s * T : s * T + T + 1], dtype=np.int64) for s in range(b, min(b + batch_size, n_blocks))
        ]
        w = torch.from_numpy(np.stack(rows))
        yield w[:, :-1].contiguous(), w[:, 1:].contiguous()
    tail = len(data) - 1 - n_blocks * T
    if tail > 0:
        w = torch.from_numpy(np.asarray(data[n_blocks * T :], dtype=np.int64))
        yield w[None, :-1].contiguous(), w[None, 1:].contiguous()


def text_batches(tokenizer, text: str, block_size: int, batch_size: int) -> tuple[Iterator, float]:
    """All of `text` as (x, y) blocks (`blocks`) and its bytes per token: what split=all scores."""
    from microgpt.data.datamodule import tokenizer_mismatch

    try:
        tokens = tokenizer.encode_array(text)
    except DataError:
        raise DataError(tokenizer_mismatch(tokenizer, text)) from None
    if len(tokens) < 2:
        raise ConfigError("nothing to evaluate: the text holds less than two tokens; use a longer text")
    return blocks(tokens, block_size, batch_size), tokenizer.count_bytes(tokens) / len(tokens)


def evaluate_text(model, tokenizer, text: str, batch_size: int = 16) -> dict:
    """`evaluate_model` on the whole of `text` (what `python -m microgpt.evaluate ckpt=... data.path=FILE` gives)."""
    batches, bpt = text_batches(tokenizer, text, model.config.block_size, batch_size)
    return evaluate_model(model, batches, bpt)


def run_config(ckpt: str) -> DictConfig:
    """The config.yaml that train.py wrote into the checkpoint's run directory."""
    p = Path(ckpt).expanduser()
    for d in (p, p.parent, p.parent.parent) if p.suffix == ".ckpt" or p.is_file() else (p,):
        f = d / "config.yaml"
        if f.is_file():
            return OmegaConf.load(f)
    raise ConfigError(
        f"{ckpt} has no run config (config.yaml in its run directory) to take data settings from; "
        "pass the text to score: data=text data.path=FILE"
    )


def _data_node(cfg: DictConfig) -> tuple[DictConfig, str]:
    """The data settings to use and the split to score."""
    split = cfg.get("split")
    if split is not None and split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)} (or null), got {split!r}")
    if cfg.get("data") is not None:
        return cfg.data, split or "all"
    saved = run_config(cfg.ckpt)
    data = saved.get("data")
    if data is None:
        raise ConfigError(f"the run config of {cfg.ckpt} has no data settings; pass data=text data.path=FILE")
    data = OmegaConf.create(OmegaConf.to_container(_resolved_data(saved), resolve=False))
    return data, split or "val"


def _resolved_data(saved: DictConfig) -> DictConfig:
    # resolve data's own interpolations (${model.block_size}, ${seed}, ${paths.cache_dir}) in the run's config
    try:
        return OmegaConf.create(OmegaConf.to_container(saved.data, resolve=True))
    except Exception as e:  # an interpolation of the training session (hydra:...) that cannot resolve here
        raise ConfigError(
            f"cannot read the run's data settings ({str(e).splitlines()[0]}); pass data=text data.path=FILE"
        ) from None


def evaluate(cfg: DictConfig) -> dict:
    from microgpt import load
    from microgpt.train import _instantiate

    model, tokenizer = load(cfg.ckpt, map_location=cfg.device)
    data, split = _data_node(cfg)
    dm = _instantiate(data, "data", tokenizer_obj=tokenizer, block_size=model.config.block_size)
    if split == "val":
        dm.setup("validate")
        batches, bpt = dm.full_val_batches(cfg.batch_size), dm.bytes_per_token
    else:
        batches, bpt = text_batches(tokenizer, dm._read_text(), model.config.block_size, cfg.batch_size)
    result = evaluate_model(model, batches, bpt, cfg.max_batches)
    result.update(split=split, source=data.get("path") or data.get("source"), ckpt=str(cfg.ckpt))
    return result


def describe(result: dict) -> str:
    what = "the whole text" if result["split"] == "all" else "the val split"
    partial = " (max_batches: not all of it)" if result.get("partial") else ""
    return (
        f"scored {result['tokens']:,} tokens, {what} of {result['source']}{partial}: loss {result['val_loss']:.4f}, "
        f"perplexity {result['perplexity']:.2f}, {result['bits_per_byte']:.3f} bits/byte"
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
@exit_on_error
def main(cfg: DictConfig) -> None:
    result = evaluate(cfg)
    result["partial"] = cfg.max_batches is not None
    print(describe(result), file=sys.stderr, flush=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    quiet_env()
    main()
