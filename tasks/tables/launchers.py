"""How a table's runs are started: ``local`` (train.py on this machine), ``torchrun`` (one process
per GPU of the row, on this node) or ``slurm`` (one Slurm job per run through Hydra's submitit
launcher, configs/hydra/launcher/slurm.yaml). The train.py overrides are the same for all three."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from tasks.tables.spec import ROOT, Row

LAUNCHERS = ("local", "torchrun", "slurm")


@dataclass(frozen=True)
class Launcher:
    name: str = "local"
    partition: str | None = None  # slurm only; None: the cluster's default partition

    def __post_init__(self) -> None:
        if self.name not in LAUNCHERS:
            raise ValueError(f"unknown launcher {self.name!r}; launchers: {', '.join(LAUNCHERS)}")
        if self.partition is not None and self.name != "slurm":
            raise ValueError(f"a partition is for the slurm launcher, not {self.name}")

    @property
    def shares_this_machine(self) -> bool:
        """Whether the runs compute here, so that parallel jobs split its cores (a Slurm job's do not)."""
        return self.name != "slurm"

    def check_jobs(self, jobs: int) -> None:
        if self.name == "torchrun" and jobs > 1:
            raise ValueError(f"--jobs {jobs} with the torchrun launcher would start {jobs} runs on the same GPUs; "
                             "use --jobs 1, or the slurm launcher to run rows side by side")

    def command(self, row: Row, overrides: list[str]) -> list[str]:
        """The command that trains one run of ``row`` with these train.py overrides."""
        train = str(ROOT / "train.py")
        if self.name == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={row.gpus}",
                    train, *overrides]
        if self.name == "slurm":
            # A one-job sweep (-m): submitit submits it and waits, so the queue sees its exit status.
            partition = [f"hydra.launcher.partition={self.partition}"] if self.partition else []
            return [sys.executable, train, "-m", "hydra/launcher=slurm", "hydra.launcher.nodes=1",
                    f"hydra.launcher.gpus_per_node={row.gpus}", *partition, *overrides]
        return [sys.executable, train, *overrides]
