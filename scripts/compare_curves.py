"""Overlay the training curves of several runs and summarise how far they end and travel apart.

    python scripts/compare_curves.py RUN_DIR [RUN_DIR ...] [--out PATH_PREFIX] [--smooth N]
                                     [--paired-with RUN_DIR ...]

Each RUN_DIR holds metrics.csv and config.yaml, as train.py writes them. Writes
<prefix>.png (training loss and every validation metric against step), <prefix>.md and
<prefix>.json (final validation metrics, deltas and trajectory gaps against the fp32 run, or
the first run without one). The default prefix is <first RUN_DIR>/../comparison.

With --paired-with, the RUN_DIRs are runs that differ only in their seed, and each paired run
(the i-th against the i-th RUN_DIR: the same seed with one thing changed; at most one per
RUN_DIR) is set against the seed spread: the gap between every two RUN_DIRs. Also writes <prefix>-seed-spread.md and .json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks import curves, seed_spread  # noqa: E402  (after the path insert above)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="output path prefix (default: <first RUN_DIR>/../comparison)")
    parser.add_argument("--smooth", type=int, default=curves.DEFAULT_SMOOTH, help="moving average over N logged steps")
    parser.add_argument("--paired-with", nargs="+", type=Path, default=[], metavar="RUN_DIR",
                        help="the i-th paired with the i-th RUN_DIR, set against the RUN_DIRs' seed spread")
    args = parser.parse_args(argv)
    try:
        if args.smooth < 1:
            raise ValueError(f"--smooth must be >= 1, got {args.smooth}")
        runs = [curves.load_run(d) for d in args.run_dirs]
        paired = [curves.load_run(d) for d in args.paired_with]
        spread = seed_spread.summarize(runs, paired, smooth=args.smooth) if paired else None
    except (OSError, ValueError) as err:
        print(f"compare_curves: {err}", file=sys.stderr)
        return 1
    prefix = args.out or args.run_dirs[0].resolve().parent / "comparison"
    summary = curves.summarize(runs + paired, smooth=args.smooth)
    png = curves.plot(runs + paired, prefix.with_name(prefix.name + ".png"), smooth=args.smooth)
    written = [png, *curves.write_summary(summary, prefix)]
    print(curves.to_markdown(summary))
    if spread is not None:
        print(seed_spread.to_markdown(spread))
        written += curves.write_summary(spread, prefix.with_name(prefix.name + "-seed-spread"), seed_spread.to_markdown)
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
