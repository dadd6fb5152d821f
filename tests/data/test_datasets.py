from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import copy_tree, write_image_folder

from cifarcam.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    balanced_indices,
    denormalize,
    load_image_folder,
    normalize,
    split_train,
    synthetic_dataset,
)
from cifarcam.errors import DataError, UsageError


def test_balanced_subset_is_even_seeded_and_unique() -> None:
    labels = torch.arange(1000) % 10
    picked = balanced_indices(labels, 105, 10, seed=7)
    counts = torch.bincount(labels[picked], minlength=10).tolist()
    assert counts == [11] * 5 + [10] * 5
    assert len(set(picked.tolist())) == 105
    assert torch.equal(picked, balanced_indices(labels, 105, 10, seed=7))
    assert not torch.equal(picked, balanced_indices(labels, 105, 10, seed=8))


def test_subset_larger_than_data_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--subset 2000 is larger than the 1000 training images"):
        balanced_indices(torch.arange(1000) % 10, 2000, 10, seed=0)


def test_a_class_too_small_for_the_subset_is_named() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    with pytest.raises(UsageError) as raised:
        balanced_indices(labels, 6, 3, seed=0, names=["cat", "dog", "owl"])
    assert raised.value.message == "--subset 6 needs 2 images of class 'dog' (index 1), which has 1"
    with pytest.raises(UsageError) as raised:
        balanced_indices(labels[:3], 2, 2, seed=0, what="val-split")
    assert raised.value.message == "--val-split 2 needs 1 image of class 1, which has 0"


def test_validation_and_training_subsets_are_disjoint_and_balanced() -> None:
    data = synthetic_dataset(500, 10)
    train, val = split_train(data.train, data.classes, subset=200, val_split=100, seed=0)
    assert val is not None and len(val) == 100 and len(train) == 200
    assert torch.bincount(val.labels, minlength=10).tolist() == [10] * 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [20] * 10
    # No image is in both (synthetic images are distinct with overwhelming probability).
    val_rows = {bytes(row) for row in val.images.flatten(1).numpy()}
    assert not any(bytes(row) in val_rows for row in train.images.flatten(1).numpy())


def test_normalize_and_denormalize_are_inverse() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = normalize(images, CIFAR10_MEAN, CIFAR10_STD)
    assert abs(x.mean().item()) < 1.5
    back = denormalize(x, CIFAR10_MEAN, CIFAR10_STD)
    assert torch.allclose(back * 255, images.float(), atol=1e-3)


def test_image_folder_loads_labels_in_sorted_class_order_and_rgb(tmp_path: Path) -> None:
    data = synthetic_dataset(20, 10, seed=1)
    root = write_image_folder(data, tmp_path / "tree")
    loaded = load_image_folder(root, tmp_path / "cache")
    assert loaded.classes == sorted(data.classes)
    assert loaded.train.images.shape == (20, 3, 32, 32) and loaded.train.images.dtype == torch.uint8
    # Files are read class by class; each image must come back exactly, RGB channel order included.
    for split, original in ((loaded.train, data.train), (loaded.test, data.test)):
        for image, label in zip(split.images, split.labels, strict=True):
            matches = (original.images == image).flatten(1).all(1)
            assert matches.any() and original.labels[matches][0] == label


def test_second_load_uses_the_cache_and_changes_invalidate_it(tmp_path: Path) -> None:
    root = write_image_folder(synthetic_dataset(20, 10, seed=2), tmp_path / "tree")
    cache = tmp_path / "cache"
    first = load_image_folder(root, cache)
    cached_files = list((cache / "imagefolder").glob("*.npz"))
    assert len(cached_files) == 1
    second = load_image_folder(root, cache)
    assert torch.equal(first.train.images, second.train.images)
    # Replace one image: the fingerprint changes and the new pixels are read.
    target = sorted((root / "train" / "class0").iterdir())[0]
    cv2.imwrite(str(target), np.zeros((32, 32, 3), np.uint8))
    third = load_image_folder(root, cache)
    assert (third.train.images.flatten(1) == 0).all(1).sum() == 1
    assert len(list((cache / "imagefolder").glob("*.npz"))) == 1  # the stale cache was replaced


def test_a_new_empty_class_folder_is_not_served_the_old_labels(tmp_path: Path) -> None:
    """Class folders number the labels: one added, even empty, renumbers them, so the cache
    made before it must not be used."""
    data = synthetic_dataset(20, 10, seed=3)
    root = write_image_folder(data, tmp_path / "tree")
    load_image_folder(root, tmp_path / "cache")
    for split in ("train", "test"):
        (root / split / "aaa-new").mkdir()  # sorts first, holds no image
    loaded = load_image_folder(root, tmp_path / "cache")
    assert loaded.classes == ["aaa-new", *sorted(data.classes)]
    for image, label in zip(loaded.train.images, loaded.train.labels, strict=True):
        original = data.train.labels[(data.train.images == image).flatten(1).all(1)][0]
        assert loaded.classes[label] == data.classes[original]


def test_hidden_folders_are_not_classes_and_file_names_need_not_be_utf8(tmp_path: Path) -> None:
    import os

    data = synthetic_dataset(20, 10, seed=4)
    root = write_image_folder(data, tmp_path / "tree")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # left by Jupyter in one split only
    first = sorted((root / "train" / "class0").iterdir())[0]
    os.rename(first, os.fsencode(first.parent) + b"/\xff" + os.fsencode(first.name))
    loaded = load_image_folder(root, tmp_path / "cache")
    assert loaded.classes == sorted(data.classes) and len(loaded.train) == 20
    assert torch.equal(loaded.train.images.sort(0).values, data.train.images.sort(0).values)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_test", "has no 'test/' folder"),
        ("mismatch", "class folders differ between"),
        ("non_image", "notes.txt' is not a readable image"),
        ("wrong_size", "big.png' is not a 32x32 8-bit RGB image (shape (40, 40, 3), uint8)"),
        ("grayscale", "gray.png' is not a 32x32 8-bit RGB image (shape (32, 32), uint8)"),
        ("empty", "holds no images"),
    ],
)
def test_broken_trees_name_the_problem(
    tmp_path: Path, synthetic_tree: Path, damage: str, message: str
) -> None:
    root = copy_tree(synthetic_tree, tmp_path / "tree")
    cls = root / "train" / "class1"
    if damage == "no_test":
        import shutil

        shutil.rmtree(root / "test")
    elif damage == "mismatch":
        (root / "test" / "class1").rename(root / "test" / "other")
    elif damage == "non_image":
        (cls / "notes.txt").write_text("hello")
    elif damage == "wrong_size":
        cv2.imwrite(str(cls / "big.png"), np.zeros((40, 40, 3), np.uint8))
    elif damage == "grayscale":
        cv2.imwrite(str(cls / "gray.png"), np.zeros((32, 32), np.uint8))
    elif damage == "empty":
        for folder in (root / "test").iterdir():
            for file in folder.iterdir():
                file.unlink()
    with pytest.raises(DataError) as caught:
        load_image_folder(root, tmp_path / "cache")
    assert message in caught.value.message


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", tmp_path / "cache")
