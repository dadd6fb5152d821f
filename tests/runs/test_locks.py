"""Commands that read a run and write their results into it, against `train --overwrite` of the
same run: the overwrite is refused while one reads, and one that starts during the deletion waits
for it, so results computed from the old training never land in the new run."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_tree, snapshot, tiny_train_args
from typer.testing import CliRunner

from cifarcam.cli import app
from cifarcam.evaluation import commands as evaluation
from cifarcam.explain import commands as explain
from cifarcam.report import figures
from cifarcam.report.page import write_report
from cifarcam.runs.rundir import RunDir

runner = CliRunner()

READERS: list[tuple[str, Callable[[RunDir], Any]]] = [
    ("evaluate", lambda run: evaluation.evaluate(run, device_name="cpu", tta=False)),
    ("misclassified", lambda run: evaluation.misclassified(run, count=2, device_name="cpu")),
    ("gradcam", lambda run: explain.gradcam(run, ["gradcam"], ["layer4"], count=2, device_name="cpu")),
    ("sanity", lambda run: explain.sanity(run, "gradcam", "layer4", count=2, device_name="cpu")),
    ("plot", figures.plot_run_curves),
    ("report", write_report),
]


def _waiters_on(path: Path) -> int:
    """Blocked lock requests on the file at `path`, from /proc/locks ('->' lines)."""
    info = os.stat(path)
    inode = f":{info.st_ino} "
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and inode in line + " ")


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="reads blocked locks from Linux's /proc/locks")
@pytest.mark.parametrize(("name", "command"), READERS, ids=[r[0] for r in READERS])
def test_a_reader_waits_while_its_run_is_deleted(
    name: str, command: Callable[[RunDir], Any], trained_runs: Path, tmp_path: Path
) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    run = RunDir(runs, "tiny")
    lock_path = runs / ".tiny.readers.lock"
    outcome: dict[str, Any] = {}

    def read() -> None:
        try:
            outcome["result"] = command(run)
        except Exception as error:  # reported by the assertion below
            outcome["error"] = error

    with open(lock_path, "a") as deleting:  # what `train --overwrite` holds while it deletes
        fcntl.flock(deleting, fcntl.LOCK_EX)
        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 120
        while not _waiters_on(lock_path):
            assert reader.is_alive(), f"{name} ran while the run was being deleted: {outcome}"
            assert time.monotonic() < deadline, f"{name} neither waited nor finished"
            time.sleep(0.02)
        assert not outcome  # it waits before it reads anything
        fcntl.flock(deleting, fcntl.LOCK_UN)
    reader.join(120)
    assert "result" in outcome, outcome


def test_overwrite_is_refused_while_a_command_reads_the_run(
    trained_runs: Path, tmp_path: Path, synthetic_tree: Path
) -> None:
    runs = copy_tree(trained_runs, tmp_path / "runs")
    before = snapshot(runs / "tiny")
    args = [*tiny_train_args(runs, synthetic_tree, run="tiny", epochs=1), "--overwrite"]
    with RunDir(runs, "tiny").reading():
        refused = runner.invoke(app, args)
    assert refused.exit_code == 1, refused.output
    assert refused.stderr.splitlines()[0] == (
        "Error: run 'tiny' is being read by another cifarcam command, which would write its "
        "results into the new run; run 'tiny' was not changed"
    )
    assert snapshot(runs / "tiny") == before
    # once nobody reads it, the overwrite goes ahead
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert snapshot(runs / "tiny") != before


def test_reading_a_missing_run_leaves_no_lock_file(tmp_path: Path) -> None:
    with RunDir(tmp_path, "typo").reading():
        pass
    assert list(tmp_path.iterdir()) == []
