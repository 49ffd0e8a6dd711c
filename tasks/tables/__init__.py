"""The paper's tables: ``configs/tables/<table>.yaml`` lists, per scale, the rows, the numerics
presets and extra seeds; every row's setting is the Hydra experiment
``configs/experiment/<table>/<row>.yaml``.

``run_table`` trains every (row, preset) that has not finished, resuming killed runs;
``aggregate`` turns the run directories into ``results/<table>.{md,csv}`` and one curve PNG per
row; ``dry_run`` builds every row's config, model and optimiser without touching data. A
``Launcher`` starts each run: on this machine, under torchrun with the row's GPUs, or on Slurm;
``planned_commands`` says what it would start.
"""
from tasks.tables.aggregate import aggregate
from tasks.tables.dry_run import dry_run
from tasks.tables.launchers import LAUNCHERS, Launcher
from tasks.tables.queue import DONE, planned_commands, run_table, train_command
from tasks.tables.spec import (REFERENCE, SCALES, TABLES, Row, Table, compose_row, default_runs_dir, load_table,
                               seed_run_name, select_rows)

__all__ = ["DONE", "LAUNCHERS", "REFERENCE", "SCALES", "TABLES", "Launcher", "Row", "Table", "aggregate", "compose_row",
           "default_runs_dir", "dry_run", "load_table", "planned_commands", "run_table", "seed_run_name",
           "select_rows", "train_command"]
