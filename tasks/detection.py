"""Object detection and instance segmentation with mmdetection (``task=faster_rcnn``, ...).

``task.mm_config`` names a config shipped in the installed mmdet package; the embedded
``digits_det`` data (COCO format, generated on first use) or a local COCO/VOC folder replaces
its data. See tasks/openmmlab.py for what else is overridden.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from tasks.openmmlab import Family, run as run_openmmlab, walk

# FPN inputs of a ResNet's four stages: BasicBlock (18, 34) or Bottleneck (50, 101, 152).
STAGE_CHANNELS = {18: [64, 128, 256, 512], 34: [64, 128, 256, 512], 50: [256, 512, 1024, 2048],
                  101: [256, 512, 1024, 2048], 152: [256, 512, 1024, 2048]}


def network_adds_only(op: str, layers: tuple[str, ...], args: tuple) -> bool:
    """convert's op_filter for detectors: an add inside a layer, or on parameters or tensors
    carrying gradients, is the network's own (residuals, FPN merges); what the detector's root
    module computes on constants (anchor grids, box encoding and decoding, target assignment) is
    bookkeeping, kept in float: in int8 a shared scale would round box coordinates to whole
    pixels (to 16 pixels at COCO sizes)."""
    if op != "add":
        return True
    return len(layers) > 1 or any(isinstance(t, torch.Tensor) and (t.requires_grad or isinstance(t, torch.nn.Parameter))
                                  for t in args)


def set_depth(model, depth: int) -> None:
    if depth not in STAGE_CHANNELS:
        from tasks.common.errors import ConfigError

        raise ConfigError(f"task.depth={depth} is not a ResNet depth; one of {sorted(STAGE_CHANNELS)}")
    model.backbone.depth = depth
    if "neck" in model and "in_channels" in model.neck:
        model.neck.in_channels = STAGE_CHANNELS[depth]


def set_num_classes(model, num_classes: int) -> None:
    walk(model, lambda d: d.__setitem__("num_classes", num_classes) if "num_classes" in d else None)


def _digits_det(mm, cfg: DictConfig) -> None:
    from tasks.datasets.digit_canvas import DIGIT_CLASSES, build_digits_det, default_root

    ds = cfg.dataset
    size = int(ds.image_size)
    # One cache folder per generation setting: changing num_train never collides with an old cache.
    root = (Path(ds.root).expanduser() if ds.root else
            default_root(f"digits_det-{int(ds.num_train)}-{int(ds.num_val)}", size))
    build_digits_det(root, image_size=size, num_train=int(ds.num_train), num_val=int(ds.num_val))
    masks = "mask_head" in mm.model.get("roi_head", {})
    load = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=masks)]
    resize = dict(type="Resize", scale=(size, size), keep_ratio=True)  # no flips: a mirrored digit is no digit
    meta = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")

    def dataset(split: str, pipeline: list) -> dict:
        return dict(type="CocoDataset", data_root=str(root) + "/", ann_file=f"annotations/{split}.json",
                    data_prefix=dict(img=f"{split}/"), metainfo=dict(classes=DIGIT_CLASSES),
                    filter_cfg=dict(filter_empty_gt=split == "train", min_size=2), pipeline=pipeline,
                    test_mode=split == "val")

    mm.train_dataloader = dict(
        batch_size=2, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=True),
        batch_sampler=dict(type="AspectRatioBatchSampler"),
        dataset=dataset("train", [*load, resize, dict(type="PackDetInputs")]))
    mm.val_dataloader = dict(
        batch_size=8, num_workers=0, drop_last=False, sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dataset("val", [load[0], resize, load[1], dict(type="PackDetInputs", meta_keys=meta)]))
    # Anchors sized to the digits (image_size/6 to /3 wide): the zoo's are for COCO at 800 px,
    # and without an anchor overlapping a digit by IoU 0.3 the RPN gets no positive sample.
    if "rpn_head" in mm.model:
        mm.model.rpn_head.anchor_generator.scales = [max(2, size // 16)]
    head_anchors = mm.model.get("bbox_head", {}).get("anchor_generator", {})
    if "octave_base_scale" in head_anchors:
        head_anchors["octave_base_scale"] = max(1, size // 32)
    mm.val_evaluator = dict(type="CocoMetric", ann_file=str(root / "annotations" / "val.json"),
                            metric=["bbox", "segm"] if masks else ["bbox"], format_only=False)


FAMILY = Family(
    package="mmdet",
    datasets=("digits_det", "coco", "voc"),
    set_num_classes=set_num_classes,
    set_depth=set_depth,
    embedded_data=_digits_det,
    columns=("step", "epoch", "train/loss", "lr", "val/bbox_mAP", "val/bbox_mAP_50", "val/segm_mAP", "val/mAP",
             "time_s"),
    metric_names={"coco/bbox_mAP": "val/bbox_mAP", "coco/bbox_mAP_50": "val/bbox_mAP_50",
                  "coco/segm_mAP": "val/segm_mAP", "pascal_voc/mAP": "val/mAP"},
    # COCO reports fractions, VOC percent already: all columns in percent, like accuracies.
    metric_scale={"coco/bbox_mAP": 100.0, "coco/bbox_mAP_50": 100.0, "coco/segm_mAP": 100.0},
    metric_when_empty={"coco/bbox_mAP": 0.0, "coco/bbox_mAP_50": 0.0},
    op_filter="tasks.detection.network_adds_only",
)


def run(cfg: DictConfig, run_dir):
    return run_openmmlab(cfg, run_dir, FAMILY)
