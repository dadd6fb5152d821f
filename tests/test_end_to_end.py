"""The whole chain as a user runs it: five `python -m cifarcam` processes over one run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from safetensors.torch import load_file


def cifarcam(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "cifarcam", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def png_shape(path: Path) -> tuple[int, ...]:
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not an image"
    return image.shape


def test_train_evaluate_misclassified_gradcam_plot(cifar_tree: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    env = os.environ | {"CIFARCAM_DATA_DIR": str(tmp_path / "cache"), "CIFARCAM_RUNS_DIR": str(runs)}
    train = cifarcam(
        "train",
        "--run",
        "r1",
        "--data",
        str(cifar_tree),
        "--subset",
        "2000",
        "--width",
        "16",
        "--epochs",
        "2",
        "--batch-size",  # 8 steps at a large lr: without the shared data, the synthetic stand-in
        "512",  # must still leave test images misclassified
        "--lr",
        "0.4",
        "--device",
        "cpu",
        env=env,
    )
    assert "epoch   2/2" in train.stdout
    cifarcam("evaluate", "--run", "r1", env=env)
    cifarcam("misclassified", "--run", "r1", env=env)
    cifarcam("gradcam", "--run", "r1", "--layer", "layer3", env=env)
    cifarcam("plot", "--run", "r1", env=env)
    run = runs / "r1"

    config = json.loads((run / "config.json").read_text())
    assert (config["subset"], config["width"], config["epochs"], config["data"]) == (
        2000,
        16,
        2,
        str(cifar_tree),
    )

    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["completed_epochs"] == 2
    assert meta["train_images"] == 2000
    for field in ("started_at", "ended_at", "cifarcam_version", "torch_version", "device", "command"):
        assert meta[field]

    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for record in epochs:
        assert {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s"} <= set(
            record
        )
        assert 0 <= record["test_acc"] <= 1 and record["train_loss"] > 0

    evaluation = json.loads((run / "evaluation.json").read_text())
    matrix = evaluation["confusion_matrix"]
    assert evaluation["num_images"] == sum(map(sum, matrix)) == meta["test_images"]
    assert evaluation["accuracy"] == pytest.approx(
        sum(matrix[i][i] for i in range(10)) / evaluation["num_images"]
    )
    # The same checkpoint scored by `train` at its last epoch and by `evaluate` must agree.
    assert evaluation["accuracy"] == pytest.approx(epochs[-1]["test_acc"], abs=2e-3)
    assert evaluation["loss"] == pytest.approx(epochs[-1]["test_loss"], rel=1e-2)
    assert len(evaluation["per_class_accuracy"]) == 10
    assert 0 <= evaluation["accuracy_tta"] <= 1 and evaluation["loss_tta"] > 0

    mistakes = json.loads((run / "misclassified.json").read_text())
    assert len(mistakes) == 10
    assert all(m["true"] != m["pred"] for m in mistakes)
    confidences = [m["confidence"] for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)

    maps = load_file(run / "gradcam" / "gradcam_layer3.safetensors")
    assert maps["maps_pred"].shape == maps["maps_true"].shape == (10, 32, 32)
    assert maps["indices"].tolist() == [m["index"] for m in mistakes]
    assert maps["maps_pred"].min() >= 0 and maps["maps_pred"].max() <= 1
    cam_meta = json.loads((run / "gradcam" / "gradcam_layer3.json").read_text())
    assert cam_meta["layers"] == ["layer3"] and cam_meta["methods"] == ["gradcam"]
    assert cam_meta["indices"] == maps["indices"].tolist()

    height, width, _ = png_shape(run / "misclassified.png")
    assert height > 200 and width > 400
    height, width, _ = png_shape(run / "gradcam" / "gradcam_layer3.png")
    assert height > 10 * 100 and width > 300  # ten rows of three tiles
    for name in ("loss.png", "accuracy.png"):
        height, width, _ = png_shape(run / "plots" / name)
        assert height > 200 and width > 300

    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert (run / "checkpoints" / "last.safetensors").exists()
    assert not (run / "checkpoints" / "best.safetensors").exists()  # only with --val-split
