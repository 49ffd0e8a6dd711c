"""The paper's tables as data: ``configs/tables/<table>.yaml`` lists, per scale, the rows (train.py
overrides and the metric compared) and the numerics presets each row runs with.

``run_table`` trains every (row, preset) that has not finished, resuming killed runs;
``aggregate`` turns the run directories into ``results/<table>.{md,csv}`` and one curve PNG per
row; ``dry_run`` builds every row's config, model and optimiser without touching data.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TABLES_DIR = ROOT / "configs" / "tables"
TABLES = tuple(sorted(p.stem for p in TABLES_DIR.glob("*.yaml")))
SCALES = ("mini", "paper")
DONE = "DONE"  # written into a run directory once its train.py call finished


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    metric: str
    minutes: float
    note: str = ""  # what a reader must know about this row's numbers (printed under the table)
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

    def run_dir(self, runs_dir: Path, row: Row, preset: str) -> Path:
        return runs_dir / row.name / preset

    def runs(self, row: Row) -> list[tuple[str, str, tuple[str, ...]]]:
        """(preset, run name, extra overrides) of every run a row needs."""
        runs = [(preset, preset, ()) for preset in self.presets]
        return runs + [(preset, seed_run_name(preset, seed), (f"trainer.seed={seed}",))
                       for preset, seeds in row.seeds for seed in seeds]


REFERENCE = "fp32"


def seed_run_name(preset: str, seed: int) -> str:
    return f"{preset}-seed{seed}"


def load_table(name: str, scale: str) -> Table:
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; tables: {list(TABLES)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; scales: {list(SCALES)}")
    spec = yaml.safe_load((TABLES_DIR / f"{name}.yaml").read_text())
    part = spec["scales"][scale]
    rows = tuple(Row(row, tuple(r["overrides"]), r["metric"], float(r.get("minutes", 0)), r.get("note", ""),
                     tuple((p, tuple(int(seed) for seed in r[f"{p}_seeds"])) for p in spec["presets"]
                           if r.get(f"{p}_seeds")))
                 for row, r in part["rows"].items())
    return Table(name, scale, tuple(spec["presets"]), part.get("hardware", ""), rows)


def select_rows(table: Table, names: list[str]) -> Table:
    """The table with only the rows ``names``; an unknown name lists the table's rows."""
    known = [row.name for row in table.rows]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"table {table.name} ({table.scale}) has no row {unknown}; rows: {known}")
    return replace(table, rows=tuple(row for row in table.rows if row.name in names))


def default_runs_dir(table: Table) -> Path:
    return ROOT / "runs" / "tables" / f"{table.name}-{table.scale}"


def train_command(row: Row, preset: str, run_name: str, extra: tuple[str, ...], runs_dir: Path,
                  resume: bool) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *row.overrides, *extra, f"numerics={preset}",
            f"runs_dir={runs_dir}", f"experiment_name={row.name}", f"run_name={run_name}",
            "trainer.progress_bar=false", *(["trainer.resume=true"] if resume else [])]


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "last.ckpt").is_file() or (run_dir / "last_checkpoint").is_file()


