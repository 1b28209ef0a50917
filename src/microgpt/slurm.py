"""SLURM pre-flight: before a multirun on the SLURM launcher (conf/hydra/launcher/slurm.yaml), fail in seconds
with one line when no controller answers. `hydra.callbacks.slurm_check` (conf/hydra/default.yaml) runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from microgpt.errors import MicroGPTError

SLURM_TIMEOUT_S = 15.0


class SlurmUnavailableError(MicroGPTError):
    """No SLURM cluster answers (no sbatch on PATH, a missing SLURM_CONF, or the controller is down)."""


def check_slurm(timeout_s: float = SLURM_TIMEOUT_S) -> str:
    """Raise SlurmUnavailableError (one line) unless a SLURM controller answers; returns its `scontrol ping` line."""
    hint = 'start the local cluster (make slurm-up, as root; eval "$(bash scripts/local_slurm.sh env)") or drop hydra/launcher=slurm'
    missing = [c for c in ("sbatch", "scontrol") if shutil.which(c) is None]
    if missing:
        raise SlurmUnavailableError(f"hydra/launcher=slurm needs SLURM's {' and '.join(missing)} on PATH; {hint}")
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise SlurmUnavailableError(f"SLURM_CONF={conf} does not exist; {hint}")
    where = f" (SLURM_CONF={conf})" if conf else ""
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailableError(
            f"the SLURM controller did not answer `scontrol ping` within {timeout_s:g}s{where}; {hint}"
        ) from None
    text = (p.stdout + p.stderr).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("*")), "no output")
    if p.returncode != 0 or " is UP" not in text:
        raise SlurmUnavailableError(f"cannot reach the SLURM controller{where}: {first}; {hint}")
    return first


class SlurmCheck(Callback):
    """hydra.callbacks entry: before a multirun on a SLURM launcher, fail in seconds with one line when no
    controller answers, instead of a submitit traceback after sbatch's retries (up to a minute).

    Hydra turns an exception raised by a callback into a warning and goes on, so this one prints
    `error: ...` and exits with status 2 itself (SystemExit passes through Hydra's callback wrapper)."""

    def __init__(self, timeout_s: float = SLURM_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        if target.endswith("SlurmLauncher"):
            try:
                check_slurm(self.timeout_s)
            except SlurmUnavailableError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                sys.exit(2)
