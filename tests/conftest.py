"""Shared fixtures: a synthetic image-folder tree, the shared CIFAR-10 copy when present, runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest
from hypothesis import HealthCheck, settings
from typer.testing import CliRunner, Result

from cifarcam.cli import app
from cifarcam.data.datasets import Dataset, synthetic_dataset

# Reproducible property tests on a shared, noisy 2-core machine: fixed examples, no deadline.
settings.register_profile(
    "cifarcam", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("cifarcam")

SHARED_TARBALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def write_image_folder(dataset: Dataset, root: Path, ext: str = ".png") -> Path:
    """Write a Dataset as root/{train,test}/<class>/NNNN.png (RGB)."""
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        counters: dict[int, int] = {}
        for image, label in zip(split.images.numpy(), split.labels.tolist(), strict=True):
            folder = root / split_name / dataset.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            counters[label] = counters.get(label, -1) + 1
            cv2.imwrite(str(folder / f"{counters[label]:04d}{ext}"), image.transpose(1, 2, 0)[:, :, ::-1])
    return root


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode caches go to a per-session temp dir, never the user's cache."""
    cache = tmp_path_factory.getbasetemp() / "data-cache"
    monkeypatch.setenv("CIFARCAM_DATA_DIR", str(cache))


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small learnable image-folder tree: 400 train and 200 test 32x32 PNGs in 10 classes."""
    root = tmp_path_factory.mktemp("synthetic")
    return write_image_folder(synthetic_dataset(400, 200, seed=3), root)


@pytest.fixture(scope="session")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIFAR-10 copy from ../shared/data, unpacked once; the synthetic tree where absent."""
    override = os.environ.get("CIFARCAM_TEST_CIFAR")
    if override:
        return Path(override)
    if not SHARED_TARBALL.exists():
        root = tmp_path_factory.mktemp("cifar-fallback")
        return write_image_folder(synthetic_dataset(2000, 1000, seed=5), root)
    root = tmp_path_factory.mktemp("cifar10")
    subprocess.run(["tar", "-xzf", str(SHARED_TARBALL), "-C", str(root)], check=True)
    return root


@pytest.fixture()
def runs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def invoke(*args: str) -> Result:
    """The cifarcam CLI run in this process; no traceback may reach its output."""
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its SHA-256: equal snapshots mean nothing was written there."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def assert_only_locks_added(before: dict[str, str], folder: Path) -> None:
    """Every file of the `before` snapshot is still in `folder`, unchanged, and the only files
    added are lock files."""
    after = snapshot(folder)
    assert {k: after.get(k) for k in before} == before
    assert all(k.endswith(".lock") for k in set(after) - set(before))


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory, synthetic_tree: Path) -> Path:
    """A runs root holding 'tiny': a width-8 ResNet18 trained 2 epochs on the synthetic tree.

    Tests must not modify it; copy it with `copy_tree` first.
    """
    from cifarcam.config import build_config
    from cifarcam.runs.rundir import RunDir
    from cifarcam.training.run import train

    root = tmp_path_factory.mktemp("trained")
    config = build_config(
        {
            "data": str(synthetic_tree),
            "data_dir": str(root / "cache"),
            "width": 8,
            "epochs": 2,
            "batch_size": 64,
            "lr": 0.05,
            "val_split": 50,
            "device": "cpu",
        }
    )
    train(config, RunDir(root / "runs", "tiny"), command="test fixture")
    return root / "runs"


def tiny_train_args(runs: Path, tree: Path, run: str = "r", epochs: int = 3) -> list[str]:
    """`cifarcam train` arguments for a few-second width-4 run on a small tree."""
    return [
        "train",
        "--run",
        run,
        "--runs-dir",
        str(runs),
        "--data",
        str(tree),
        "--width",
        "4",
        "--epochs",
        str(epochs),
        "--batch-size",
        "100",
        "--device",
        "cpu",
    ]


@pytest.fixture(scope="session")
def reported_runs(tmp_path_factory: pytest.TempPathFactory, trained_runs: Path) -> Path:
    """A copy of 'tiny' with everything a report shows: evaluation, mistakes, label issues, Grad-CAM,
    CAM checks, the report."""
    from cifarcam.evaluation import commands as evaluation
    from cifarcam.explain import commands as explain
    from cifarcam.report.page import write_report
    from cifarcam.runs.rundir import RunDir

    runs = copy_tree(trained_runs, tmp_path_factory.mktemp("reported") / "runs")
    run = RunDir(runs, "tiny")
    evaluation.evaluate(run, device_name="cpu")
    evaluation.misclassified(run, count=5, device_name="cpu")
    evaluation.label_issues(run, count=5, device_name="cpu")
    explain.gradcam(
        run, ["gradcam", "gradcam++"], ["layer4"], count=5, metrics=True, steps=4, device_name="cpu"
    )
    explain.sanity(run, "gradcam", "layer4", count=4, device_name="cpu")
    write_report(run)
    return runs


HOSTILE_CLASS = "<img src=x onerror=alert(1)>"
HOSTILE_FOLDER = ("<script>alert(1)<", "script>")  # one path: .../<script>alert(1)</script>/...


@pytest.fixture(scope="session")
def hostile_runs(tmp_path_factory: pytest.TempPathFactory, synthetic_tree: Path) -> Path:
    """A run trained on data whose path holds '<script>alert(1)</script>' and whose class is an <img> tag.

    Its Grad-CAM gallery's title holds a '<script>' too; the report is written.
    """
    from cifarcam.config import build_config
    from cifarcam.evaluation import commands as evaluation
    from cifarcam.explain import commands as explain
    from cifarcam.report.page import write_report
    from cifarcam.runs.rundir import RunDir
    from cifarcam.training import run as pipeline

    base = tmp_path_factory.mktemp("hostile")
    tree = base.joinpath(*HOSTILE_FOLDER, "data")
    shutil.copytree(synthetic_tree, tree)
    for split in ("train", "test"):
        (tree / split / "class3").rename(tree / split / HOSTILE_CLASS)
    config = build_config(
        {"data": str(tree), "data_dir": str(base / "cache"), "width": 4, "epochs": 1, "device": "cpu"}
    )
    run = RunDir(base / "runs", "hostile")
    pipeline.train(config, run, command="cifarcam train --run hostile --data '<script>alert(2)</script>'")
    evaluation.evaluate(run, device_name="cpu", tta=False)
    explain.gradcam(run, ["gradcam"], ["layer4"], count=2, device_name="cpu")
    gallery = run.gradcam_dir / "gradcam_layer4.json"
    gallery.write_text(json.dumps(json.loads(gallery.read_text()) | {"title": "<script>alert(3)</script>"}))
    write_report(run)
    return base / "runs"


def disk_full_at_fsync(call: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, the `call`-th fsync of cifarcam's file writes fails as on a full disk (the
    count is of every os.fsync in this process: keep other writers out of the block)."""
    import cifarcam.runs.files as fileio

    real_fsync = fileio.os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == call:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
