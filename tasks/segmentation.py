"""Semantic segmentation with mmsegmentation (``task=deeplabv3``, ``task=fcn``, ``task=pspnet``).

``task.mm_config`` names a config shipped in the installed mmseg package; the embedded
``digits_seg`` data (label maps, generated on first use) or a local Pascal VOC, Cityscapes or
ADE20K folder replaces its data. See tasks/openmmlab.py for what else is overridden.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tasks.openmmlab import Family, run as run_openmmlab, walk

# Last two stages of a ResNetV1c: the decode head reads stage 4, the auxiliary head stage 3.
STAGE_CHANNELS = {18: (256, 512), 34: (256, 512), 50: (1024, 2048), 101: (1024, 2048), 152: (1024, 2048)}


def set_depth(model, depth: int) -> None:
    if depth not in STAGE_CHANNELS:
        from tasks.common.errors import ConfigError

        raise ConfigError(f"task.depth={depth} is not a ResNet depth; one of {sorted(STAGE_CHANNELS)}")
    model.backbone.depth = depth
    if depth >= 50:
        return
    # BasicBlock stages are 4x narrower; the heads narrow with them, as in mmseg's own r18 configs.
    stage3, stage4 = STAGE_CHANNELS[depth]
    head = model.decode_head
    head.in_channels, head.channels = stage4, head.channels // 4
    for key in ("c1_in_channels", "c1_channels"):  # DeepLabV3+'s low-level branch
        if key in head:
            head[key] //= 4
    aux = model.get("auxiliary_head")
    for head in aux if isinstance(aux, list) else [aux] if aux else []:
        head.in_channels, head.channels = stage3, head.channels // 4


def set_num_classes(model, num_classes: int) -> None:
    walk(model, lambda d: d.__setitem__("num_classes", num_classes) if "num_classes" in d else None)


def weight_background(model, weight: float, num_classes: int) -> None:
    """Class 0 weighs ``weight`` in every head's cross-entropy. On digits_seg about 95% of the pixels
    are background: unweighted, a short schedule learns only the background (mIoU = its IoU / 11)."""
    class_weight = [weight] + [1.0] * (num_classes - 1)
    aux = model.get("auxiliary_head")
    for head in [model.decode_head, *(aux if isinstance(aux, list) else [aux] if aux else [])]:
        losses = head.loss_decode
        for loss in losses if isinstance(losses, list) else [losses]:
            if loss.get("type") == "CrossEntropyLoss":
                loss.class_weight = class_weight


def _digits_seg(mm, cfg: DictConfig) -> None:
    from tasks.datasets.digit_canvas import SEG_CLASSES, build_digits_seg, default_root

    ds = cfg.dataset
    size = int(ds.image_size)
    # One cache folder per generation setting: changing num_train never collides with an old cache.
    root = (Path(ds.root).expanduser() if ds.root else
            default_root(f"digits_seg-{int(ds.num_train)}-{int(ds.num_val)}", size))
    build_digits_seg(root, image_size=size, num_train=int(ds.num_train), num_val=int(ds.num_val))
    palette = [[0, 0, 0]] + [[(37 * i) % 256, (91 * i) % 256, (151 * i) % 256] for i in range(1, len(SEG_CLASSES))]
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]

    def dataset(split: str) -> dict:
        return dict(type="BaseSegDataset", data_root=str(root), img_suffix=".png", seg_map_suffix=".png",
                    data_prefix=dict(img_path=f"img_dir/{split}", seg_map_path=f"ann_dir/{split}"),
                    metainfo=dict(classes=SEG_CLASSES, palette=palette), pipeline=pipeline)

    mm.train_dataloader = dict(batch_size=2, num_workers=0, sampler=dict(type="InfiniteSampler", shuffle=True),
                               dataset=dataset("train"))
    mm.val_dataloader = dict(batch_size=8, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=False),
                             dataset=dataset("val"))
    mm.val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
    weight_background(mm.model, float(ds.background_weight), len(SEG_CLASSES))
    mm.crop_size = (size, size)
    mm.model.data_preprocessor.size = (size, size)
    mm.model.test_cfg = dict(mode="whole")


FAMILY = Family(
    package="mmseg",
    datasets=("digits_seg", "voc_seg", "cityscapes", "ade20k"),
    set_num_classes=set_num_classes,
    set_depth=set_depth,
    embedded_data=_digits_seg,
    columns=("step", "epoch", "train/loss", "lr", "val/mIoU", "val/mAcc", "val/aAcc", "time_s"),
    metric_names={"mIoU": "val/mIoU", "mAcc": "val/mAcc", "aAcc": "val/aAcc"},
    metric_scale={},  # mmseg reports percent
    metric_when_empty={},
)


def run(cfg: DictConfig, run_dir):
    return run_openmmlab(cfg, run_dir, FAMILY)
