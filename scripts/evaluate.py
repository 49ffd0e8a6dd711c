"""Score finished runs again under other numerics presets and rounding seeds: classification
(val/acc1, val/loss), detection (val/bbox_mAP) and segmentation (val/mIoU) runs alike.

    python scripts/evaluate.py RUN_DIR [RUN_DIR ...] [--numerics fp32 int8] [--rounding-seeds 5]
                               [--out PATH_PREFIX]

Separates what an integer run learned (its weights scored in fp32) from what integer inference
costs and from the rounding noise of one stochastic validation pass (mean, min and max over the
rounding seeds). Writes <prefix>.md and <prefix>.csv (default prefix: <first RUN_DIR>/../reevaluation).
A Faster R-CNN pass takes minutes on a CPU: ``--rounding-seeds 1`` or ``--numerics fp32`` for a quick look.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks import reevaluation  # noqa: E402  (after the path insert above)
from tasks.common.errors import user_errors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--numerics", nargs="+", default=["fp32", "int8"], metavar="PRESET")
    parser.add_argument("--rounding-seeds", type=int, default=5, metavar="N",
                        help="integer presets: one validation pass per rounding seed 0..N-1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="output path prefix (default: <first RUN_DIR>/../reevaluation)")
    args = parser.parse_args(argv)
    if args.rounding_seeds < 1:
        parser.error(f"--rounding-seeds must be >= 1, got {args.rounding_seeds}")

    evaluations = []
    try:
        for run_dir in args.run_dirs:
            evaluations += reevaluation.evaluate_run(run_dir, args.numerics, list(range(args.rounding_seeds)),
                                                     args.device)
    except (*user_errors(), ValueError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    prefix = args.out or args.run_dirs[0].resolve().parent / "reevaluation"
    command = "python scripts/evaluate.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    md, csv_path = reevaluation.write_summary(reevaluation.summarise(evaluations), prefix, command)
    print(md.read_text())
    print(f"wrote {md}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
