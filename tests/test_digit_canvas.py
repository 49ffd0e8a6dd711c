"""tasks.datasets.digit_canvas: the generated COCO and VOC-like digit canvases are deterministic,
cached, well-formed, and their masks, boxes and label maps agree."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.datasets.digit_canvas import (
    DIGIT_CLASSES,
    SEG_CLASSES,
    build_digits_det,
    build_digits_seg,
    default_root,
)

SMALL = dict(image_size=64, num_train=8, num_val=4)


def decode_rle(rle: dict) -> np.ndarray:
    """Uncompressed COCO RLE -> bool mask: alternating runs (zeros first), column-major."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    assert flat.size == h * w
    return flat.reshape((h, w), order="F")


@pytest.fixture(scope="module")
def det_root(tmp_path_factory) -> Path:
    return build_digits_det(tmp_path_factory.mktemp("det") / "digits_det", **SMALL)


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory) -> Path:
    return build_digits_seg(tmp_path_factory.mktemp("seg") / "digits_seg", **SMALL)


def load_coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def test_det_layout_and_determinism(det_root, tmp_path):
    other = build_digits_det(tmp_path / "again", **SMALL)
    for split, count in (("train", 8), ("val", 4)):
        coco = load_coco(det_root, split)
        assert [im["file_name"] for im in coco["images"]] == [f"{i:06d}.png" for i in range(count)]
        assert sorted(p.name for p in (det_root / split).iterdir()) == [f"{i:06d}.png" for i in range(count)]
        path = Path("annotations") / f"{split}.json"
        assert (det_root / path).read_bytes() == (other / path).read_bytes()
        for name in ("000000.png", f"{count - 1:06d}.png"):
            assert (det_root / split / name).read_bytes() == (other / split / name).read_bytes()
    image = Image.open(det_root / "train" / "000000.png")
    assert (image.mode, image.size) == ("RGB", (64, 64))


def test_seg_determinism(seg_root, tmp_path):
    other = build_digits_seg(tmp_path / "again", **SMALL)
    for sub in ("img_dir/train/000000.png", "ann_dir/train/000007.png", "ann_dir/val/000003.png"):
        assert (seg_root / sub).read_bytes() == (other / sub).read_bytes()


def test_other_seed_gives_other_data(det_root, tmp_path):
    other = build_digits_det(tmp_path / "seed1", **SMALL, seed=1)
    assert load_coco(det_root, "train")["annotations"] != load_coco(other, "train")["annotations"]


def test_cache_hit_does_not_rewrite(tmp_path):
    root = build_digits_seg(tmp_path / "seg", **SMALL)
    files = [root, root / "DONE", root / "ann_dir" / "train" / "000000.png"]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    assert build_digits_seg(str(root), **SMALL) == root
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == before


def test_parameter_mismatch_raises(det_root):
    with pytest.raises(ValueError, match="num_val"):
        build_digits_det(det_root, image_size=64, num_train=8, num_val=5)
    with pytest.raises(ValueError, match="dataset"):
        build_digits_seg(det_root, **SMALL)


def test_non_dataset_root_refused_and_empty_root_filled(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="DONE"):
        build_digits_det(tmp_path / "junk", **SMALL)
    (tmp_path / "empty").mkdir()
    assert (build_digits_det(tmp_path / "empty", **SMALL) / "DONE").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk"]  # no temporary left over


def test_det_boxes_masks_and_categories(det_root):
    for split in ("train", "val"):
        coco = load_coco(det_root, split)
        assert [(c["id"], c["name"]) for c in coco["categories"]] == [(d + 1, str(d)) for d in range(10)]
        assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
        for image in coco["images"]:
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            assert 2 <= len(anns) <= 4
            masks = []
            for ann in anns:
                assert 1 <= ann["category_id"] <= 10 and ann["iscrowd"] == 0
                x, y, w, h = ann["bbox"]
                assert all(isinstance(v, float) for v in ann["bbox"])
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
                mask = decode_rle(ann["segmentation"])
                assert mask.shape == (image["height"], image["width"]) == (64, 64)
                ys, xs = np.nonzero(mask)
                assert [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()] == [x, y, w, h]
                assert ann["area"] == mask.sum()
                masks.append(mask)
            for i, a in enumerate(anns):
                for b in anns[i + 1:]:
                    (ax, ay, aw, ah), (bx, by, bw, bh) = a["bbox"], b["bbox"]
                    assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
            assert np.sum(masks, axis=0).max() == 1  # masks disjoint too


def test_seg_label_maps_match_det_masks(det_root, seg_root):
    assert SEG_CLASSES == ("background",) + DIGIT_CLASSES and len(SEG_CLASSES) == 11
    # Same arguments, same canvases: the detection masks say where each label must be.
    for split, count in (("train", 8), ("val", 4)):
        coco = load_coco(det_root, split)
        assert sorted(p.name for p in (seg_root / "ann_dir" / split).iterdir()) == \
            sorted(p.name for p in (seg_root / "img_dir" / split).iterdir()) == [f"{i:06d}.png" for i in range(count)]
        for image in coco["images"]:
            img = Image.open(seg_root / "img_dir" / split / image["file_name"])
            assert img.tobytes() == Image.open(det_root / split / image["file_name"]).tobytes()
            label_img = Image.open(seg_root / "ann_dir" / split / image["file_name"])
            assert label_img.mode == "L"
            labels = np.asarray(label_img)
            assert labels.max() <= 10
            digit_pixels = np.zeros(labels.shape, dtype=bool)
            for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
                mask = decode_rle(ann["segmentation"])
                assert (labels[mask] == ann["category_id"]).all()
                digit_pixels |= mask
            assert (labels[~digit_pixels] == 0).all()


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("INTRAIN_DATA_CACHE", str(tmp_path))
    assert default_root("digits_det", 128) == tmp_path / "digits_det-128"
    monkeypatch.delenv("INTRAIN_DATA_CACHE")
    assert default_root("digits_seg", 64) == Path.home() / ".cache" / "intrain" / "data" / "digits_seg-64"
