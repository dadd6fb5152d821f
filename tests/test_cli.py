"""The CLI's contract: help everywhere, exact error lines, documented exit codes, no tracebacks."""

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import copy_tree, snapshot, tiny_train_args
from typer.testing import CliRunner

from cifarcam.cli import app
from cifarcam.runs.rundir import RunDir

runner = CliRunner()
COMMANDS = ["train", "evaluate", "misclassified", "gradcam", "sanity", "plot", "report", "predict", "app"]


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def test_train_has_an_option_for_every_config_field_with_its_default() -> None:
    """`train`'s options are made from TrainConfig: one per scalar field, with the field's
    description as help and its default shown."""
    import typer.main

    from cifarcam.config import TrainConfig

    params = {param.name: param for param in typer.main.get_command(app).commands["train"].params}  # type: ignore[attr-defined]
    shown_as = {"data_dir": "$CIFARCAM_DATA_DIR or ~/.cache/cifarcam", "subset": "all", "epoch_images": "all"}
    for name, field in TrainConfig.model_fields.items():
        if name in ("augment", "albumentations"):  # nested settings: config files only
            assert name not in params
            continue
        option = name.replace("_", "-")
        expected = shown_as.get(name, str(field.default))
        if isinstance(field.default, bool):  # an on/off flag shows the name of the default side
            expected = option if field.default else f"no-{option}"
        assert params[name].show_default == expected, name
        assert params[name].help == field.description, name


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


def test_best_checkpoint_with_val_split_and_evaluate_output(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    result = invoke("evaluate", "--run", "tiny", "--runs-dir", str(runs), "--checkpoint", "best")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((runs / "tiny" / "evaluation.json").read_text())
    assert evaluation["checkpoint"] == "best"
    assert f"Test accuracy {evaluation['accuracy']:.2%}" in result.stdout
    metrics = json.loads((runs / "tiny" / "metrics.json").read_text())["epochs"]
    assert all("val_acc" in record and "val_loss" in record for record in metrics)


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


def test_resume_of_a_finished_run_changes_nothing(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    before = (runs / "tiny" / "metrics.json").read_text()
    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--resume")
    assert result.exit_code == 0, result.output
    assert "Finished: test accuracy" in result.stdout
    assert (runs / "tiny" / "metrics.json").read_text() == before
    assert json.loads((runs / "tiny" / "meta.json").read_text())["status"] == "finished"


def test_resume_writes_the_final_epochs_files_when_a_kill_left_them_behind(
    trained_runs: Path, tmp_path: Path
) -> None:
    """Killed after the last epoch's training state was saved, before its checkpoint and
    metrics.json: the state says finished, the files derived from it are an epoch behind."""
    import torch

    from cifarcam.models.resnet import build_model

    runs = copy_tree(trained_runs, tmp_path / "runs")
    run = RunDir(runs, "tiny")
    metrics = run.metrics_path.read_text()
    model, info = run.load_model("last")
    header = {
        "model": info.model,
        "width": info.width,
        "norm": info.norm,
        "num_classes": info.num_classes,
        "classes": info.classes,
        "mean": list(info.mean),
        "std": list(info.std),
    }
    run.save_checkpoint("last", build_model("resnet18", 8), header | {"epoch": 1})
    run.write_json(run.metrics_path, {"epochs": json.loads(metrics)["epochs"][:1]})

    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--resume")
    assert result.exit_code == 0, result.output
    assert "all 2 epochs trained: writing the last epoch's files again" in result.stdout
    assert run.metrics_path.read_text() == metrics
    restored, restored_info = run.load_model("last")
    assert restored_info.epoch == 2
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in restored.state_dict().items())
    assert json.loads(run.meta_path.read_text())["status"] == "finished"


def test_resume_writes_a_deleted_last_checkpoint_of_a_finished_run_again(
    trained_runs: Path, tmp_path: Path
) -> None:
    import torch

    runs = copy_tree(trained_runs, tmp_path / "runs")
    run = RunDir(runs, "tiny")
    model, _ = run.load_model("last")
    run.checkpoint_path("last").unlink()
    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--resume")
    assert result.exit_code == 0, result.output
    assert "writing the last epoch's files again" in result.stdout
    restored, info = run.load_model("last")
    assert info.epoch == 2
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in restored.state_dict().items())


