"""Property-based tests (hypothesis): config validation and the image-folder loader."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cifarcam.config import TrainConfig, build_config
from cifarcam.data.datasets import load_image_folder
from cifarcam.errors import ConfigError

FIELDS = {
    "epochs": (1, 10_000),
    "width": (1, 1024),
    "batch_size": (1, 65_536),
    "val_split": (0, None),
    "subset": (10, None),
}

values = st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=5), st.none())


@given(st.dictionaries(st.sampled_from([*FIELDS, "lr", "weight_decay", "bogus"]), values, max_size=4))
def test_config_validation_accepts_exactly_the_documented_ranges(candidate: dict[str, object]) -> None:
    try:
        config = build_config(candidate)
    except ConfigError as error:
        assert error.exit_code == 2
        assert "'" in error.message  # names the field
        named = error.message.split("'")[1].split(".")[0]
        assert named in candidate
        return
    for key, value in candidate.items():
        assert key != "bogus"
        got = getattr(config, key)
        if key in FIELDS and value is not None:
            low, high = FIELDS[key]
            assert got >= low and (high is None or got <= high)
        if key == "lr":
            assert got > 0
    assert TrainConfig.model_validate_json(config.model_dump_json()) == config


class_names = st.lists(st.text("abcdefgh", min_size=1, max_size=6), min_size=1, max_size=4, unique=True)


@settings(max_examples=25)
@given(class_names, st.data())
def test_image_folder_loader_on_generated_trees(names: list[str], data: st.DataObject) -> None:
    counts = {split: [data.draw(st.integers(1, 3)) for _ in names] for split in ("train", "test")}
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        written: dict[str, list[tuple[np.ndarray, str]]] = {"train": [], "test": []}
        for split in ("train", "test"):
            for name, count in zip(names, counts[split], strict=True):
                folder = root / split / name
                folder.mkdir(parents=True)
                for index in range(count):
                    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    cv2.imwrite(str(folder / f"{index}.png"), rgb[:, :, ::-1])
                    written[split].append((rgb, name))
        dataset = load_image_folder(root, Path(tmp) / "cache")
        assert dataset.classes == sorted(names)
        for split_name, split in (("train", dataset.train), ("test", dataset.test)):
            assert len(split) == sum(counts[split_name])
            assert torch.bincount(split.labels, minlength=len(names)).tolist() == [
                counts[split_name][names.index(name)] for name in sorted(names)
            ]
            loaded = {
                bytes(img.permute(1, 2, 0).contiguous().numpy()): dataset.classes[int(lbl)]
                for img, lbl in zip(split.images, split.labels, strict=True)
            }
            assert all(loaded[bytes(rgb)] == name for rgb, name in written[split_name])
