"""Train a microgpt model: `python train.py model=micro +plugin=distill ...` (see README.md)."""

import gc
import sys

# Start-up: torch, Lightning and Hydra make ~570k objects while they load, and each older-generation collection
# walks all of them (~0.4 s of a ~3 s start). Until training starts only the youngest generation is collected (it
# holds nearly all of the start-up's garbage); microgpt.lean_imports.resume_gc freezes the rest and restores the
# collector before the first step. (Python 3.14's incremental collector has no such full passes.)
if sys.version_info < (3, 14):
    gc.set_threshold(gc.get_threshold()[0], 1_000_000_000, 1_000_000_000)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from microgpt.cli import CONF_DIR, exit_on_error, quiet_env  # noqa: E402
from microgpt.training.objective import objective  # noqa: E402
from microgpt.training.train import run  # noqa: E402

quiet_env()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> float:
    # the return value is what Hydra sweepers (optuna) minimise
    return objective(cfg, run(cfg))


if __name__ == "__main__":
    main()