def test_a_stop_asked_while_the_data_loads_leaves_the_run_to_overwrite_alone(
    trained_runs: Path, tmp_path: Path
) -> None:
    """Ctrl-C lands while `train --overwrite` loads the data: the earlier run must survive."""
    import signal

    from cifarcam.errors import TrainingInterrupted
    from cifarcam.evaluation.loading import read_config
    from cifarcam.training.run import StopSignal, train

    runs = copy_tree(trained_runs, tmp_path / "runs")
    files = {p: p.read_bytes() for p in sorted((runs / "tiny").rglob("*")) if p.is_file()}
    stop = StopSignal()
    stop.signal = signal.SIGINT
    run = RunDir(runs, "tiny")
    with pytest.raises(TrainingInterrupted) as caught:
        train(read_config(run), run, overwrite=True, stop=stop)
    assert caught.value.exit_code == 130
    assert caught.value.message == "interrupted by SIGINT before training started; run 'tiny' was not changed"
    assert {p: p.read_bytes() for p in sorted((runs / "tiny").rglob("*")) if p.is_file()} == files


def test_resume_refuses_data_that_changed_since_the_run_started(
    trained_runs: Path, tmp_path: Path, synthetic_tree: Path
) -> None:
    import cv2
    import numpy as np

    runs = copy_tree(trained_runs, tmp_path / "runs")
    tree = copy_tree(synthetic_tree, tmp_path / "tree")
    config_path = runs / "tiny" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"epochs": 3, "data": str(tree)}))  # one more to go
    run = RunDir(runs, "tiny")
    state = run.load_state()
    assert state is not None
    state[1]["config"]["epochs"] = 3  # as if it had been started for 3 epochs and stopped after 2
    run.save_state(*state)
    for split in ("train", "test"):  # an eleventh class, big enough for the validation split
        (tree / split / "zzz").mkdir()
        for index in range(12):
            cv2.imwrite(str(tree / split / "zzz" / f"{index}.png"), np.full((32, 32, 3), index, np.uint8))
    files = {p: p.read_bytes() for p in sorted((runs / "tiny").rglob("*")) if p.is_file()}
    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--resume")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(
        f"Error: the data at '{tree}' has changed since run 'tiny' started: classes ["
    ), result.stderr
    assert {p: p.read_bytes() for p in sorted((runs / "tiny").rglob("*")) if p.is_file()} == files
    # The state itself records the data it was trained on: without meta.json, the same refusal.
    (runs / "tiny" / "meta.json").unlink()
    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--resume")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(
        f"Error: the data at '{tree}' has changed since run 'tiny' started: classes ["
    )


def test_resume_refuses_an_edited_config_before_loading_the_data(trained_runs: Path, tmp_path: Path) -> None:
    """The config check reads the state file's header, so it needs no data: with the data folder
    gone, an edited width is still what the refusal names (before, the missing data was)."""
    runs = copy_tree(trained_runs, tmp_path / "runs")
    run = RunDir(runs, "tiny")
    config = json.loads(run.config_path.read_text())
    run.config_path.write_text(json.dumps(config | {"width": 16, "data": str(tmp_path / "gone")}))
    saved = run.read_state_meta()
    assert saved is not None and saved["config"]["width"] == 8 and saved["epoch"] == 2
    files = snapshot(runs / "tiny")
    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--resume")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(
        "Error: run 'tiny' config.json has changed since its training state was saved: width 8 then, 16 now"
    ), result.stderr
    assert snapshot(runs / "tiny") == files
    # a state file that is not one is left to the full load, which names it after the data load
    for header in (b"not a header", b"[]", b"null", b"[" * 100_000, b'{"__metadata__": 5}'):
        run.state_path.write_bytes(len(header).to_bytes(8, "little") + header)
        assert run.read_state_meta() is None, header
    for data in (b"\xff" * 8 + b"{}", b"\x05\x00"):  # a huge length; a truncated one
        run.state_path.write_bytes(data)
        assert run.read_state_meta() is None, data
    run.state_path.write_bytes((2).to_bytes(8, "little") + b"[]")
    run.config_path.write_text(json.dumps(config | {"epochs": 3}))
    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--resume")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: training state '{run.state_path}' is corrupt or truncated")


def test_resume_refuses_other_images_of_the_same_classes_and_counts(
    trained_runs: Path, tmp_path: Path
) -> None:
    from conftest import write_image_folder

    from cifarcam.data.datasets import synthetic_dataset

    runs = copy_tree(trained_runs, tmp_path / "runs")
    run = RunDir(runs, "tiny")
    other = write_image_folder(synthetic_dataset(400, 200, seed=4), tmp_path / "other")  # trained on seed 3
    run.config_path.write_text(
        json.dumps(json.loads(run.config_path.read_text()) | {"epochs": 3, "data": str(other)})
    )
    state = run.load_state()
    assert state is not None
    state[1]["config"]["epochs"] = 3  # as if it had been started for 3 epochs and stopped after 2
    run.save_state(*state)
    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--resume")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(
        f"Error: the data at '{other}' has changed since run 'tiny' started: training images' digest "
    ), result.stderr


def test_first_signal_asks_to_stop_and_a_second_stops_at_once() -> None:
    import os
    import signal

    from cifarcam.cli.train import _stop_on_signals

    # What was there before (SIG_IGN, not Python's handler, when started in the background).
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with _stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM and stop.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored


