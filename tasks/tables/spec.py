"""A table as data: its rows (each a Hydra experiment), presets, extra seeds, GPUs and hardware."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIGS = ROOT / "configs"
TABLES_DIR = CONFIGS / "tables"
TABLES = tuple(sorted(p.stem for p in TABLES_DIR.glob("*.yaml")))
SCALES = ("mini", "paper")
REFERENCE = "fp32"  # the preset every delta and trajectory gap is taken against
ROW_KEYS = ("minutes", "gpus")  # besides <preset>_seeds: all a table says of a row; the setting is its experiment


@dataclass(frozen=True)
class Row:
    name: str
    experiment: str  # <table>/<row>: configs/experiment/<table>/<row>.yaml
    task: str  # the experiment's task.name
    metric: str  # its task family's validation metric
    minutes: float  # the time estimate printed before training
    gpus: int = 1  # processes of one run, one per GPU of one node (torchrun, slurm); the batch is split among them
    # Extra seeds per preset (YAML: fp32_seeds, int8_seeds, ...): the spread of a preset over
    # seeds is the noise floor a delta is read against (small data, short schedules).
    seeds: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def seeds_of(self, preset: str) -> tuple[int, ...]:
        return dict(self.seeds).get(preset, ())


@dataclass(frozen=True)
class Table:
    name: str
    scale: str
    presets: tuple[str, ...]
    hardware: str
    rows: tuple[Row, ...]

    def run_dir(self, runs_dir: Path, row: Row, run_name: str) -> Path:
        return runs_dir / row.name / run_name

    def runs(self, row: Row) -> list[tuple[str, str, tuple[str, ...]]]:
        """(preset, run name, extra overrides) of every run a row needs."""
        runs = [(preset, preset, ()) for preset in self.presets]
        return runs + [(preset, seed_run_name(preset, seed), (f"trainer.seed={seed}",))
                       for preset, seeds in row.seeds for seed in seeds]


def seed_run_name(preset: str, seed: int) -> str:
    return f"{preset}-seed{seed}"


def compose_row(experiment: str, *overrides: str):
    """The config ``train.py experiment=<experiment> <overrides>`` gets (interpolations unresolved)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=[f"experiment={experiment}", *overrides])


def load_table(name: str, scale: str) -> Table:
    """The table's rows at ``scale``, each composed from its experiment config by Hydra."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; tables: {list(TABLES)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; scales: {list(SCALES)}")
    spec = yaml.safe_load((TABLES_DIR / f"{name}.yaml").read_text())
    part = spec["scales"][scale]
    presets = tuple(spec["presets"])
    rows = tuple(load_row(name, row, values or {}, presets) for row, values in part["rows"].items())
    return Table(name, scale, presets, part.get("hardware", ""), rows)


def load_row(table: str, name: str, values: dict, presets: tuple[str, ...]) -> Row:
    from hydra.errors import HydraException

    from tasks.common.cli import one_line
    from tasks.runner import OBJECTIVES

    allowed = {*ROW_KEYS, *(f"{p}_seeds" for p in presets)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"configs/tables/{table}.yaml row {name}: {unknown} is not a row key; a row lists only "
                         f"{sorted(allowed)}, its setting is configs/experiment/{table}/{name}.yaml")
    experiment = f"{table}/{name}"
    try:
        cfg = compose_row(experiment)
    except HydraException as exc:
        raise ValueError(f"table {table} row {name}: {one_line(exc)}") from exc
    seeds = tuple((p, tuple(int(s) for s in values[f"{p}_seeds"])) for p in presets if values.get(f"{p}_seeds"))
    gpus = values.get("gpus", 1)
    batch = int(cfg.trainer.batch_size)
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise ValueError(f"configs/tables/{table}.yaml row {name}: gpus must be a positive whole number, got {gpus!r}")
    if batch % gpus:
        raise ValueError(f"configs/tables/{table}.yaml row {name}: gpus: {gpus} does not divide the global "
                         f"trainer.batch_size={batch} of configs/experiment/{experiment}.yaml")
    return Row(name, experiment, str(cfg.task.name), OBJECTIVES[cfg.task.family], float(values.get("minutes", 0)),
               gpus=gpus, seeds=seeds)


def select_rows(table: Table, names: list[str]) -> Table:
    """The table with only the rows ``names``; an unknown name lists the table's rows."""
    known = [row.name for row in table.rows]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"table {table.name} ({table.scale}) has no row {unknown}; rows: {known}")
    return replace(table, rows=tuple(row for row in table.rows if row.name in names))


def default_runs_dir(table: Table) -> Path:
    return ROOT / "runs" / "tables" / f"{table.name}-{table.scale}"
