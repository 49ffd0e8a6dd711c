"""tasks.datasets: the embedded digits, CIFAR and ImageNet layouts written into tmp_path, and
the errors a wrong root gives."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.datasets import DATASETS, DatasetError, DatasetSplits, build_datasets
from tasks.datasets.digits import digit_tensors


def test_digits_shapes_and_labels():
    splits = build_datasets("digits", image_size=32)
    assert isinstance(splits, DatasetSplits)
    assert (splits.num_classes, splits.in_channels) == (10, 3)
    assert len(splits.train) + len(splits.val) == 1797
    assert len(splits.val) == pytest.approx(0.2 * 1797, abs=1)
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey as RGB
    assert build_datasets("digits", image_size=16, augment=False).val[0][0].shape == (3, 16, 16)


def test_digits_split_is_fixed_and_stratified():
    first = digit_tensors(32)
    digit_tensors.cache_clear()
    torch.manual_seed(1234)
    np.random.seed(1234)  # a run's seeds must not move the split
    again = digit_tensors(32)
    for key in first:
        assert torch.equal(first[key], again[key])
    counts = torch.bincount(first["val_labels"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~36 of each digit


def test_digits_normalised_with_train_stats():
    splits = build_datasets("digits", augment=False)
    train = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    assert train.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (train.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    raw = digit_tensors(32)["train_images"]
    assert raw.min() >= 0 and raw.max() <= 1


def test_digits_augment_crops_but_never_flips():
    splits = build_datasets("digits", augment=True)
    data = digit_tensors(32)
    mean, std = data["mean"].view(3, 1, 1), data["std"].view(3, 1, 1)
    original = data["train_images"][0]
    padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
    windows = padded.unfold(1, 32, 1).unfold(2, 32, 1)  # every 32x32 crop of the padded image
    torch.manual_seed(0)
    moved = 0
    for _ in range(40):
        image = splits.train[0][0] * std + mean
        matches = (windows - image[:, None, None]).abs().amax(dim=(0, 3, 4)) < 1e-5
        assert matches.any(), "not a crop of the unflipped image"
        assert not matches[4, 4] or torch.allclose(image, original, atol=1e-5)
        moved += not bool(matches[4, 4])
    assert moved > 0
    assert torch.equal(splits.val[0][0], build_datasets("digits", augment=False).val[0][0])


def write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def fake_batch(n, label_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"batch_label": b"fake",
    }


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", fake_batch(4, b"labels", 10, i))
    write_pickle(folder / "test_batch", fake_batch(3, b"labels", 10, 9))
    write_pickle(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    return tmp_path


def test_cifar10_from_parent_or_folder(cifar10_root):
    for root in (cifar10_root, cifar10_root / "cifar-10-batches-py"):
        splits = build_datasets("cifar10", str(root))
        assert (len(splits.train), len(splits.val), splits.num_classes, splits.in_channels) == (20, 3, 10, 3)
        image, label = splits.train[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)


def test_cifar10_pixels_labels_and_resize(cifar10_root):
    batch = pickle.loads((cifar10_root / "cifar-10-batches-py" / "test_batch").read_bytes(), encoding="bytes")
    splits = build_datasets("cifar10", cifar10_root, augment=False)
    image, label = splits.val[1]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    expected = torch.from_numpy(batch[b"data"][1].reshape(3, 32, 32)).float() / 255  # channel-major rows
    torch.testing.assert_close(image * std + mean, expected)
    assert label == batch[b"labels"][1]
    assert build_datasets("cifar10", cifar10_root, image_size=64).train[0][0].shape == (3, 64, 64)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_pickle(folder / "train", {**fake_batch(6, b"fine_labels", 100, 1), b"coarse_labels": [0] * 6})
    write_pickle(folder / "test", {**fake_batch(2, b"fine_labels", 100, 2), b"coarse_labels": [0] * 2})
    splits = build_datasets("cifar100", tmp_path)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (6, 2, 100)
    assert splits.val[0][1] == pickle.loads((folder / "test").read_bytes(), encoding="bytes")[b"fine_labels"][0]


def test_cifar_missing_root_names_path_and_source(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DatasetError, match="no_such_dir") as err:
        build_datasets("cifar10", missing)
    assert "cifar.html" in str(err.value) and "data_batch_1" in str(err.value)
    with pytest.raises(DatasetError, match="dataset.root"):
        build_datasets("cifar100", None)


def test_cifar_missing_batch_file(cifar10_root):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"missing .*cifar-10-batches-py/data_batch_3"):
        build_datasets("cifar10", cifar10_root)


@pytest.mark.parametrize(
    "content",
    [
        b"not a pickle at all",
        pickle.dumps([1, 2, 3]),
        pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}),
    ],
    ids=["garbage", "not-a-dict", "wrong-shape"],
)
def test_cifar_corrupt_pickle(cifar10_root, content):
    bad = cifar10_root / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(content)
    with pytest.raises(DatasetError, match="test_batch") as err:
        build_datasets("cifar10", cifar10_root)
    assert "cifar.html" in str(err.value)


def test_imagenet_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.JPEG")
    splits = build_datasets("imagenet", tmp_path, image_size=24)
    assert (len(splits.train), len(splits.val), splits.num_classes, splits.in_channels) == (6, 4, 2, 3)
    for dataset in (splits.train, splits.val):
        image, label = dataset[len(dataset) - 1]
        assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and label == 1


def test_imagenet_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match=r"train is not a directory.*<root>/train/<class>"):
        build_datasets("imagenet", tmp_path)
    (tmp_path / "train" / "n01").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "n01" / "a.JPEG")
    with pytest.raises(DatasetError, match="val"):
        build_datasets("imagenet", tmp_path)
    (tmp_path / "val" / "n01").mkdir(parents=True)  # a class folder with no image in it
    with pytest.raises(DatasetError, match="val"):
        build_datasets("imagenet", tmp_path)


def test_unknown_name_lists_valid_names():
    with pytest.raises(DatasetError) as err:
        build_datasets("mnist")
    assert all(name in str(err.value) for name in DATASETS)
    assert issubclass(DatasetError, ValueError)
