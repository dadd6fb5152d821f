"""Crash safety: runs killed with SIGKILL (or stopped by SIGINT/SIGTERM) at seeded random
moments and resumed end bit-identical to an uninterrupted run, and every file stays readable.

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
from safetensors.torch import load_file

TRAIN_OPTIONS = ["--width", "8", "--epochs", "5", "--batch-size", "32", "--device", "cpu", "--seed", "7"]
# A weight EMA from step 5 of 50 (in epoch 1 of 5): the stops below land after it started, so
# resuming must restore the average too. Epochs of 300 of the 400 images: most epochs start or
# end inside a shuffle, which a resumed run must continue where it stopped. The options come
# after --config and override it.
RUN_CONFIG = {"ema_decay": 0.9, "ema_start": 0.1, "epoch_images": 300}
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
