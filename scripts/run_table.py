"""Train every row of a paper table in each of its numerics presets, then aggregate.

    python scripts/run_table.py TABLE [--scale mini|paper] [--rows ROW...] [--jobs N] [--runs-dir DIR]
                                [--launcher local|torchrun|slurm [--partition NAME]] [--dry-run]

Finished runs are skipped and killed ones resume from their checkpoint, so an interrupted table
continues where it stopped. ``--rows`` trains only those rows (one process per row runs a table on
several machines or cores over a shared runs dir); the aggregate always covers every row.
``--jobs N`` trains N runs at once on this machine, the cores split between them.
``--launcher`` starts each run: ``local`` (default) as one process here; ``torchrun`` with one process
per GPU of the row (``gpus`` in the table's YAML) on this node; ``slurm`` as one Slurm job per run
through Hydra's submitit launcher (configs/hydra/launcher/slurm.yaml), ``--partition`` its partition.
``--dry-run`` builds every config, model and optimiser without data (local), or prints the command
of every run the launcher would start (torchrun, slurm), running nothing. Each row's setting is the
Hydra experiment ``configs/experiment/<table>/<row>.yaml``; ``configs/tables/<table>.yaml`` lists
the rows, presets and seeds.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks import tables  # noqa: E402  (after the path insert above)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=tables.TABLES)
    parser.add_argument("--scale", choices=tables.SCALES, default="mini")
    parser.add_argument("--runs-dir", type=Path, help="default: runs/tables/<table>-<scale>")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="train only these rows (default: all)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="train N runs at once (default 1)")
    parser.add_argument("--launcher", default="local", metavar="|".join(tables.LAUNCHERS),
                        help="how each run is started (default local)")
    parser.add_argument("--partition", help="the Slurm partition (--launcher slurm; default: the cluster's)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        return run(args)
    except (ValueError, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"run_table: {err}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    launcher = tables.Launcher(args.launcher, args.partition)
    launcher.check_jobs(args.jobs)
    table = tables.load_table(args.table, args.scale)
    training = tables.select_rows(table, args.rows) if args.rows else table
    runs_dir = (args.runs_dir or tables.default_runs_dir(table)).resolve()
    if args.dry_run:
        lines = (tables.dry_run(table, runs_dir) if launcher.name == "local"
                 else tables.planned_commands(training, runs_dir, launcher))
        for line in lines:
            print(line)
        return 0
    print(f"[{table.name}] {table.scale}: {len(training.rows)} rows x {list(table.presets)}, "
          f"about {sum(r.minutes for r in training.rows):.0f} minutes on {table.hardware}", flush=True)
    tables.run_table(training, runs_dir, args.jobs, launcher)
    command = f"make table-{table.name} SCALE={table.scale}"
    if launcher.name != "local":
        command += f" LAUNCHER={launcher.name}"
    md, csv_path = tables.aggregate(table, runs_dir, args.results, command)
    print(md.read_text())
    print(f"wrote {md}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
