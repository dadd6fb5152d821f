import json
from pathlib import Path

import pytest

from cifarcam.config import (
    TrainConfig,
    batch_and_lr,
    build_config,
    merge_overrides,
    preset_values,
    read_config_file,
)
from cifarcam.errors import ConfigError


def test_defaults_are_the_documented_recipe() -> None:
    config = build_config({})
    assert (config.model, config.width, config.epochs, config.device) == ("resnet18", 64, 20, "auto")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epochs": 0}, "invalid value for 'epochs': Input should be greater than or equal to 1 (got 0)"),
        ({"lr": 0}, "invalid value for 'lr': Input should be greater than 0 (got 0)"),
        ({"lr": -1.5}, "invalid value for 'lr': Input should be greater than 0 (got -1.5)"),
        ({"width": 0}, "invalid value for 'width': Input should be greater than or equal to 1 (got 0)"),
        ({"subset": 5}, "invalid value for 'subset': Input should be greater than or equal to 10 (got 5)"),
        ({"model": "vgg"}, "invalid value for 'model': Input should be 'resnet18' or 'resnet34' (got 'vgg')"),
        (
            {"epochs": "many"},
            "invalid value for 'epochs': Input should be a valid integer, unable to parse string as an integer (got 'many')",
        ),
        (
            {"augment": {"cutout": 99}},
            "invalid value for 'augment.cutout': Input should be less than or equal to 32 (got 99)",
        ),
        ({"learning_rate": 0.1}, "unknown config field 'learning_rate'"),
        ({"augment": {"rotate": 10}}, "unknown config field 'augment.rotate'"),
    ],
)
def test_bad_values_name_the_field(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(values)
    assert caught.value.message == message
    assert caught.value.exit_code == 2


def test_overrides_win_over_file_and_none_means_not_given(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 3, "lr": 0.1}))
    merged = merge_overrides(read_config_file(path), {"epochs": 5, "lr": None, "width": 16})
    config = build_config(merged)
    assert (config.epochs, config.lr, config.width) == (5, 0.1, 16)


def test_a_config_file_overrides_the_preset_augmentation_field_by_field() -> None:
    from cifarcam.config import preset_values

    config = build_config(merge_overrides(preset_values("quick"), {"augment": {"cutout": 8}}))
    assert (config.augment.flip, config.augment.translate, config.augment.cutout) == (True, 2, 8)


def test_data_paths_are_kept_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert build_config({"data": "trees/cifar"}).data == str(tmp_path / "trees" / "cifar")
    assert build_config({"data": "~/cifar"}).data == str(tmp_path / "home" / "cifar")
    assert build_config({}).data == "cifar10"  # torchvision's download, not a path
    assert build_config({"data_dir": "cache"}).data_dir == str(tmp_path / "cache")
    assert build_config({"data_dir": "cifar10"}).data_dir == str(tmp_path / "cifar10")  # a folder here
    assert build_config({}).data_dir is None
    for field in ("data", "data_dir"):
        with pytest.raises(ConfigError, match=f"invalid value for '{field}': an empty path"):
            build_config({field: " "})


def test_round_trip_through_json(tmp_path: Path) -> None:
    config = build_config({"width": 16, "augment": {"cutout": 8}})
    again = TrainConfig.model_validate_json(config.model_dump_json())
    assert again == config


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
        ("[1, 2]", "must hold a JSON mapping of settings"),
    ],
)
def test_malformed_config_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_config_file(path)


def test_yaml_config_files_are_read_like_json(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("# a comment\nwidth: 16\naugment:\n  cutout: 8\nepoch_images: null\n")
    assert read_config_file(path) == {"width": 16, "augment": {"cutout": 8}, "epoch_images": None}
    assert build_config(read_config_file(path)).augment.cutout == 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("width: [16\n", r"is not valid YAML: expected ',' or '\]', but got '<stream end>' at line 2"),
        ("- 1\n- 2\n", "must hold a YAML mapping of settings"),
        ("", "must hold a YAML mapping of settings"),
        ("!!python/object:os.system {}\n", "is not valid YAML: "),  # safe_load builds no objects
    ],
)
def test_malformed_yaml_config_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.yml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_config_file(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "nope.json")


def test_presets_and_their_errors() -> None:
    from cifarcam.config import preset_values

    quick = build_config(preset_values("quick"))
    assert quick.width < 64 and quick.subset is None and quick.epoch_images == 25_000 and quick.epochs == 20
    assert quick.augment.translate == 2 and quick.augment.flip
    preset_values("quick")["augment"]["translate"] = 9  # a caller's edit stays its own
    assert build_config(preset_values("quick")).augment.translate == 2
    seeded = build_config(preset_values("seed-albumentations"))
    names = [t["__class_fullname__"] for t in (seeded.albumentations or {})["transform"]["transforms"]]
    assert names == ["HorizontalFlip", "Affine", "CoarseDropout"]
    with pytest.raises(ConfigError, match="unknown preset 'fast'; choose one of: quick, seed-albumentations"):
        preset_values("fast")


def test_a_broken_albumentations_pipeline_is_a_config_error() -> None:
    broken = {"transform": {"__class_fullname__": "NoSuchTransform", "p": 1.0}}
    with pytest.raises(
        ConfigError, match="invalid value for 'albumentations': not an albumentations pipeline"
    ):
        build_config({"albumentations": broken})


@pytest.mark.parametrize(
    ("transform", "made"),
    [
        ({"__class_fullname__": "Resize", "height": 64, "width": 64, "p": 1.0}, "(64, 64, 3) uint8"),
        # rare (1 draw in 20): caught by the draw with every p set to 1
        ({"__class_fullname__": "RandomScale", "scale_limit": 0.5, "p": 0.05}, "(43, 43, 3) uint8"),
        ({"__class_fullname__": "Normalize", "p": 1.0}, "(32, 32, 3) float32"),
    ],
)
def test_a_pipeline_that_changes_the_images_size_or_type_is_a_config_error(
    transform: dict[str, object], made: str
) -> None:
    import albumentations as A

    pipeline = {"transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": [transform]}}
    with pytest.raises(ConfigError) as caught:
        build_config({"albumentations": pipeline})
    assert caught.value.message == (
        "invalid value for 'albumentations': the albumentations pipeline must keep 32x32x3 uint8 "
        f"images (it made {made}); cifarcam converts them to tensors itself"
    )
    keeps = A.to_dict(A.Compose([A.HorizontalFlip(p=0.5), A.CoarseDropout(p=0.5)]))
    assert build_config({"albumentations": keeps}).albumentations == keeps


@pytest.mark.parametrize(
    ("values", "train_images", "expected"),
    [
        ({}, 50_000, (512, 0.4)),  # the full run: 98 steps x 20 epochs
        ({"epoch_images": 25_000}, 50_000, (256, 0.2)),  # 49 x 20 = 980 steps at 512
        ({"epochs": 20}, 10_000, (128, 0.1)),
        ({"epochs": 2}, 2_000, (64, 0.05)),  # `train --help`'s example: 64 steps, the smallest batch
        ({"epochs": 2, "batch_size": 100}, 2_000, (100, 0.078125)),  # the lr follows a given batch
        ({"epochs": 2, "lr": 0.1}, 2_000, (64, 0.1)),
        (preset_values("quick"), 50_000, (256, 0.4)),
    ],
)
def test_batch_and_lr_left_unset_are_sized_to_the_run(
    values: dict, train_images: int, expected: tuple[int, float]
) -> None:
    assert batch_and_lr(build_config(values), train_images) == expected
