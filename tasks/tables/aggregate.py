"""A table's results from its run directories: results/<table>.md and .csv, one curve PNG per row,
and each run's metrics, config, coverage and run info copied as evidence."""
from __future__ import annotations

import csv
import math
import shutil
import time
from pathlib import Path

import yaml

from tasks import curves
from tasks.run_logging import git_commit
from tasks.tables.queue import DONE
from tasks.tables.spec import REFERENCE, Row, Table, seed_run_name

EVIDENCE = ("metrics.csv", "config.yaml", "coverage.txt", "run_info.yaml")
NOTES = "notes.md"  # results/<table>/notes.md: what a reader must know about the numbers, copied under the table


class Columns:
    """Which columns a table has: one delta or one gap per integer preset, seed spreads where seeded."""

    def __init__(self, table: Table) -> None:
        self.integer = [p for p in table.presets if p != REFERENCE]
        self.two_way = len(self.integer) == 1
        self.seeded = [p for p in table.presets if any(row.seeds_of(p) for row in table.rows)]
        self.mean_delta = self.two_way and set(self.seeded) == set(table.presets)
        header = ["row", "metric", *table.presets]
        header += ["delta", "trajectory_gap"] if self.two_way else [f"gap_{p}" for p in self.integer]
        header += [f"{p}_seed_spread" for p in self.seeded] + (["delta_seed_mean"] if self.mean_delta else [])
        self.header = header + ["minutes"]


def aggregate(table: Table, runs_dir: Path, out_dir: Path, command: str) -> tuple[Path, Path]:
    """results/<table>.md and .csv, results/<table>/<row>.png, and each run's metrics as evidence."""
    columns = Columns(table)
    records, missing, commits = [], [], []
    figure_dir = out_dir / table.name
    for row in table.rows:
        dirs = {p: table.run_dir(runs_dir, row, p) for p in table.presets}
        absent = [p for p, d in dirs.items() if not (d / "metrics.csv").is_file()]
        if absent:
            missing.append(f"{row.name} ({', '.join(absent)})")
            continue
        runs = [curves.load_run(dirs[p]) for p in table.presets]
        records.append(row_record(table, columns, row, runs, runs_dir))
        curves.plot(runs, figure_dir / f"{row.name}.png")
        for commit in copy_evidence(table, row, runs_dir, figure_dir / "runs" / row.name):
            if commit not in commits:
                commits.append(commit)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{table.name}.csv", out_dir / f"{table.name}.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns.header)
        writer.writeheader()
        writer.writerows({k: cell(v) for k, v in r.items()} for r in records)
    notes = figure_dir / NOTES
    md_path.write_text(markdown(table, columns, records, command, commits, missing,
                                notes.read_text() if notes.is_file() else ""))
    return md_path, csv_path


def row_record(table: Table, columns: Columns, row: Row, runs: list, runs_dir: Path) -> dict:
    """One row of the table: final metric per preset, deltas or gaps, seed spreads, minutes."""
    finals = {p: r.final(row.metric) for p, r in zip(table.presets, runs)}
    ref_run = runs[table.presets.index(REFERENCE)]
    gaps = {p: curves.trajectory_gap(ref_run, r) for p, r in zip(table.presets, runs) if p != REFERENCE}
    record = {"row": row.name, "metric": row.metric, **finals}
    if columns.two_way:
        record["delta"] = finals[columns.integer[0]] - finals[REFERENCE]
        record["trajectory_gap"] = gaps[columns.integer[0]]
    else:
        record.update({f"gap_{p}": gaps[p] for p in columns.integer})
    seed_finals = {p: finals_over_seeds(table, row, runs_dir, p, finals[p]) for p in columns.seeded}
    complete = {p: row.seeds_of(p) and all(map(math.isfinite, v)) for p, v in seed_finals.items()}
    for p in columns.seeded:
        record[f"{p}_seed_spread"] = max(seed_finals[p]) - min(seed_finals[p]) if complete[p] else math.nan
    if columns.mean_delta:
        means = {p: sum(v) / len(v) if complete[p] else math.nan for p, v in seed_finals.items()}
        record["delta_seed_mean"] = means[columns.integer[0]] - means[REFERENCE]
    record["minutes"] = sum(r.final("time_s") for r in runs if "time_s" in r.metrics) / 60
    return record


