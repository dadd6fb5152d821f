"""The run's TensorBoard log, read back with TensorBoard's own event reader: the per-epoch
scalars equal metrics.json, also across an interruption and `--resume`; the config, hparams and
galleries are there; without the tensorboard package training says so once and goes on."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from conftest import copy_tree, invoke, tiny_train_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarcam.config import build_config
from cifarcam.errors import TrainingInterrupted
from cifarcam.runs.rundir import RunDir
from cifarcam.runs.tensorboard import SCALARS
from cifarcam.training.loop import StopSignal, TrainCallbacks
from cifarcam.training.run import resume, train


def read_log(run: Path) -> EventAccumulator:
    log = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    log.Reload()
    return log


def test_the_log_holds_every_epoch_once_equal_to_metrics_json_across_a_resume(
    synthetic_tree: Path, tmp_path: Path
) -> None:
    config = build_config(
        {"data": str(synthetic_tree), "width": 4, "epochs": 3, "batch_size": 100, "device": "cpu"}
    )
    run = RunDir(tmp_path / "runs", "r")
    stop = StopSignal()

    def stop_after_epoch_1(record: dict[str, float]) -> None:
        stop.signal = signal.SIGINT

    with pytest.raises(TrainingInterrupted):
        train(config, run, callbacks=TrainCallbacks(on_epoch=stop_after_epoch_1), stop=stop)
    assert [s.step for s in read_log(run.path).Scalars("loss/test")] == [1]
    resume(run)

    epochs = json.loads(run.metrics_path.read_text())["epochs"]
    log = read_log(run.path)
    for field, tag in SCALARS.items():
        if field in epochs[0]:
            events = log.Scalars(tag)
            assert [e.step for e in events] == [1, 2, 3], tag
            assert [e.value for e in events] == pytest.approx([r[field] for r in epochs], rel=1e-6), tag
    images_per_s = [e.value for e in log.Scalars("time/images_per_s")]
    assert images_per_s == pytest.approx([400 / r["epoch_time_s"] for r in epochs], rel=1e-5)
    (text,) = log.Tensors("config/text_summary")  # the config as text
    assert b'"width": 4' in text.tensor_proto.string_val[0]
    assert log.PluginTagToContent("hparams")  # and as hparams, with the final metrics
    final = log.Scalars("hparam/test_acc")
    assert [e.value for e in final] == pytest.approx([epochs[-1]["test_acc"]])


def test_the_galleries_of_the_commands_after_training_join_the_log(
    trained_runs: Path, tmp_path: Path
) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    args = ("--run", "tiny", "--runs-dir", str(runs), "--count", "3")
    assert invoke("misclassified", *args).exit_code == 0
    assert invoke("gradcam", *args).exit_code == 0
    log = read_log(runs / "tiny")
    epoch = json.loads((runs / "tiny" / "meta.json").read_text())["completed_epochs"]
    for tag in ("misclassified", "gradcam/gradcam_layer4"):
        (image,) = log.Images(tag)
        assert image.step == epoch and image.width > 100 and image.height > 100
    assert [e.step for e in log.Scalars("loss/test")] == [1, 2]  # the training's own epochs


def test_without_tensorboard_training_says_so_once_and_goes_on(
    synthetic_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when it is not installed
    runs = tmp_path / "runs"
    result = invoke(*tiny_train_args(runs, synthetic_tree, epochs=2))
    assert result.exit_code == 0, result.output
    line = 'TensorBoard logging is off: the tensorboard package is not installed (pip install "cifarcam[tensorboard]")'
    assert result.output.count(line) == 1
    assert not (runs / "r" / "tensorboard").exists()
    assert invoke("misclassified", "--run", "r", "--runs-dir", str(runs), "--count", "2").exit_code == 0
    assert (runs / "r" / "metrics.csv").exists()
