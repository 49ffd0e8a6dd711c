"""Score a segmentation run's final weights (iter_600.pth) in fp32, int8 and int16 on 24 training
images in training mode: is a high loss in the weights or in the integer forward?

    python results/segmentation/deeplabv3_600_cause/score_weights.py runs/pre-eps-fix/segmentation-mini/deeplabv3_r18_digits_seg/int8
"""
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import DATASETS, MODELS  # noqa: E402

import tasks.openmmlab_hooks  # noqa: E402,F401  (registers IntSGD and the hooks)
from intrain_core import Numerics, context_of, convert  # noqa: E402

run_dir = Path(sys.argv[1])
cfg = Config.fromfile(run_dir / "mm_config.py")
init_default_scope("mmseg")
for module in cfg.get("custom_imports", {}).get("imports", []):
    importlib.import_module(module)
dataset = DATASETS.build(cfg.train_dataloader.dataset)
weights = torch.load(run_dir / "iter_600.pth", map_location="cpu", weights_only=False)["state_dict"]
torch.manual_seed(0)
batches = [pseudo_collate([dataset[i] for i in range(b * 4, b * 4 + 4)]) for b in range(6)]


def mean_losses(preset: str | None) -> tuple[dict[str, float], dict | None]:
    model = MODELS.build(cfg.model)
    model.load_state_dict(weights)
    if preset:
        convert(model, Numerics.preset(preset))
    model.train()  # batch statistics, as in training
    per_batch = []
    with torch.no_grad():
        for batch in batches:
            losses = model(**model.data_preprocessor(batch, True), mode="loss")
            per_batch.append({k: float(v) for k, v in losses.items() if "loss" in k})
    ctx = context_of(model)
    return {k: sum(b[k] for b in per_batch) / len(per_batch) for k in per_batch[0]}, (dict(ctx.counters) if ctx else None)


for preset in (None, "int8", "int16"):
    print(preset or "fp32", *mean_losses(preset), flush=True)
