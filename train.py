"""Train a microgpt model: `python train.py model=micro +plugin=distill ...` (see README.md)."""

import gc

# Start-up: without this the cyclic GC walks the ~570k objects that torch, Lightning and Hydra create while they
# load, ~0.4 s of a ~3 s start. Training switches it back on (microgpt.lean_imports.resume_gc, before the first step).
gc.disable()

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
