"""The CLI's contract: help everywhere, exact error lines, documented exit codes, no tracebacks."""

import json
from pathlib import Path

import pytest
import torch
from conftest import copy_tree
from typer.testing import CliRunner

from cifarcam.cli import app

runner = CliRunner()
COMMANDS = ["train", "evaluate", "misclassified", "gradcam", "plot"]


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example: cifarcam " + command in result.output
    assert "--run" in result.output


def test_root_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert all(command in result.output for command in COMMANDS)


@pytest.mark.parametrize("command", ["evaluate", "misclassified", "gradcam", "plot"])
def test_missing_run_is_one_error_line_exit_1(command: str, runs_dir: Path) -> None:
    result = invoke(command, "--run", "nope", "--runs-dir", str(runs_dir))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: run 'nope' does not exist in '{runs_dir}'",
        "Hint: run 'cifarcam train --run nope' first",
    ]


def test_gradcam_without_checkpoint_names_the_missing_step(runs_dir: Path) -> None:
    (runs_dir / "r1").mkdir()
    result = invoke("gradcam", "--run", "r1", "--runs-dir", str(runs_dir))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: run 'r1' has no checkpoint",
        "Hint: run 'cifarcam train --run r1' first",
    ]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--epochs", "0"],
            "Error: invalid value for 'epochs': Input should be greater than or equal to 1 (got 0)",
        ),
        (["--lr", "-1"], "Error: invalid value for 'lr': Input should be greater than 0 (got -1.0)"),
        (
            ["--model", "vgg16"],
            "Error: invalid value for 'model': Input should be 'resnet18' or 'resnet34' (got 'vgg16')",
        ),
        (
            ["--device", "tpu"],
            "Error: invalid value for 'device': Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')",
        ),
        (
            ["--run", "../escape"],
            "Error: invalid run name '../escape': use letters, digits, '.', '_' and '-' (starting with a letter or digit, no '..', at most 100 characters)",
        ),
    ],
)
def test_bad_training_options_exit_2_and_write_nothing(runs_dir: Path, args: list[str], line: str) -> None:
    base = ["train", "--run", "r1", "--runs-dir", str(runs_dir), "--data", "/nonexistent"]
    if args[0] == "--run":
        base[2] = args[1]
        args = []
    result = invoke(*base, *args)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == line
    assert list(runs_dir.iterdir()) == []


def test_unknown_key_in_config_file(runs_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"epochs": 2, "optimiser": "adam"}))
    result = invoke("train", "--run", "r1", "--runs-dir", str(runs_dir), "--config", str(config))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["Error: unknown config field 'optimiser'"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_without_gpu(runs_dir: Path, synthetic_tree: Path) -> None:
    result = invoke(
        "train", "--run", "r1", "--runs-dir", str(runs_dir), "--data", str(synthetic_tree), "--device", "cuda"
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["Error: --device cuda was asked for, but no CUDA GPU is available"]


def test_missing_data_folder(runs_dir: Path) -> None:
    result = invoke("train", "--run", "r1", "--runs-dir", str(runs_dir), "--data", "/nonexistent/cifar")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["Error: data folder '/nonexistent/cifar' does not exist"]
    assert list(runs_dir.iterdir()) == []


def test_subset_larger_than_data(runs_dir: Path, synthetic_tree: Path) -> None:
    result = invoke(
        "train", "--run", "r1", "--runs-dir", str(runs_dir), "--data", str(synthetic_tree), "--subset", "5000"
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["Error: --subset 5000 is larger than the 400 training images"]


def test_finished_run_is_not_retrained_without_overwrite(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    before = (runs / "tiny" / "checkpoints" / "last.safetensors").read_bytes()
    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--data", "/nonexistent")
    assert result.exit_code == 1  # the data check comes first, the run is untouched either way
    config = json.loads((runs / "tiny" / "config.json").read_text())
    result = invoke(
        "train",
        "--run",
        "tiny",
        "--runs-dir",
        str(runs),
        "--data",
        config["data"],
        "--data-dir",
        config["data_dir"],
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: run 'tiny' already has a training (status: finished)",
        "Hint: pass --overwrite to replace it, or choose another --run name",
    ]
    assert (runs / "tiny" / "checkpoints" / "last.safetensors").read_bytes() == before


def test_unknown_layer_lists_the_top_level_names(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    result = invoke("gradcam", "--run", "tiny", "--runs-dir", str(runs), "--layer", "layer5")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == (
        "Error: unknown layer 'layer5'; top-level layers are: conv1, bn1, layer1, layer2, layer3, "
        "layer4, linear (dotted names like layer4.1.conv2 reach inside them)"
    )
    assert not (runs / "tiny" / "gradcam").exists()


def test_count_larger_than_the_mistakes(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    result = invoke("misclassified", "--run", "tiny", "--runs-dir", str(runs), "--count", "100000")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: only ")
    assert "test images are misclassified; ask for --count" in result.stderr


def test_best_checkpoint_with_val_split_and_evaluate_output(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    result = invoke("evaluate", "--run", "tiny", "--runs-dir", str(runs), "--checkpoint", "best")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((runs / "tiny" / "evaluation.json").read_text())
    assert evaluation["checkpoint"] == "best"
    assert f"Test accuracy {evaluation['accuracy']:.2%}" in result.stdout
    metrics = json.loads((runs / "tiny" / "metrics.json").read_text())["epochs"]
    assert all("val_acc" in record and "val_loss" in record for record in metrics)


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("cifarcam ")
