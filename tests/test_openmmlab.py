"""Detection and segmentation runners: mmdet/mmseg zoo configs under integer numerics, briefly."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose, read_metrics, run_dir_of, train_in_process, train_subprocess

from intrain_core import Numerics, context_of
from intrain_core.context import IntegerContext

pytest.importorskip("mmdet", reason="OpenMMLab is installed by `make install-openmmlab`")
pytest.importorskip("mmseg")
from tasks.openmmlab_hooks import IntegerNumericsHook  # noqa: E402  (needs mmengine, checked above)

# Tiny embedded data (its own cache per test session) and short schedules.
DATA = ["dataset.image_size=64", "dataset.num_train=8", "dataset.num_val=4", "trainer.batch_size=2",
        "trainer.eval_batch_size=4", "task.warmup_iters=0"]


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("INTRAIN_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data"))


def tiny(task: str, dataset: str, *extra: str) -> list[str]:
    return [f"task={task}", f"dataset={dataset}", *DATA, *extra]


@pytest.mark.parametrize("task,dataset", [("faster_rcnn", "digits_det"), ("deeplabv3", "digits_seg")])
def test_int8_run_logs_curves_and_covers_at_least_99_percent_of_macs(runs_dir, task, dataset):
    result, run_dir = train_in_process(runs_dir, *tiny(task, dataset, "numerics=int8", "trainer.max_steps=2"))
    rows = read_metrics(run_dir)
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(losses) == 2 and all(0 < loss < 1e3 for loss in losses)
    metric = "val/bbox_mAP" if task == "faster_rcnn" else "val/mIoU"
    assert rows[-1][metric] != "" and metric in result
    report = json.loads((run_dir / "coverage.json").read_text())
    assert report["integer_mac_share"] >= 0.99, report["float_ops"]
    assert (run_dir / "last_checkpoint").is_file() and (run_dir / "mm_config.py").is_file()
    text = (run_dir / "coverage.txt").read_text()
    assert all(op in text for op in report["float_ops"])  # every float op is named


@pytest.mark.parametrize("task,dataset", [("retinanet", "digits_det"), ("mask_rcnn", "digits_det"),
                                          ("fcn", "digits_seg"), ("pspnet", "digits_seg")])
def test_other_zoo_models_take_integer_steps_with_finite_losses(runs_dir, task, dataset):
    _, run_dir = train_in_process(runs_dir, *tiny(task, dataset, "numerics=int8", "trainer.max_steps=2",
                                                  "trainer.val_every_n_steps=2"))
    losses = [float(r["train/loss"]) for r in read_metrics(run_dir) if r["train/loss"]]
    assert len(losses) == 2 and all(0 < loss < 1e3 for loss in losses)


def test_fp32_run_uses_float_sgd_and_resumes(runs_dir):
    common = tiny("faster_rcnn", "digits_det", "numerics=fp32", "trainer.val_every_n_steps=1")
    _, run_dir = train_in_process(runs_dir, *common, "trainer.max_steps=1")
    assert not (run_dir / "coverage.json").exists()
    train_in_process(runs_dir, *common, "trainer.max_steps=2", "trainer.resume=true")
    steps = [r["step"] for r in read_metrics(run_dir) if r["train/loss"]]
    assert steps == ["1", "2"]  # the resumed run continued at step 2


def test_a_classification_dataset_is_refused_with_the_valid_names(runs_dir):
    from tasks.classification import ConfigError

    with pytest.raises(ConfigError, match="digits_det"):
        train_in_process(runs_dir, "task=faster_rcnn", "dataset=digits", "trainer.max_steps=1")


def test_unknown_zoo_config_suggests_close_names(runs_dir):
    from tasks.classification import ConfigError

    with pytest.raises(ConfigError, match="faster-rcnn_r50_fpn_1x_coco.py"):
        train_in_process(runs_dir, *tiny("faster_rcnn", "digits_det", "trainer.max_steps=1",
                                         "task.mm_config=mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_cocoo.py"))


def test_missing_real_dataset_folder_is_named(tmp_path):
    missing = tmp_path / "no" / "coco"
    result = train_subprocess(tmp_path, "task=faster_rcnn", "dataset=coco", f"dataset.root={missing}",
                              f"runs_dir={tmp_path / 'runs'}")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert str(missing) in output and "Traceback" not in output


@pytest.mark.parametrize("task", ["faster_rcnn", "retinanet", "mask_rcnn", "deeplabv3", "fcn", "pspnet"])
def test_every_task_config_builds_its_model(tmp_path, task):
    from mmengine.registry import init_default_scope

    from tasks.detection import FAMILY as DET
    from tasks.openmmlab import build_mm_config
    from tasks.segmentation import FAMILY as SEG

    family = DET if task in ("faster_rcnn", "retinanet", "mask_rcnn") else SEG
    cfg = compose(tmp_path, f"task={task}", f"dataset={family.datasets[0]}", *DATA)
    mm = build_mm_config(cfg, run_dir_of(cfg), family, None)
    init_default_scope(family.package)
    registry = __import__(f"{family.package}.registry", fromlist=["MODELS"]).MODELS
    model = registry.build(mm.model)
    assert model.backbone.depth == 18
    assert mm.optim_wrapper.optimizer.type == "IntSGD" and mm.train_cfg.type == "EpochBasedTrainLoop"
    # No pretrained weights: every stage trains and BN normalises with batch statistics.
    assert not model.backbone.norm_eval and model.backbone.frozen_stages == -1
    if family is SEG:  # digits_seg is ~95% background: class 0 is down-weighted in every head's loss
        heads = [mm.model.decode_head, mm.model.auxiliary_head]
        assert all(head.loss_decode.class_weight[:2] == [0.1, 1.0] for head in heads)


def test_pretrained_detector_weights_keep_the_zoo_backbone_settings(tmp_path):
    from tasks.detection import FAMILY
    from tasks.openmmlab import build_mm_config

    cfg = compose(tmp_path, "task=faster_rcnn", "dataset=digits_det", "task.checkpoint=/weights/detector.pth", *DATA)
    backbone = build_mm_config(cfg, run_dir_of(cfg), FAMILY, None).model.backbone
    assert backbone.norm_eval and backbone.frozen_stages == 1  # the zoo's values, tuned for pretrained weights


def test_coco_from_a_local_folder_trains_with_the_zoo_pipeline(tmp_path, runs_dir):
    """dataset=coco re-roots the zoo config's COCO loaders and evaluator onto a local folder
    (here a COCO layout made from digits_det, its categories renamed to COCO's)."""
    import json
    import shutil

    from mmdet.datasets import CocoDataset

    from tasks.datasets.digit_canvas import build_digits_det

    digits = build_digits_det(tmp_path / "digits", image_size=64, num_train=8, num_val=4)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(digits / split, coco / f"{split}2017")
        data = json.loads((digits / "annotations" / f"{split}.json").read_text())
        for category in data["categories"]:
            category["name"] = CocoDataset.METAINFO["classes"][category["id"] - 1]
        (coco / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    _, run_dir = train_in_process(runs_dir, "task=faster_rcnn", "dataset=coco", f"dataset.root={coco}",
                                  "dataset.image_size=64", "numerics=fp32", "trainer.max_steps=1",
                                  "trainer.batch_size=2", "trainer.eval_batch_size=4", "task.warmup_iters=0")
    rows = read_metrics(run_dir)
    assert float(rows[0]["train/loss"]) > 0 and rows[-1]["val/bbox_mAP"] != ""
    mm_config = (run_dir / "mm_config.py").read_text()
    assert str(coco) in mm_config and "data/coco" not in mm_config


@pytest.mark.parametrize("resume", [True, False])
def test_only_a_resume_continues_the_checkpoint_s_rounding_streams(tmp_path, resume):
    saved = IntegerContext(Numerics.preset("int8"))
    for _ in range(5):  # a stream some roundings in
        saved.key()
    numerics = {**Numerics.preset("int8").to_dict(), "seed": 3}
    hook = IntegerNumericsHook(numerics, str(tmp_path), restore_context=resume)
    runner = SimpleNamespace(model=torch.nn.Linear(2, 2))
    hook.after_load_checkpoint(runner, {"intrain_integer_context": saved.state_dict()})
    hook.before_val(runner)
    expected = saved.stream.state_dict() if resume else {"seed": 3, "counter": 0}
    assert context_of(runner.model).stream.state_dict() == expected