def run_table(table: Table, runs_dir: Path, jobs: int = 1) -> None:
    """Every (row, preset) in order; finished runs are skipped, killed ones resumed.

    With ``jobs`` > 1, that many train.py processes run at once, the cores split evenly between
    them, each one's console output in ``<run dir>.console.log``. A failed run does not stop the
    others; the failures are reported together at the end.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    pending = []
    for row in table.rows:
        for preset, run_name, extra in table.runs(row):
            run_dir = table.run_dir(runs_dir, row, run_name)
            setting = " ".join((*row.overrides, *extra))
            if (run_dir / DONE).is_file():
                done_with = (run_dir / DONE).read_text().splitlines()[-1]
                if done_with != setting:
                    raise RuntimeError(f"{run_dir} was trained with '{done_with}', but the table now says "
                                       f"'{setting}': delete that run directory to train it again")
                print(f"[{table.name}] {row.name} {run_name}: done already ({run_dir})", flush=True)
                continue
            resume = has_checkpoint(run_dir)
            command = train_command(row, preset, run_name, extra, runs_dir, resume)
            pending.append((f"[{table.name}] {row.name} {run_name}", run_dir, setting, command, resume))
    if jobs == 1:
        for run in pending:
            _train_one(*run)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [(pool.submit(_train_one, *run, env=env), run) for run in pending]
    failures = [f"{label} ({future.exception()}; log: {console_log(run_dir)})"
                for future, (label, run_dir, *_) in futures if future.exception() is not None]
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(pending)} runs failed: " + "; ".join(failures) +
                           ". The finished runs are kept: fix the cause and run the same command again.")


def console_log(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".console.log")


def _train_one(label: str, run_dir: Path, setting: str, command: list[str], resume: bool,
               env: dict | None = None) -> None:
    """One train.py call; ``env`` given: a parallel job, its output into the console log."""
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to keep
    print(f"{label}: {'resuming' if resume else 'training'} -> {run_dir}", flush=True)
    start = time.monotonic()
    if env is None:
        subprocess.run(command, cwd=ROOT, check=True)
    else:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(console_log(run_dir), "a") as log:
            subprocess.run(command, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, env=env)
    seconds = time.monotonic() - start
    (run_dir / DONE).write_text(f"{seconds:.0f} s\n{setting}\n")
    if env is not None:
        print(f"{label}: finished in {seconds:.0f} s", flush=True)


# --- aggregation ---------------------------------------------------------------------------------
def aggregate(table: Table, runs_dir: Path, out_dir: Path, command: str) -> tuple[Path, Path]:
    """results/<table>.md and .csv, results/<table>/<row>.png, and each run's metrics as evidence."""
    from tasks import curves
    from tasks.run_logging import git_commit

    reference = REFERENCE
    integer = [p for p in table.presets if p != reference]
    two_way = len(integer) == 1
    seeded = [p for p in table.presets if any(row.seeds_of(p) for row in table.rows)]
    mean_delta = two_way and set(seeded) == set(table.presets)
    header = ["row", "metric", *table.presets]
    header += ["delta", "trajectory_gap"] if two_way else [f"gap_{p}" for p in integer]
    header += [f"{p}_seed_spread" for p in seeded] + (["delta_seed_mean"] if mean_delta else [])
    header += ["minutes"]
    lines, records, missing, trained_at = [], [], [], []
    figure_dir = out_dir / table.name
    for row in table.rows:
        dirs = {p: table.run_dir(runs_dir, row, p) for p in table.presets}
        absent = [p for p, d in dirs.items() if not (d / "metrics.csv").is_file()]
        if absent:
            missing.append(f"{row.name} ({', '.join(absent)})")
            continue
        runs = [curves.load_run(dirs[p]) for p in table.presets]
        finals = {p: r.final(row.metric) for p, r in zip(table.presets, runs)}
        ref_run = runs[table.presets.index(reference)]
        gaps = {p: curves.trajectory_gap(ref_run, r) for p, r in zip(table.presets, runs) if p != reference}
        record = {"row": row.name, "metric": row.metric, **{p: finals[p] for p in table.presets}}
        if two_way:
            record["delta"] = finals[integer[0]] - finals[reference]
            record["trajectory_gap"] = gaps[integer[0]]
        else:
            record.update({f"gap_{p}": gaps[p] for p in integer})
        seed_finals = {p: _seed_finals(table, row, runs_dir, p, finals[p]) for p in seeded}
        complete = {p: row.seeds_of(p) and all(map(math.isfinite, v)) for p, v in seed_finals.items()}
        for p in seeded:
            record[f"{p}_seed_spread"] = max(seed_finals[p]) - min(seed_finals[p]) if complete[p] else math.nan
        if mean_delta:
            means = {p: sum(v) / len(v) if complete[p] else math.nan for p, v in seed_finals.items()}
            record["delta_seed_mean"] = means[integer[0]] - means[reference]
        record["minutes"] = sum(r.final("time_s") for r in runs if "time_s" in r.metrics) / 60
        records.append(record)
        curves.plot(runs, figure_dir / f"{row.name}.png")
        for run_name in (name for _, name, _ in table.runs(row)):
            run_dir, evidence = table.run_dir(runs_dir, row, run_name), figure_dir / "runs" / row.name / run_name
            if not run_dir.is_dir():
                continue
            evidence.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.csv", "config.yaml", "coverage.txt", "run_info.yaml"):
                if (run_dir / name).is_file():
                    shutil.copyfile(run_dir / name, evidence / name)
            commit = _trained_at(run_dir)
            if commit and commit not in trained_at:
                trained_at.append(commit)

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{table.name}.csv", out_dir / f"{table.name}.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in r.items()} for r in records)

    lines += [f"# {table.name} ({table.scale} scale)", "",
              f"Command: `{command}`  ", f"Aggregated at commit `{git_commit()}`, {time.strftime('%Y-%m-%d')}; "
              f"hardware: {table.hardware}.  ",
              "Runs trained at commit" + ("s " if len(trained_at) > 1 else " ")
              + (", ".join(f"`{c}`" for c in trained_at) or "(unknown)")
              + (" (+: with uncommitted changes)" if any(c.endswith("+") for c in trained_at) else "")
              + "; each run's run_info.yaml is in the evidence folder.  ",
              "Final validation metric per numerics preset (same seed and data order); "
              + ("delta = integer - fp32 in the metric's unit (points); trajectory gap" if two_way else
                 "gap_<preset> = that preset's trajectory gap against fp32")
              + " = mean over steps of |L_int - L_fp32| / L_fp32 on smoothed training losses; minutes = the "
              "sum of the wall times of the row's preset runs."
              + (" <preset>_seed_spread = max - min of that preset's metric over seed 0 and the row's extra "
                 "seeds (its own noise, the scale a delta is read on; seed runs are not in minutes)."
                 if seeded else "")
              + (" delta_seed_mean = the same delta between the presets' means over their seeds." if mean_delta else ""),
              "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        lines.append("| " + " | ".join(_cell(r[k], markdown=True) for k in header) + " |")
    lines.append("")
    notes = [f"- {row.name}: {row.note.strip()}" for row in table.rows if row.note]
    if notes:
        lines += ["Notes:", *notes, ""]
    for r in records:
        lines.append(f"![{r['row']}]({table.name}/{r['row']}.png)")
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _trained_at(run_dir: Path) -> str | None:
    """The short git commit a run was trained at, '+' when that tree had uncommitted changes."""
    path = run_dir / "run_info.yaml"
    if not path.is_file():
        return None
    info = yaml.safe_load(path.read_text()) or {}
    commit = str(info.get("git_commit") or "")[:7]
    return commit + ("+" if info.get("git_dirty") else "") if commit else None


def _seed_finals(table: Table, row: Row, runs_dir: Path, preset: str, seed0: float) -> list[float]:
    """The final metric of ``preset`` at seed 0 and at each extra seed; NaN for seeds not finished."""
    from tasks import curves

    finals = [seed0]
    for seed in row.seeds_of(preset):
        run_dir = table.run_dir(runs_dir, row, seed_run_name(preset, seed))
        finals.append(curves.load_run(run_dir).final(row.metric) if (run_dir / DONE).is_file() else math.nan)
    return finals


def _cell(value, markdown: bool = False) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—" if markdown else ""  # an empty CSV cell: not measured (yet)
        return f"{value:.4g}" if markdown else repr(value)
    return str(value)


# --- dry run ---------------------------------------------------------------------------------------
def dry_run(table: Table, runs_dir: Path) -> list[str]:
    """Compose and validate the config, build model and optimiser, for every row and preset."""
    from hydra import compose, initialize_config_dir

    built = []
    for row in table.rows:
        for preset in table.presets:
            # Data roots from the environment: a placeholder, never read.
            overrides = [o.split("=", 1)[0] + "=/dry-run" if "${oc.env:" in o else o for o in row.overrides]
            with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
                cfg = compose("config", overrides=[*overrides, f"numerics={preset}", f"runs_dir={runs_dir}",
                                                   f"experiment_name={row.name}", f"run_name={preset}"])
            built.append(_build(cfg, runs_dir / row.name / preset))
    return built


def _build(cfg, run_dir: Path) -> str:
    from omegaconf import OmegaConf

    from intrain_core import Numerics
    from intrain_core.optim import build_optimizer
    from tasks.common.schema import validate

    validate(cfg)
    numerics = Numerics.from_dict(OmegaConf.to_container(cfg.numerics, resolve=True))
    if cfg.task.family == "classification":
        from tasks.classification import build_model

        classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "digits": 10}[cfg.dataset.name]
        model = build_model(cfg.task, classes, 3, int(cfg.dataset.image_size))
        optimizer = build_optimizer(model.parameters(), numerics, lr=float(cfg.task.lr), momentum=0.9)
        return f"{cfg.task.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, {type(optimizer).__name__}"
    import importlib

    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    import tasks.openmmlab_hooks  # noqa: F401  (IntSGD in mmengine's registry)
    from tasks.openmmlab import build_mm_config

    family = importlib.import_module(f"tasks.{cfg.task.family}").FAMILY
    mm = build_mm_config(cfg, run_dir, family, None, check_data=False)
    init_default_scope(family.package)
    model = importlib.import_module(f"{family.package}.registry").MODELS.build(mm.model)
    wrapper = build_optim_wrapper(model, mm.optim_wrapper)
    return f"{cfg.task.mm_config}: {type(wrapper.optimizer).__name__}"
