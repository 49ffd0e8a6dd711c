"""Score a segmentation run's weights in several numerics presets on training images in training
mode (batch statistics): is a high loss in the weights or in the integer forward? Prints, per
preset, the mean of each loss over the batches and the integer context's counters.

    python scripts/diagnostics/score_weights.py RUN_DIR [--checkpoint PATH] [--presets fp32 int8 int16]
                                                [--batches 6] [--batch-size 4]

The checkpoint defaults to the one the run's ``last_checkpoint`` names.
"""
import argparse
import importlib
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope
from mmseg.registry import DATASETS, MODELS

import tasks.openmmlab_hooks  # noqa: F401  (registers IntSGD and the hooks)
from intrain_core import Numerics, context_of, convert


def mean_losses(cfg, weights: dict, batches: list, preset: str) -> tuple[dict[str, float], dict | None]:
    model = MODELS.build(cfg.model)
    model.load_state_dict(weights)
    if preset != "fp32":
        convert(model, Numerics.preset(preset))
    model.train()  # batch statistics, as in training
    per_batch = []
    with torch.no_grad():
        for batch in batches:
            losses = model(**model.data_preprocessor(batch, True), mode="loss")
            per_batch.append({k: float(v) for k, v in losses.items() if "loss" in k})
    ctx = context_of(model)
    return {k: sum(b[k] for b in per_batch) / len(per_batch) for k in per_batch[0]}, (dict(ctx.counters) if ctx else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="default: the file the run's last_checkpoint names")
    parser.add_argument("--presets", nargs="+", default=["fp32", "int8", "int16"])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    cfg = Config.fromfile(args.run_dir / "mm_config.py")
    init_default_scope("mmseg")
    for module in cfg.get("custom_imports", {}).get("imports", []):
        importlib.import_module(module)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    checkpoint = args.checkpoint or Path((args.run_dir / "last_checkpoint").read_text().strip())
    # mmengine's checkpoints hold numpy and logging objects: full unpickling, of this repository's runs.
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    torch.manual_seed(0)
    n = args.batch_size
    batches = [pseudo_collate([dataset[i] for i in range(b * n, b * n + n)]) for b in range(args.batches)]
    for preset in args.presets:
        print(preset, *mean_losses(cfg, weights, batches, preset), flush=True)


if __name__ == "__main__":
    main()
