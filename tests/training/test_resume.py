"""`train --resume`: runs killed with SIGKILL (or stopped by SIGINT/SIGTERM) at seeded random
moments and resumed end bit-identical to an uninterrupted run, and every file stays readable; a
finished run has nothing to resume; a changed config or changed data is refused.

The kill moments are drawn (seed KILL_SEED) between the moment the reference run created its
run directory and the end of its training, so they land in data loading, in the middle of an
epoch, during evaluation or while files are being written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_tree, invoke, snapshot
from safetensors.torch import load_file

from cifarcam.runs.rundir import RunDir

TRAIN_OPTIONS = ["--width", "8", "--epochs", "5", "--batch-size", "32", "--device", "cpu", "--seed", "7"]
# Epochs of 300 of the 400 images: most epochs start or end inside a shuffle, which a resumed
# run must continue where it stopped. The options come after --config and override it.
RUN_CONFIG = {"epoch_images": 300}
KILL_SEED = 20261126
KILL_POINTS = 3


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cifarcam", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def comparable_metrics(run: Path) -> list[dict[str, float]]:
    records = json.loads((run / "metrics.json").read_text())["epochs"]
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in records]


def assert_files_readable(run: Path) -> None:
    for path in run.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory, synthetic_tree: Path) -> dict[str, object]:
    root = tmp_path_factory.mktemp("resume")
    config = root / "run.json"
    config.write_text(json.dumps(RUN_CONFIG))
    options = ["--data", str(synthetic_tree), "--config", str(config), *TRAIN_OPTIONS]
    env = os.environ | {"CIFARCAM_DATA_DIR": str(root / "cache"), "CIFARCAM_RUNS_DIR": str(root / "runs")}
    started = time.perf_counter()
    reference = start(["train", "--run", "reference", *options], env)
    meta = root / "runs" / "reference" / "meta.json"
    while not meta.exists() and reference.poll() is None:
        time.sleep(0.02)
    training_starts = time.perf_counter() - started
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr
    return {
        "env": env,
        "runs": root / "runs",
        "options": options,
        "training_starts": training_starts,
        "seconds": time.perf_counter() - started,
    }


def finish_by_resuming(name: str, setting: dict[str, object]) -> None:
    env, runs = setting["env"], setting["runs"]
    assert isinstance(runs, Path) and isinstance(env, dict)
    if (runs / name / "config.json").exists():
        args = ["train", "--run", name, "--resume"]
    else:  # killed before the run directory existed: a user just runs the command again
        args = ["train", "--run", name, *setting["options"]]  # type: ignore[misc]
    process = start(args, env)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr


def assert_same_as_reference(name: str, setting: dict[str, object]) -> None:
    runs = setting["runs"]
    assert isinstance(runs, Path)
    ours, reference = runs / name, runs / "reference"
    weights = load_file(ours / "checkpoints" / "last.safetensors")
    expected = load_file(reference / "checkpoints" / "last.safetensors")
    assert weights.keys() == expected.keys()
    assert all((weights[k] == expected[k]).all() for k in weights), (
        "weights differ from the uninterrupted run"
    )
    assert comparable_metrics(ours) == comparable_metrics(reference)
    meta = json.loads((ours / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["completed_epochs"] == 5
    assert not list(ours.rglob("*.tmp"))


@pytest.mark.parametrize("point", range(KILL_POINTS))
def test_sigkill_at_a_random_moment_then_resume(point: int, setting: dict[str, object]) -> None:
    first, total = setting["training_starts"], setting["seconds"]
    assert isinstance(first, float) and isinstance(total, float)
    # Anywhere from the creation of the run directory to the end of the last epoch.
    delay = random.Random(KILL_SEED + point).uniform(first, 0.95 * total)
    name = f"killed{point}"
    process = start(["train", "--run", name, *setting["options"]], setting["env"])  # type: ignore[arg-type,misc]
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    runs = setting["runs"]
    assert isinstance(runs, Path)
    if (runs / name).exists():
        assert_files_readable(runs / name)
    finish_by_resuming(name, setting)
    assert_same_as_reference(name, setting)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_mid_epoch_saves_and_resumes_exactly(
    sig: signal.Signals, code: int, setting: dict[str, object]
) -> None:
    runs = setting["runs"]
    assert isinstance(runs, Path)
    name = f"signalled-{sig.name}"
    process = start(["train", "--run", name, *setting["options"]], setting["env"])  # type: ignore[arg-type,misc]
    metrics = runs / name / "metrics.json"
    deadline = time.monotonic() + 120
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    lines = stderr.splitlines()
    assert lines[-2].startswith(f"Error: interrupted by {sig.name} ")
    assert lines[-1] == f"Hint: resume with 'cifarcam train --run {name} --resume'"
    meta = json.loads((runs / name / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["interrupted_by"] == sig.name
    assert_files_readable(runs / name)
    finish_by_resuming(name, setting)
    assert_same_as_reference(name, setting)


def test_a_stop_is_kept_when_every_epoch_is_one_step(tmp_path: Path, synthetic_tree: Path) -> None:
    """The stop lands on an epoch's last step (here every step is one): training must still stop
    before the next epoch, not run to the end and exit 0."""
    env = os.environ | {"CIFARCAM_DATA_DIR": str(tmp_path / "cache")}
    runs = tmp_path / "runs"
    args = ["train", "--run", "one", "--runs-dir", str(runs), "--data", str(synthetic_tree)]
    args += ["--width", "4", "--subset", "100", "--batch-size", "100", "--epochs", "200", "--device", "cpu"]
    process = start(args, env)
    metrics = runs / "one" / "metrics.json"
    deadline = time.monotonic() + 120
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-2].startswith("Error: interrupted by SIGINT after epoch ")
    meta = json.loads((runs / "one" / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["completed_epochs"] < 200
    assert len(json.loads(metrics.read_text())["epochs"]) == meta["completed_epochs"]


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


def test_resume_keeps_a_readers_file_in_flight(trained_runs: Path, tmp_path: Path) -> None:
    """A temporary file of a command still writing is not a killed writer's leftover."""
    runs = copy_tree(trained_runs, tmp_path / "runs")
    run = RunDir(runs, "tiny")
    in_flight = run.path / ".evaluation.json.1234.tmp"
    in_flight.write_text("{")
    with run.reading():
        run.remove_temporaries()
    assert in_flight.exists()
    run.remove_temporaries()
    assert not in_flight.exists()
