"""Aggregate a table's run directories into results/<table>.md, .csv and per-row curve PNGs.

    python scripts/make_tables.py TABLE [--scale mini|paper] [--runs-dir DIR] [--results DIR]

``scripts/run_table.py`` calls this step itself after training; run it alone to rebuild the
tables from existing runs. ``results/<table>/notes.md``, where present, is copied under the table.
"""
from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    try:
        table = tables.load_table(args.table, args.scale)
        runs_dir = (args.runs_dir or tables.default_runs_dir(table)).resolve()
        md, csv_path = tables.aggregate(table, runs_dir, args.results, f"make table-{table.name} SCALE={table.scale}")
    except (ValueError, OSError) as err:  # a malformed table or an unreadable run directory
        print(f"make_tables: {err}", file=sys.stderr)
        return 1
    print(md.read_text())
    print(f"wrote {md}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
