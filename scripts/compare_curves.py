"""Overlay the training curves of several runs and summarise how far they end and travel apart.

    python scripts/compare_curves.py RUN_DIR [RUN_DIR ...] [--out PATH_PREFIX] [--smooth N]

Each RUN_DIR holds metrics.csv and config.yaml, as train.py writes them. Writes
<prefix>.png (training loss and every validation metric against step), <prefix>.md and
<prefix>.json (final validation metrics, deltas and trajectory gaps against the fp32 run, or
the first run without one). The default prefix is <first RUN_DIR>/../comparison.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks import curves  # noqa: E402  (after the path insert above)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="output path prefix (default: <first RUN_DIR>/../comparison)")
    parser.add_argument("--smooth", type=int, default=curves.DEFAULT_SMOOTH, help="moving average over N logged steps")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")

    try:
        runs = [curves.load_run(d) for d in args.run_dirs]
    except (OSError, ValueError) as err:
        print(f"compare_curves: {err}", file=sys.stderr)
        return 2
    prefix = args.out or args.run_dirs[0].resolve().parent / "comparison"
    summary = curves.summarize(runs, smooth=args.smooth)
    png = curves.plot(runs, prefix.with_name(prefix.name + ".png"), smooth=args.smooth)
    md, js = curves.write_summary(summary, prefix)
    print(curves.to_markdown(summary))
    print(f"wrote {png}, {md}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