def test_a_forked_worker_leaves_the_signals_to_its_parent(capfd: pytest.CaptureFixture[str]) -> None:
    """albumentations' DataLoader workers are forked inside the handler: a Ctrl-C reaches them
    too, and only the training process may announce the stop or stop at once."""
    import os
    import signal

    from cifarcam.cli.train import _stop_on_signals

    with _stop_on_signals() as stop:
        child = os.fork()
        if child == 0:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # a second one would stop at once
                os._exit(0 if stop.signal is None else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "Stopping" not in capfd.readouterr().err


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_second_signal_exits_with_its_own_code(sig: str, code: int) -> None:
    import os
    import signal

    import typer

    from cifarcam.cli.base import user_errors
    from cifarcam.cli.train import _stop_on_signals

    number = getattr(signal, sig)
    with pytest.raises(typer.Exit) as caught, user_errors(), _stop_on_signals():
        os.kill(os.getpid(), number)  # the first asks to stop after the step
        os.kill(os.getpid(), number)  # the second stops at once
    assert caught.value.exit_code == code


@pytest.mark.parametrize(("signal_name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_immediate_stop_marks_the_run_interrupted_and_keeps_the_last_epoch(
    tmp_path: Path, synthetic_tree: Path, monkeypatch: pytest.MonkeyPatch, signal_name: str, code: int
) -> None:
    import signal

    import cifarcam.cli.train as cli
    from cifarcam.errors import StoppedAtOnce

    real = cli._training_progress

    @contextmanager
    def progress_that_is_interrupted(shown: bool = True):  # a second signal arriving right after epoch 1
        with real(shown) as callbacks:

            def on_epoch(record: dict) -> None:
                raise StoppedAtOnce(signal.Signals[signal_name])

            callbacks.on_epoch = on_epoch
            yield callbacks

    monkeypatch.setattr(cli, "_training_progress", progress_that_is_interrupted)
    runs = tmp_path / "runs"
    result = invoke(*tiny_train_args(runs, synthetic_tree, epochs=3))
    assert result.exit_code == code
    assert result.stderr.splitlines() == [
        f"Error: stopped at once by a second {signal_name}; the last saved training state is kept",
        "Hint: resume with 'cifarcam train --run r --resume'",
    ]
    meta = json.loads((runs / "r" / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["completed_epochs"] == 1
    monkeypatch.setattr(cli, "_training_progress", real)
    resumed = invoke("train", "--run", "r", "--runs-dir", str(runs), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [e["epoch"] for e in json.loads((runs / "r" / "metrics.json").read_text())["epochs"]] == [1, 2, 3]


def test_a_stop_at_once_before_the_first_epoch_does_not_suggest_resuming(
    tmp_path: Path, synthetic_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    import cifarcam.training.run
    from cifarcam.errors import StoppedAtOnce

    def load_interrupted(*_args: object) -> None:  # a second Ctrl-C while the data loads
        raise StoppedAtOnce(signal.SIGINT)

    monkeypatch.setattr(cifarcam.training.run, "load_dataset", load_interrupted)
    result = invoke(*tiny_train_args(tmp_path / "runs", synthetic_tree, epochs=3))
    assert result.exit_code == 130
    assert result.stderr.splitlines() == ["Error: stopped at once by a second SIGINT; no epoch was saved"]


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


def test_label_smoothing_and_compile_options_reach_the_saved_config(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    common = ["--runs-dir", str(runs), "--data", str(synthetic_tree), "--data-dir", str(tmp_path / "cache")]
    common += ["--epochs", "1", "--width", "4", "--subset", "40", "--device", "cpu"]
    assert invoke("train", "--run", "a", *common, "--label-smoothing", "0.25", "--no-compile").exit_code == 0
    config = json.loads((runs / "a" / "config.json").read_text())
    assert (config["label_smoothing"], config["compile"]) == (0.25, False)
    assert invoke("train", "--run", "b", *common).exit_code == 0
    config = json.loads((runs / "b" / "config.json").read_text())
    assert (config["label_smoothing"], config["compile"]) == (0.1, False)


def test_epoch_images_option_sets_the_steps_of_an_epoch(synthetic_tree: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"

    def optimizer_steps(run: str, epochs: int, epoch_images: str) -> int:
        result = invoke(*tiny_train_args(runs, synthetic_tree, run, epochs), "--epoch-images", epoch_images)
        assert result.exit_code == 0, result.output
        saved = RunDir(runs, run).load_state()
        assert saved is not None
        return int(saved[1]["scheduler"]["last_epoch"])

    # Batches of 100: 3 steps an epoch (100, 100, 50 images), so 6 in two epochs.
    assert optimizer_steps("short", 2, "250") == 6
    assert json.loads((runs / "short" / "config.json").read_text())["epoch_images"] == 250
    # More images than the training set's 400: each epoch is the whole set, once.
    assert optimizer_steps("long", 1, "900") == 4


def test_training_start_line_names_the_epoch_length(synthetic_tree: Path, tmp_path: Path) -> None:
    result = invoke(*tiny_train_args(tmp_path / "runs", synthetic_tree, epochs=1), "--epoch-images", "250")
    assert "400 training images (250 per epoch)" in result.stdout


def test_repeated_presets_and_config_files_apply_in_order(runs_dir: Path, synthetic_tree: Path) -> None:
    first, second = runs_dir.parent / "first.json", runs_dir.parent / "second.json"
    first.write_text(json.dumps({"batch_size": 16, "epochs": 1, "augment": {"cutout": 4}}))
    second.write_text(json.dumps({"epochs": 2, "workers": 0, "augment": {"translate": 1}}))
    args = [
        "train",
        "--run",
        "q",
        "--runs-dir",
        str(runs_dir),
        "--data",
        str(synthetic_tree),
        "--epochs",
        "1",
    ]
    args += ["--preset", "quick", "--preset", "seed-albumentations", "--config", str(first)]
    result = invoke(*args, "--config", str(second), "--width", "4", "--device", "cpu", "--subset", "40")
    assert result.exit_code == 0, result.output
    saved = json.loads((runs_dir / "q" / "config.json").read_text())
    assert saved["decay_norm_and_bias"] is False and saved["albumentations"] is not None  # both presets
    assert saved["batch_size"] == 16 and saved["workers"] == 0  # both files
    assert saved["augment"] == {"flip": True, "translate": 1, "cutout": 4}  # the second file last
    assert saved["epochs"] == 1  # the option over everything


def test_a_null_in_the_config_file_unsets_the_presets_value(runs_dir: Path, synthetic_tree: Path) -> None:
    config = runs_dir.parent / "c.json"
    config.write_text(json.dumps({"epoch_images": None, "epochs": 1, "augment": {"cutout": 4}}))
    args = ["train", "--run", "q", "--runs-dir", str(runs_dir), "--data", str(synthetic_tree)]
    result = invoke(*args, "--preset", "quick", "--config", str(config), "--width", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    saved = json.loads((runs_dir / "q" / "config.json").read_text())
    assert saved["epoch_images"] is None and saved["epochs"] == 1  # the preset says 25,000
    assert saved["augment"] == {"flip": True, "translate": 2, "cutout": 4}  # the rest: the preset's
    assert saved["batch_size"] == 256 and saved["width"] == 4
    assert json.loads((runs_dir / "q" / "meta.json").read_text())["train_images"] == 400


def test_a_learning_rate_that_diverges_fails_the_run_with_one_line(
    runs_dir: Path, synthetic_tree: Path
) -> None:
    """In bf16 the training loss stays finite while the scored model's test loss is NaN after
    epoch 1; with other arithmetic the training loss may go first. Exit 1 either way, and no
    epoch of NaN metrics is saved."""
    result = invoke(*tiny_train_args(runs_dir, synthetic_tree), "--lr", "100")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: training diverged: ")
    meta = json.loads((runs_dir / "r" / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"].startswith("training diverged: ")
    metrics = runs_dir / "r" / "metrics.json"
    assert not metrics.exists() or "NaN" not in metrics.read_text()


def test_resume_of_a_finished_run_without_its_state_has_nothing_to_do(
    trained_runs: Path, tmp_path: Path
) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    (runs / "tiny" / "checkpoints" / "state.safetensors").unlink()
    files = {p: p.read_bytes() for p in sorted((runs / "tiny").rglob("*")) if p.is_file()}
    result = invoke("train", "--run", "tiny", "--runs-dir", str(runs), "--resume")
    assert result.exit_code == 0, result.output
    last = json.loads((runs / "tiny" / "metrics.json").read_text())["epochs"][-1]
    assert f"Finished: test accuracy {last['test_acc']:.2%}" in result.stdout
    assert {p: p.read_bytes() for p in sorted((runs / "tiny").rglob("*")) if p.is_file()} == files


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_train_notes_emulated_bf16_on_a_cpu_without_it(
    precision: str, tmp_path: Path, synthetic_tree: Path
) -> None:
    """Asked for bf16 on a CPU without AVX512-bf16 or AMX, train says it is emulated (slow)."""
    from cifarcam.devices import cpu_supports_bf16

    args = [*tiny_train_args(tmp_path / "runs", synthetic_tree, epochs=1), "--subset", "100"]
    result = invoke(*args, "--precision", precision)
    assert result.exit_code == 0, result.output
    noted = "bf16 is emulated and slower than fp32" in result.output
    assert noted == (precision == "bf16" and not cpu_supports_bf16())


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