def finals_over_seeds(table: Table, row: Row, runs_dir: Path, preset: str, seed0: float) -> list[float]:
    """The final metric of ``preset`` at seed 0 and at each extra seed; NaN for seeds not finished."""
    finals = [seed0]
    for seed in row.seeds_of(preset):
        run_dir = table.run_dir(runs_dir, row, seed_run_name(preset, seed))
        finals.append(curves.load_run(run_dir).final(row.metric) if (run_dir / DONE).is_file() else math.nan)
    return finals


def copy_evidence(table: Table, row: Row, runs_dir: Path, evidence_dir: Path) -> list[str]:
    """Each run's evidence files into ``evidence_dir/<run>``; the commits the runs were trained at."""
    commits = []
    for _, run_name, _ in table.runs(row):
        run_dir, evidence = table.run_dir(runs_dir, row, run_name), evidence_dir / run_name
        if not run_dir.is_dir():
            continue
        evidence.mkdir(parents=True, exist_ok=True)
        for name in EVIDENCE:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, evidence / name)
        commit = trained_at(run_dir)
        if commit:
            commits.append(commit)
    return commits


def trained_at(run_dir: Path) -> str | None:
    """The short git commit a run was trained at, '+' when that tree had uncommitted changes."""
    path = run_dir / "run_info.yaml"
    if not path.is_file():
        return None
    info = yaml.safe_load(path.read_text()) or {}
    commit = str(info.get("git_commit") or "")[:7]
    return commit + ("+" if info.get("git_dirty") else "") if commit else None


def markdown(table: Table, columns: Columns, records: list[dict], command: str, commits: list[str],
             missing: list[str], notes: str) -> str:
    lines = [f"# {table.name} ({table.scale} scale)", "",
             f"Command: `{command}`  ",
             f"Aggregated at commit `{git_commit()}`, {time.strftime('%Y-%m-%d')}; hardware: {table.hardware}.  ",
             "Runs trained at commit" + ("s " if len(commits) > 1 else " ")
             + (", ".join(f"`{c}`" for c in commits) or "(unknown)")
             + (" (+: with uncommitted changes)" if any(c.endswith("+") for c in commits) else "")
             + "; each run's run_info.yaml is in the evidence folder.  ",
             legend(columns), "",
             "| " + " | ".join(columns.header) + " |", "|" + "---|" * len(columns.header)]
    lines += ["| " + " | ".join(cell(r[k], markdown=True) for k in columns.header) + " |" for r in records]
    lines.append("")
    if notes.strip():
        lines += [notes.rstrip("\n"), ""]
    lines += [f"![{r['row']}]({table.name}/{r['row']}.png)" for r in records]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def legend(columns: Columns) -> str:
    """What the columns mean, in one paragraph."""
    return ("Final validation metric per numerics preset (same seed and data order); "
            + ("delta = integer - fp32 in the metric's unit (points); trajectory gap" if columns.two_way else
               "gap_<preset> = that preset's trajectory gap against fp32")
            + " = mean over steps of |L_int - L_fp32| / L_fp32 on smoothed training losses; minutes = the "
            "sum of the wall times of the row's preset runs."
            + (" <preset>_seed_spread = max - min of that preset's metric over seed 0 and the row's extra "
               "seeds (its own noise, the scale a delta is read on; seed runs are not in minutes)."
               if columns.seeded else "")
            + (" delta_seed_mean = the same delta between the presets' means over their seeds."
               if columns.mean_delta else ""))


def cell(value, markdown: bool = False) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—" if markdown else ""  # an empty CSV cell: not measured (yet)
        return f"{value:.4g}" if markdown else repr(value)
    return str(value)
