"""`cifarcam gradcam` and `cifarcam sanity` over a small trained run: files, shapes, targets, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import torch
from conftest import copy_tree, disk_full_at_fsync, snapshot
from safetensors.torch import load_file
from typer.testing import CliRunner

from cifarcam.cli import app

runner = CliRunner()


@pytest.fixture()
def runs(trained_runs: Path, tmp_path: Path) -> Path:
    return copy_tree(trained_runs, tmp_path / "runs")


def cifarcam(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


def test_several_methods_and_layers_make_one_gallery_and_a_maps_file_each(runs: Path) -> None:
    checkpoint = (runs / "tiny" / "checkpoints" / "last.safetensors").read_bytes()
    output = cifarcam(
        "gradcam", "--run", "tiny", "--runs-dir", str(runs), "--count", "4",
        "--method", "gradcam", "--method", "scorecam", "--method", "guided-gradcam",
        "--layer", "layer3", "--layer", "layer4",
    )  # fmt: skip
    folder = runs / "tiny" / "gradcam"
    stem = "gradcam,scorecam,guided-gradcam_layer3,layer4"
    assert str(folder / f"{stem}.png") in output
    meta = json.loads((folder / f"{stem}.json").read_text())
    assert meta["methods"] == ["gradcam", "scorecam", "guided-gradcam"]
    assert meta["layers"] == ["layer3", "layer4"] and meta["targets"] == ["pred", "true"]
    mistakes = meta["indices"]
    for method in ("gradcam", "scorecam"):
        for layer in ("layer3", "layer4"):
            maps = load_file(folder / f"{method}_{layer}.safetensors")
            assert maps["maps_pred"].shape == maps["maps_true"].shape == (4, 32, 32)
            assert maps["indices"].tolist() == mistakes
            assert maps["maps_pred"].min() >= 0 and maps["maps_pred"].max() <= 1
    guided = load_file(folder / "guided-gradcam_layer4.safetensors")
    assert guided["attributions_pred"].shape == (4, 3, 32, 32)
    image = cv2.imread(str(folder / f"{stem}.png"))
    assert image.shape[0] > 4 * 100 and image.shape[1] > 13 * 100  # 4 rows; input + 12 tiles a row
    # The model's checkpoint is untouched.
    assert (runs / "tiny" / "checkpoints" / "last.safetensors").read_bytes() == checkpoint


def test_target_class_by_name_and_the_whole_test_set(runs: Path) -> None:
    cifarcam(
        "gradcam", "--run", "tiny", "--runs-dir", str(runs), "--all", "--count", "3",
        "--target", "class3", "--batch-size", "64",
    )  # fmt: skip
    whole = runs / "tiny" / "gradcam" / "gradcam_layer4_all.safetensors"
    maps = load_file(whole)
    assert set(maps) == {"maps_class_class3", "indices", "pred", "true"}
    assert maps["maps_class_class3"].shape == (200, 32, 32)  # every test image, in four batches
    assert maps["indices"].tolist() == list(range(200))
    meta = json.loads((runs / "tiny" / "gradcam" / "gradcam_layer4.json").read_text())
    assert len(meta["indices"]) == 3 and meta["targets"] == ["class:class3"]
    # A class index means the same class; the mistakes' maps go to their own file, and the
    # whole test set's stay as they were.
    before = whole.read_bytes()
    cifarcam("gradcam", "--run", "tiny", "--runs-dir", str(runs), "--count", "3", "--target", "3")
    again = load_file(runs / "tiny" / "gradcam" / "gradcam_layer4.safetensors")
    assert again["indices"].tolist() == meta["indices"]
    assert torch.allclose(again["maps_class_class3"], maps["maps_class_class3"][again["indices"]], atol=1e-5)
    assert whole.read_bytes() == before


def test_a_run_without_mistakes_explains_the_whole_test_set_without_a_gallery(
    runs: Path, synthetic_tree: Path, tmp_path: Path
) -> None:
    from cifarcam.evaluation.loading import load_run, test_logits
    from cifarcam.runs.rundir import RunDir

    loaded = load_run(RunDir(runs, "tiny"))
    wrong = (test_logits(loaded, write=False).argmax(1) != loaded.test.labels).tolist()
    tree = copy_tree(synthetic_tree, tmp_path / "tree")
    # The image-folder order: classes, then files, sorted by name.
    files = [f for c in sorted((tree / "test").iterdir()) for f in sorted(c.iterdir())]
    assert len(files) == len(wrong) and 0 < sum(wrong) < len(wrong)
    for path, mistaken in zip(files, wrong, strict=True):
        if mistaken:
            path.unlink()
    config_path = runs / "tiny" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"data": str(tree)}))
    right = len(wrong) - sum(wrong)
    result = runner.invoke(app, ["misclassified", "--run", "tiny", "--runs-dir", str(runs)])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0] == (
        f"Error: none of the {right} test images is misclassified: there are no mistakes to show"
    )
    output = cifarcam("gradcam", "--run", "tiny", "--runs-dir", str(runs), "--all")
    assert "no gallery" in output
    maps = load_file(runs / "tiny" / "gradcam" / "gradcam_layer4_all.safetensors")
    assert maps["maps_pred"].shape == (right, 32, 32) and torch.equal(maps["pred"], maps["true"])
    assert not list((runs / "tiny" / "gradcam").glob("*.png"))


def test_metrics_table_json_and_merge(runs: Path) -> None:
    common = [
        "gradcam",
        "--run",
        "tiny",
        "--runs-dir",
        str(runs),
        "--count",
        "5",
        "--metrics",
        "--steps",
        "4",
    ]
    output = cifarcam(*common, "--method", "gradcam", "--method", "eigencam")
    assert "deletion AUC" in output and "random" in output
    metrics_path = runs / "tiny" / "gradcam" / "metrics.json"
    rows = json.loads(metrics_path.read_text())["results"]
    assert [(r["method"], r["layer"]) for r in rows] == [
        ("gradcam", "layer4"),
        ("eigencam", "layer4"),
        ("random", "-"),
    ]
    for row in rows:
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
        assert 0 <= row["average_drop"] <= 100 and 0 <= row["increase_in_confidence"] <= 100
        assert row["images"] == 5 and row["target"] == "pred"
    cifarcam(*common, "--method", "layercam", "--layer", "layer3")
    merged = json.loads(metrics_path.read_text())["results"]
    assert [(r["method"], r["layer"]) for r in merged] == [
        ("gradcam", "layer4"),
        ("eigencam", "layer4"),
        ("layercam", "layer3"),
        ("random", "-"),
    ]
    # Rows name their own steps and checkpoint: another step count adds rows, it does not
    # relabel or replace the earlier ones.
    assert all((r["steps"], r["checkpoint"]) == (4, "last") for r in merged)
    cifarcam(*common[:-1], "8", "--method", "gradcam")
    again = json.loads(metrics_path.read_text())["results"]
    assert [(r["method"], r["layer"], r["steps"]) for r in again] == [
        ("gradcam", "layer4", 4),
        ("eigencam", "layer4", 4),
        ("layercam", "layer3", 4),
        ("random", "-", 4),
        ("gradcam", "layer4", 8),
        ("random", "-", 8),
    ]
    # Maps computed under bf16 are scored in rows of their own, next to fp32's.
    assert {r["precision"] for r in again} == {"fp32"}
    cifarcam(*common[:-1], "8", "--method", "gradcam", "--precision", "bf16", "--device", "cpu")
    last = json.loads(metrics_path.read_text())["results"]
    assert [(r["method"], r["steps"], r["precision"]) for r in last[-4:]] == [
        ("gradcam", 8, "fp32"),
        ("random", 8, "fp32"),
        ("gradcam", 8, "bfloat16"),
        ("random", 8, "bfloat16"),
    ]


@pytest.mark.parametrize(
    ("method", "layer", "name"),
    [("gradcam", "layer3", "gradcam_layer3"), ("guided-backprop", "layer4", "guided-backprop")],
)
def test_sanity_writes_a_table_and_a_plot(runs: Path, method: str, layer: str, name: str) -> None:
    output = cifarcam(
        "sanity",
        "--run",
        "tiny",
        "--runs-dir",
        str(runs),
        "--method",
        method,
        "--layer",
        layer,
        "--count",
        "8",
    )
    assert "Spearman" in output and "layer4.1" in output
    result = json.loads((runs / "tiny" / "sanity" / f"{name}.json").read_text())
    assert result["method"] == method and result["images"] == 8
    assert [s["randomized"] for s in result["steps"]][:3] == ["none", "linear", "layer4.1"]
    assert result["steps"][0]["spearman"] == pytest.approx(1.0)
    image = cv2.imread(str(runs / "tiny" / "sanity" / f"{name}.png"))
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_bf16_autocast_maps_stay_close_to_float32(runs: Path) -> None:
    common = ["gradcam", "--run", "tiny", "--runs-dir", str(runs), "--count", "6", "--device", "cpu"]
    cifarcam(*common)
    exact = load_file(runs / "tiny" / "gradcam" / "gradcam_layer4.safetensors")
    cifarcam(*common, "--precision", "bf16")
    fast = load_file(runs / "tiny" / "gradcam" / "gradcam_layer4.safetensors")
    assert torch.equal(exact["indices"], fast["indices"])
    difference = (exact["maps_pred"] - fast["maps_pred"]).abs().max().item()
    assert 0 < difference < 0.1  # autocast really ran, and stayed close


def test_the_gallery_stops_at_24_rows_while_the_maps_cover_every_mistake(runs: Path) -> None:
    cifarcam("gradcam", "--run", "tiny", "--runs-dir", str(runs), "--count", "30")
    maps = load_file(runs / "tiny" / "gradcam" / "gradcam_layer4.safetensors")
    meta = json.loads((runs / "tiny" / "gradcam" / "gradcam_layer4.json").read_text())
    assert maps["maps_pred"].shape[0] == 30 and len(meta["indices"]) == 24
    assert meta["indices"] == maps["indices"][:24].tolist()


def test_guided_backprop_is_labelled_fp32_and_long_galleries_get_short_names(runs: Path) -> None:
    from safetensors import safe_open

    layers = [f"layer{i}.{j}.{part}" for i in (1, 2, 3, 4) for j in (0, 1) for part in ("conv1", "bn1")]
    args = ["gradcam", "--run", "tiny", "--runs-dir", str(runs), "--count", "2", "--device", "cpu"]
    args += ["--method", "guided-backprop", "--method", "gradcam", "--precision", "bf16"]
    cifarcam(*args, *[option for layer in layers for option in ("--layer", layer)])
    folder = runs / "tiny" / "gradcam"
    with safe_open(folder / "guided-backprop.safetensors", "pt") as stored:
        assert (stored.metadata() or {})["precision"] == "fp32"  # never run under autocast
    with safe_open(folder / "gradcam_layer4.1.bn1.safetensors", "pt") as stored:
        assert (stored.metadata() or {})["precision"] == "bfloat16"
    [gallery] = folder.glob("*.png")
    assert len(gallery.stem) <= 120 and gallery.stem.startswith("guided-backprop,gradcam_layer1.0.conv1,")
    assert json.loads(gallery.with_suffix(".json").read_text())["layers"] == sorted(layers)


def test_a_failed_write_leaves_every_earlier_gradcam_file_as_it_was(
    runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk error on the second of the files a call writes (the gallery, after the maps): the
    maps, gallery and its JSON all keep the earlier call's results, never a mix of the two."""
    where = ["--run", "tiny", "--runs-dir", str(runs), "--count", "4"]
    cifarcam("gradcam", *where, "--target", "pred")
    before = snapshot(runs / "tiny" / "gradcam")
    disk_full_at_fsync(2, monkeypatch)
    result = runner.invoke(app, ["gradcam", *where, "--target", "true"])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0] == "Error: No space left on device"
    assert snapshot(runs / "tiny" / "gradcam") == before
    assert not list((runs / "tiny").rglob("*.tmp"))


def test_two_gradcams_at_once_both_keep_their_faithfulness_rows(runs: Path) -> None:
    """Each merges into the faithfulness table in turn: neither call's rows are lost to the
    other's write (without the turn, the later writer dropped the earlier one's)."""
    import os
    import subprocess
    import sys

    def start(target: str) -> subprocess.Popen[str]:
        args = ["gradcam", "--run", "tiny", "--runs-dir", str(runs), "--count", "4", "--device", "cpu"]
        args += ["--target", target, "--metrics", "--steps", "4"]
        return subprocess.Popen(
            [sys.executable, "-m", "cifarcam", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
        )

    both = [start("class3"), start("class4")]
    for process in both:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    table = json.loads((runs / "tiny" / "gradcam" / "metrics.json").read_text())
    assert {row["target"] for row in table["results"]} == {"class:class3", "class:class4"}
