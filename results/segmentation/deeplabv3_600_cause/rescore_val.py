"""Score a finished segmentation (mIoU) or detection (bbox mAP) run's final checkpoint on its
validation set again: once in fp32 and once per rounding seed in int8. Splits an int8 run's gap
into training (its weights scored in fp32) and integer inference, and shows one stochastic
validation pass's spread.

    python results/segmentation/deeplabv3_600_cause/rescore_val.py RUN_DIR [RUN_DIR ...] [--rounding-seeds N]

``--rounding-seeds 0`` scores in fp32 only (a Faster R-CNN pass takes minutes on this CPU).
"""
import argparse
import atexit
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
# mmengine loads its own checkpoints (numpy and logging objects) without weights_only; these are runs of this repo.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import tasks.openmmlab_hooks  # noqa: E402,F401  (registers IntSGD and the hooks)
from intrain_core import Numerics  # noqa: E402



def score(run_dir: Path, rounding_seed: int | None) -> float:
    """val mIoU of run_dir's last checkpoint; rounding_seed None: fp32."""
    cfg = Config.fromfile(run_dir / "mm_config.py")
    for module in cfg.get("custom_imports", {}).get("imports", []):
        importlib.import_module(module)
    scratch = tempfile.mkdtemp(prefix="rescore-")  # removed at exit: mmengine's loggers outlive the runner
    atexit.register(shutil.rmtree, scratch, True)
    cfg.work_dir, cfg.load_from, cfg.resume = scratch, (run_dir / "last_checkpoint").read_text().strip(), False
    cfg.experiment_name = Path(scratch).name  # mmengine's per-name singletons: one per score
    cfg.custom_hooks = []
    if rounding_seed is not None:
        numerics = {**Numerics.preset("int8").to_dict(), "seed": rounding_seed}
        cfg.custom_hooks = [dict(type="IntegerNumericsHook", numerics=numerics, run_dir=scratch, restore_context=False)]
    metrics = Runner.from_cfg(cfg).test()
    if "mIoU" in metrics:
        return float(metrics["mIoU"])  # mmseg reports percent
    return 100 * float(metrics["coco/bbox_mAP"])  # mmdet reports a fraction


parser = argparse.ArgumentParser()
parser.add_argument("run_dirs", nargs="+", type=Path)
parser.add_argument("--rounding-seeds", type=int, default=5)
args = parser.parse_args()
for run in args.run_dirs:
    fp32 = score(run, None)  # mIoU or bbox mAP, in percent
    int8 = [score(run, seed) for seed in range(args.rounding_seeds)]
    print(f"{run}: fp32 {fp32:.2f}" + (f"; int8 over rounding seeds 0-{len(int8) - 1}: " + " ".join(f"{v:.2f}" for v in int8)
                                       + f" (mean {sum(int8) / len(int8):.2f})" if int8 else ""), flush=True)
