"""Train one model under one numerics preset: ``python train.py task=vit numerics=int8``.

Compare float and integer training with ``python train.py -m numerics=fp32,int8`` (same seed,
same data order), then ``python scripts/compare_curves.py runs/<experiment_name>/*``.
The run directory is ``<runs_dir>/<experiment_name>/<run_name>`` (configs/config.yaml).
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tasks.runner import run, user_errors

log = logging.getLogger("intrain")


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        result = run(cfg, HydraConfig.get().runtime.output_dir)
    except user_errors() as exc:
        log.error("%s", exc)
        sys.exit(1)
    return result.get("val/acc1")


if __name__ == "__main__":
    main()
