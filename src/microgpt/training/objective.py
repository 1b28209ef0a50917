"""What train.py returns to a Hydra sweeper (optuna): the value(s) named by cfg.objectives."""

from __future__ import annotations

import io
from typing import Any

from omegaconf import DictConfig

from microgpt.errors import ConfigError


def model_bytes(model) -> int:
    """Size of the model's weights as saved (torch.save of its state_dict): what compression shrinks."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def objective(cfg: DictConfig, result: dict[str, Any]) -> float | list[float]:
    """The value(s) train.py returns to a Hydra sweeper, from cfg.objectives (default [val_loss]).

    Names: val_loss, best_val_loss (from run()'s result), model_bytes (the trained model's saved weights).
    One name -> a float (single-objective Optuna); several -> a list (multi-objective, one direction each).
    """
    names = list(cfg.get("objectives") or ["val_loss"])
    values = []
    for name in names:
        if name in ("val_loss", "best_val_loss"):
            values.append(float(result[name]))
        elif name == "model_bytes":
            values.append(float(model_bytes(result["module"].model)))
        else:
            raise ConfigError(f"objectives: unknown {name!r}; use val_loss, best_val_loss or model_bytes")
    return values[0] if len(values) == 1 else values
