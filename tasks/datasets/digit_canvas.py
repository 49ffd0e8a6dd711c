"""Embedded detection and segmentation datasets for OpenMMLab: canvases of 2 to 4 scikit-learn
digits (see digits.py) pasted at random non-overlapping places on a dark, noisy background.

``build_digits_det`` writes a COCO layout (``train/``, ``val/``, ``annotations/{train,val}.json``
with uncompressed RLE masks), ``build_digits_seg`` a VOC-like one (``img_dir/{train,val}``,
``ann_dir/{train,val}`` label maps, 0 = background, digit d = d + 1). Both are deterministic
functions of their arguments and cached on disk: a finished root holds a ``DONE`` marker with
the parameters it was generated with.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

DIGIT_CLASSES = tuple(str(d) for d in range(10))
SEG_CLASSES = ("background",) + DIGIT_CLASSES

# Bump when the generated data changes, so caches written by older code are refused, not reused.
FORMAT_VERSION = 1
VAL_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: which writers are held out is part of the dataset, never of a run's seed
MASK_THRESHOLD = 0.5  # a pixel belongs to the digit where the digit dominates the blend
MIN_IMAGE_SIZE = 24  # below this the smallest digit (image_size // 6) is too small to read
PLACEMENT_TRIES = 100
SPLITS = ("train", "val")


def default_root(name: str, image_size: int) -> Path:
    cache = os.environ.get("INTRAIN_DATA_CACHE") or Path.home() / ".cache" / "intrain" / "data"  # empty = unset
    return Path(cache) / f"{name}-{image_size}"


@functools.lru_cache(maxsize=None)
def _digit_pools() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Digit images (float in [0, 1]), labels, and the indices each split may draw from."""
    bunch = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(bunch.target))
    n_train = int(round(len(order) * (1 - VAL_FRACTION)))
    pools = {"train": order[:n_train], "val": order[n_train:]}
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64), pools


def _canvases(split: str, count: int, image_size: int, seed: int) -> Iterator[tuple[np.ndarray, list]]:
    """``count`` canvases: (H x W x 3 uint8 image, [(digit label, H x W bool mask), ...])."""
    images, labels, pools = _digit_pools()
    pool = pools[split]
    lo, hi = image_size // 6, image_size // 3
    for index in range(count):
        # One generator per canvas: canvas i is the same whatever num_train / num_val are.
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        background = rng.uniform(0, 40, size=3) + rng.normal(0, 4, size=(image_size, image_size, 3))
        canvas = np.clip(background, 0, 255)
        placed: list[tuple[int, int, int]] = []  # (x, y, side) of each pasted square
        digits = []
        for _ in range(rng.integers(2, 5)):
            for _ in range(PLACEMENT_TRIES):
                side = int(rng.integers(lo, hi + 1))
                x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
                # Disjoint squares, so the tight boxes inside them are disjoint too.
                if all(x >= px + ps or px >= x + side or y >= py + ps or py >= y + side for px, py, ps in placed):
                    break
            else:
                continue  # no room left: this canvas gets fewer digits
            digit = int(rng.choice(pool))
            alpha = np.asarray(
                Image.fromarray(images[digit]).resize((side, side), Image.Resampling.BILINEAR)
            ).clip(0, 1)[..., None]
            colour = rng.uniform(0.3, 1.0, size=3)
            colour = colour / colour.max() * 255  # brightest channel at full: bright on any background
            region = canvas[y : y + side, x : x + side]
            canvas[y : y + side, x : x + side] = region * (1 - alpha) + colour * alpha
            mask = np.zeros((image_size, image_size), dtype=bool)
            mask[y : y + side, x : x + side] = alpha[..., 0] > MASK_THRESHOLD
            placed.append((x, y, side))
            digits.append((int(labels[digit]), mask))
        yield np.round(canvas).astype(np.uint8), digits


def _rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    x0, y0 = xs.min(), ys.min()
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_det(out: Path, image_size: int, num: dict[str, int], seed: int) -> None:
    categories = [{"id": d + 1, "name": name} for d, name in enumerate(DIGIT_CLASSES)]
    for split in SPLITS:
        images, annotations = [], []
        for index, (image, digits) in enumerate(_canvases(split, num[split], image_size, seed)):
            file_name = f"{index:06d}.png"
            _save_png(image, out / split / file_name)
            images.append({"id": index + 1, "file_name": file_name, "width": image_size, "height": image_size})
            for label, mask in digits:
                annotations.append({
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": _bbox(mask),
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": _rle(mask),
                })
        coco = {"info": {"description": f"digits_det {split}"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": categories}
        (out / "annotations").mkdir(exist_ok=True)
        (out / "annotations" / f"{split}.json").write_text(json.dumps(coco))


def _write_seg(out: Path, image_size: int, num: dict[str, int], seed: int) -> None:
    for split in SPLITS:
        for index, (image, digits) in enumerate(_canvases(split, num[split], image_size, seed)):
            label_map = np.zeros((image_size, image_size), dtype=np.uint8)
            for label, mask in digits:
                label_map[mask] = label + 1
            _save_png(image, out / "img_dir" / split / f"{index:06d}.png")
            _save_png(label_map, out / "ann_dir" / split / f"{index:06d}.png")


def _build(name: str, write: Callable, root: str | Path, image_size: int, num_train: int, num_val: int,
           seed: int) -> Path:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"{name}: image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"{name}: num_train and num_val must be non-negative, got {num_train}, {num_val}")
    root = Path(root)
    params = {"dataset": name, "version": FORMAT_VERSION, "image_size": image_size,
              "num_train": num_train, "num_val": num_val, "seed": seed}
    if _cached(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Generated beside root and renamed into place, so an interrupted run leaves no half dataset.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write(tmp, image_size, {"train": num_train, "val": num_val}, seed)
        (tmp / "DONE").write_text(json.dumps(params, sort_keys=True))
        try:
            os.replace(tmp, root)  # replaces an empty root; fails on a non-empty one
        except OSError:
            if not _cached(root, params):  # not another process finishing the same job first
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _cached(root: Path, params: dict) -> bool:
    """True if root holds this exact dataset, False if it is missing or empty; else ValueError."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    marker = root / "DONE"
    if not marker.is_file():
        raise ValueError(f"{root} exists but holds no finished {params['dataset']} dataset (no DONE marker); "
                         "pick another root or delete it")
    found = json.loads(marker.read_text())
    if found == params:
        return True
    differ = ", ".join(f"{key}={found.get(key)!r} (asked {params.get(key)!r})"
                       for key in sorted(set(found) | set(params)) if found.get(key) != params.get(key))
    raise ValueError(f"{root} was generated with different parameters: {differ}; pick another root or delete it")


def build_digits_det(root: str | Path, image_size: int = 128, num_train: int = 400, num_val: int = 100,
                     seed: int = 0) -> Path:
    """The COCO detection dataset under ``root`` (generated unless already there); returns root."""
    return _build("digits_det", _write_det, root, image_size, num_train, num_val, seed)


def build_digits_seg(root: str | Path, image_size: int = 128, num_train: int = 400, num_val: int = 100,
                     seed: int = 0) -> Path:
    """The VOC-like segmentation dataset under ``root`` (generated unless already there); returns root."""
    return _build("digits_seg", _write_seg, root, image_size, num_train, num_val, seed)
