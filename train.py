"""Train a microgpt model: `python train.py model=micro +plugin=distill ...` (see README.md)."""

import hydra
from omegaconf import DictConfig

from microgpt.cli import CONF_DIR, exit_on_error, quiet_env
from microgpt.training.objective import objective
from microgpt.training.train import run

quiet_env()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> float:
    # the return value is what Hydra sweepers (optuna) minimise
    return objective(cfg, run(cfg))


if __name__ == "__main__":
    main()
