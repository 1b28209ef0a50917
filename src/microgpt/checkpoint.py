"""Reading checkpoints safely and rebuilding models from them without Hydra or Lightning."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from microgpt.config import GPTConfig
from microgpt.errors import CheckpointError
from microgpt.model import GPT, build_model


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A .ckpt file, or a run directory (its checkpoints/last.ckpt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if cand.is_file():
                return cand
        raise CheckpointError(f"no checkpoint in directory {p} (looked for checkpoints/last.ckpt); pass a .ckpt file")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist; pass the path of a .ckpt file from a run's checkpoints/")
    return p


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint is data, never code to execute."""
    p = resolve_checkpoint(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {p} is corrupt or not a microgpt checkpoint ({first}); retrain or pick another file") from None
    except Exception as e:  # pickle.UnpicklingError for anything outside the weights-only allowlist
        raise CheckpointError(f"checkpoint {p} cannot be loaded safely ({type(e).__name__}); it may hold arbitrary code") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"{p} is not a microgpt checkpoint (no model config or state_dict); pass a .ckpt written by train.py")
    return ckpt


def import_recorded_plugins(hparams: dict[str, Any]) -> None:
    """Import the plugins a checkpoint was trained with: they may register its components/converters."""
    plugins = hparams.get("plugins") or {}
    if plugins:
        from microgpt.plugins import load_plugin

        for name, where in plugins.items():
            load_plugin(name, extra_dirs=[where] if where and Path(where).is_dir() else None)


def model_from_checkpoint(ckpt: dict[str, Any]) -> GPT:
    hp = ckpt["hyper_parameters"]
    import_recorded_plugins(hp)
    model = build_model(GPTConfig.from_dict(dict(hp["model"])))
    prefix = "model."
    sd = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not match its model config ({str(e).splitlines()[0]})") from None
    return model


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """`model, tokenizer = microgpt.load(path)`: the GPT in eval mode and its tokenizer."""
    from microgpt.data.tokenizers import tokenizer_from_dict

    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(map_location).eval()
    tok = ckpt["hyper_parameters"].get("tokenizer")
    if tok is None:
        raise CheckpointError(f"checkpoint {path} has no tokenizer; it was not written by microgpt's train.py")
    return model, tokenizer_from_dict(tok)
