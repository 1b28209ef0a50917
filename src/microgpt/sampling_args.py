"""Checking `python -m microgpt.generate` settings before any model is loaded, and reading the prompt.

Hydra passes `key=value` through its own override lexer, so a prompt with quotes, `@`, `~` or non-ASCII
characters may need quoting (see docs/reliability.md); `prompt_file=PATH` and `prompt=-` (stdin) take any text.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from microgpt.errors import ConfigError


def _int(cfg: DictConfig, key: str, low: int, fix: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{key} must be an integer, got {v!r}; {fix}")
    if v < low:
        raise ConfigError(f"{key} must be >= {low}, got {v}; {fix}")
    return v


def _float(cfg: DictConfig, key: str, fix: str) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{key} must be a finite number, got {v!r}; {fix}")
    return float(v)


def check_sampling(cfg: DictConfig) -> None:
    """One ConfigError line for any unusable sampling setting (types Hydra leaves as strings included)."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise ConfigError("ckpt= is required: python -m microgpt.generate ckpt=RUN_DIR_OR_CKPT prompt=...")
    _int(cfg, "max_new_tokens", 0, "pass max_new_tokens=200")
    _int(cfg, "num_samples", 1, "pass num_samples=1 or more")
    _int(cfg, "seed", -(2**63), "pass seed=1337")
    t = _float(cfg, "temperature", "pass temperature=0.8 (0 = greedy)")
    if t < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {t}")
    top_k = cfg.get("top_k")
    if top_k is not None:
        _int(cfg, "top_k", 0, "pass top_k=50, or top_k=null for no limit")
    top_p = cfg.get("top_p")
    if top_p is not None:
        p = _float(cfg, "top_p", "pass top_p=0.9, or top_p=null")
        if not 0 < p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {p}")
    check_device(cfg.get("device"))


def check_device(device: Any) -> None:
    import torch

    try:
        dev = torch.device(str(device))
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a torch device; pass device=cpu or device=cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available on this machine; pass device=cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device} but MPS is not available on this machine; pass device=cpu")


def read_prompt(cfg: DictConfig) -> str:
    """The prompt: `prompt_file=PATH` (UTF-8 text, as is), `prompt=-` (all of stdin), else `prompt=...`."""
    path = cfg.get("prompt_file")
    prompt = cfg.get("prompt")
    if path is not None and prompt not in (None, ""):
        raise ConfigError("pass either prompt=... or prompt_file=PATH, not both")
    if path is not None:
        p = Path(str(path)).expanduser()
        try:
            return p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"prompt_file {p} does not exist; pass the path of a UTF-8 text file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompt_file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"cannot read prompt_file {p}: {e.strerror}") from None
    if prompt == "-":
        return sys.stdin.read()
    if prompt is None:
        return ""
    return str(prompt)
