"""`cifarcam train`: options made from the config, presets and config files, stopping on
SIGINT/SIGTERM, divergence."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import copy_tree, invoke, tiny_train_args

from cifarcam.cli import app
from cifarcam.config import TrainConfig
from cifarcam.runs.rundir import RunDir


def test_train_has_an_option_for_every_config_field_with_its_default() -> None:
    """`train`'s options are made from TrainConfig: one per scalar field, with the field's
    description as help and its default shown."""
    import typer.main

    from cifarcam.config import TrainConfig

    params = {param.name: param for param in typer.main.get_command(app).commands["train"].params}  # type: ignore[attr-defined]
    shown_as = {
        "data_dir": "$CIFARCAM_DATA_DIR or ~/.cache/cifarcam",
        "subset": "all",
        "epoch_images": "all",
        "batch_size": "sized to the run",
        "lr": "sized to the run",
    }
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


def test_print_config_round_trips_through_a_yaml_file(tmp_path: Path) -> None:
    """The printed configuration, saved and passed back, resolves to the same configuration."""
    result = invoke("train", "--print-config", "--preset", "quick", "--epochs", "3", "--no-nesterov")
    assert result.exit_code == 0, result.output
    printed = result.stdout
    values = yaml.safe_load(printed)
    assert values["width"] == 16 and values["epochs"] == 3 and values["nesterov"] is False
    assert values["batch_size"] == 256 and values["augment"] == {"flip": True, "translate": 2, "cutout": 0}
    assert list(values) == list(TrainConfig.model_fields)  # every field, in the documented order
    saved = tmp_path / "c.yaml"
    saved.write_text(printed)
    again = invoke("train", "--print-config", "--config", str(saved))
    assert again.exit_code == 0 and again.stdout == printed


def test_print_config_names_a_wrong_field_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("width: wide\n")
    result = invoke("train", "--print-config", "--config", str(path))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "Error: invalid value for 'width': Input should be a valid integer, unable to parse string as an "
        "integer (got 'wide')"
    ]


def test_train_without_run_names_the_missing_option() -> None:
    result = invoke("train", "--epochs", "1")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == "Error: Missing option '--run'."


def test_resume_accepts_the_options_the_run_was_started_with(synthetic_tree: Path, tmp_path: Path) -> None:
    """The shell's up-arrow: the command that trained the run, with --resume appended."""
    runs = tmp_path / "runs"
    args = tiny_train_args(runs, synthetic_tree, epochs=2)
    assert invoke(*args).exit_code == 0
    trained = (runs / "r" / "checkpoints" / "last.safetensors").read_bytes()
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "Finished: test accuracy" in result.output  # nothing left to train: its results stand
    assert (runs / "r" / "checkpoints" / "last.safetensors").read_bytes() == trained
    refused = invoke(*args, "--resume", "--width", "8", "--lr", "0.1")
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[0] == (
        "Error: --resume continues with the run's own config; these differ from it: --width 8 (the run "
        "has --width 4); --lr 0.1 (the run has --lr 0.078125)"
    )


def test_metrics_csv_holds_the_rows_of_metrics_json(trained_runs: Path) -> None:
    run = trained_runs / "tiny"
    epochs = json.loads((run / "metrics.json").read_text())["epochs"]
    with (run / "metrics.csv").open(newline="") as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == len(epochs) == 2
    for row, record in zip(rows, epochs, strict=True):
        assert list(row) == list(record)
        assert {key: float(value) for key, value in row.items()} == pytest.approx(record, rel=1e-12)


def test_best_checkpoint_with_val_split_and_evaluate_output(trained_runs: Path, tmp_path: Path) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    result = invoke("evaluate", "--run", "tiny", "--runs-dir", str(runs), "--checkpoint", "best")
    assert result.exit_code == 0, result.output
    evaluation = json.loads((runs / "tiny" / "evaluation.json").read_text())
    assert evaluation["checkpoint"] == "best"
    assert f"Test accuracy {evaluation['accuracy']:.2%}" in result.stdout
    metrics = json.loads((runs / "tiny" / "metrics.json").read_text())["epochs"]
    assert all("val_acc" in record and "val_loss" in record for record in metrics)


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


def test_options_reach_the_saved_config(synthetic_tree: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    common = ["--runs-dir", str(runs), "--data", str(synthetic_tree), "--data-dir", str(tmp_path / "cache")]
    common += ["--epochs", "1", "--width", "4", "--subset", "40", "--device", "cpu"]
    given = ["--label-smoothing", "0.25", "--no-cuda-graphs"]
    assert invoke("train", "--run", "a", *common, *given).exit_code == 0
    config = json.loads((runs / "a" / "config.json").read_text())
    assert (config["label_smoothing"], config["cuda_graphs"]) == (0.25, False)
    assert invoke("train", "--run", "b", *common).exit_code == 0
    config = json.loads((runs / "b" / "config.json").read_text())
    assert (config["label_smoothing"], config["cuda_graphs"]) == (0.1, True)


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


def test_the_help_example_learns(cifar_tree: Path, tmp_path: Path) -> None:
    """`train --help`'s example: 2 epochs of 2,000 images at width 16. Left unset, the batch size
    and learning rate are sized to its 64 steps, and it trains far beyond chance (10%; 10,000
    test images put a chance run within a point of it), to a plausible test loss (chance: 2.3)."""
    runs = tmp_path / "runs"
    args = ["--subset", "2000", "--width", "16", "--epochs", "2", "--device", "cpu"]
    result = invoke("train", "--run", "r1", "--runs-dir", str(runs), "--data", str(cifar_tree), *args)
    assert result.exit_code == 0, result.output
    assert "Batch size 64 and peak lr 0.05 for a run of 64 steps" in result.stdout
    config = json.loads((runs / "r1" / "config.json").read_text())
    assert (config["batch_size"], config["lr"]) == (64, 0.05)  # resume continues with them
    last = json.loads((runs / "r1" / "metrics.json").read_text())["epochs"][-1]
    assert last["test_acc"] >= 0.2 and last["test_loss"] < 2.1
