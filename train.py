"""Train one model under one numerics preset: ``python train.py task=vit numerics=int8``.

Compare float and integer training with ``python train.py -m numerics=fp32,int8`` (same seed,
same data order), then ``python scripts/compare_curves.py runs/<experiment_name>/*``.
The run directory is ``<runs_dir>/<experiment_name>/<run_name>`` (configs/config.yaml).
A bad input (a value out of range, a missing dataset, a diverged run) ends with one line and
exit status 1; a config refused before training leaves nothing in the runs folder.
The task function returns the run's final validation metric of its family (val/acc1,
val/bbox_mAP or val/mIoU), which a Hydra sweeper optimises. A paper setting is one experiment:
``python train.py experiment=classification/resnet18_digits numerics=int8``.
"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tasks.common import cli, schema
from tasks.common.errors import user_errors
from tasks.common.run_dir import discard_empty_dirs
from tasks.runner import objective, run

log = logging.getLogger("intrain")


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    cli.job_started()
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        result = run(cfg, run_dir)
    except user_errors() as exc:
        discard_empty_dirs(run_dir, cfg.runs_dir)
        log.error("Error: %s", exc)
        sys.exit(1)
    return objective(cfg, result)


if __name__ == "__main__":
    schema.register()
    cli.run_main(main)
