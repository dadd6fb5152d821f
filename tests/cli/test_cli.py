"""The CLI's contract: help everywhere, exact error lines, documented exit codes, no tracebacks."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_tree, invoke, tiny_train_args

COMMANDS = ["train", "evaluate", "misclassified", "gradcam", "sanity", "plot", "report", "predict", "app"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example: cifarcam " + command in result.output
    assert "--run" in result.output


def test_compare_help_has_an_example() -> None:
    result = invoke("compare", "--help")
    assert result.exit_code == 0
    assert "Example: cifarcam compare r1 r2" in result.output and "--out" in result.output


def test_root_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert all(command in result.output for command in [*COMMANDS, "compare"])


@pytest.mark.parametrize("command", ["evaluate", "misclassified", "gradcam", "sanity", "plot", "report"])
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


def test_plot_report_and_compare_run_without_importing_torch(trained_runs: Path, tmp_path: Path) -> None:
    """They only read a run's files: they answer in about a second, not after torch's import."""
    runs = copy_tree(trained_runs, tmp_path / "runs")
    copy_tree(runs / "tiny", runs / "tiny2")
    commands = [["plot", "--run", "tiny"], ["report", "--run", "tiny"], ["compare", "tiny", "tiny2"]]
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cifarcam.cli import app\n"
        f"for args in {commands!r}:\n"
        f"    result = CliRunner().invoke(app, [*args, '--runs-dir', {str(runs)!r}])\n"
        "    assert result.exit_code == 0, result.output\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'torch')[:3])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    for name in ("loss.png", "accuracy.png"):
        assert (runs / "tiny" / "plots" / name).stat().st_size > 10_000
    assert (runs / "tiny" / "report.html").stat().st_size > 10_000
    assert (runs / "compare.html").stat().st_size > 1_000


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("cifarcam ")


def test_a_run_whose_test_images_were_replaced_is_not_scored_on_them(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    """Same classes, same file names, other pixels: evaluate refuses instead of overwriting the
    run's results with scores on other data."""
    import cv2

    tree = copy_tree(synthetic_tree, tmp_path / "tree")
    runs = tmp_path / "runs"
    assert invoke(*tiny_train_args(runs, tree, epochs=1)).exit_code == 0
    assert invoke("evaluate", "--run", "r", "--runs-dir", str(runs)).exit_code == 0
    evaluation = (runs / "r" / "evaluation.json").read_bytes()
    image = sorted((tree / "test" / "class0").iterdir())[0]
    cv2.imwrite(str(image), 255 - cv2.imread(str(image)))
    result = invoke("evaluate", "--run", "r", "--runs-dir", str(runs))
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: the test images at '{tree}' have changed since run 'r' was trained"
    )
    assert (runs / "r" / "evaluation.json").read_bytes() == evaluation


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["train", "--run", "x", "--epochs", "abc"], "Error: Invalid value for '--epochs': "),
        (["train", "--bogus"], "Error: No such option: --bogus"),
        (["evaluate"], "Error: Missing option '--run'."),
    ],
    ids=["not a number", "unknown option", "missing option"],
)
def test_a_mistyped_option_is_one_line_and_exit_2(args: list[str], line: str) -> None:
    """Through the installed entry point (CliRunner would bypass it): not the boxed usage text."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "cifarcam", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    first, hint = result.stderr.splitlines()
    assert first.startswith(line), result.stderr
    assert hint == f"Hint: see 'cifarcam {args[0]} --help'"


def test_cifarcam_alone_prints_its_help() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "cifarcam"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Usage: cifarcam [OPTIONS] COMMAND" in result.stdout and result.stdout.count("Usage:") == 1
