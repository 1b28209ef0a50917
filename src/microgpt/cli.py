"""Shared CLI plumbing: where the configs live, and turning bad input into one error line."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from microgpt.errors import MicroGPTError

# configs live at the repository root (`conf/`), next to `src/`; MICROGPT_CONF overrides
CONF_DIR = Path(os.environ.get("MICROGPT_CONF", Path(__file__).resolve().parents[2] / "conf"))


def quiet_env() -> None:
    # torchao probes for CUDA kernels it can't use on CPU and says so at import; nothing is wrong
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    # Lightning warns on every run of a machine where SLURM is installed but this is not a SLURM job
    warnings.filterwarnings("ignore", message="The `srun` command is available")
    # the CSV logger writes metrics.csv into the Hydra run dir, which already holds .hydra/ and train.log by design
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    from microgpt.console import quiet

    quiet()  # known third-party noise (see microgpt.console)


def exit_on_error(fn: Callable) -> Callable:
    """Run fn; a MicroGPTError becomes `error: <one line>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MicroGPTError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
