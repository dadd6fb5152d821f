"""Who may change a run at the same time: fcntl locks on files next to its directory.

One `train` per run (`training`, exclusive). Commands that read a run and write their results
into it hold a shared lock (`reading`, `reads_run`), which `train --overwrite` must take
exclusively before it deletes the run (`readers_shut_out`); those that merge their results
into a file already there take turns for the merge (`merging`). The kernel drops a lock when its
process dies, so a lock left by a killed process is simply taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from cifarcam.errors import RunError, RunLocked


@contextlib.contextmanager
def training(runs_dir: Path, name: str) -> Iterator[None]:
    """Hold run `name`'s exclusive lock (`runs_dir/.NAME.lock`) for the block; the file only
    records who holds it."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        handle = open(runs_dir / f".{name}.lock", "a+")  # noqa: SIM115
    except OSError as error:
        raise RunError(f"cannot use runs directory '{runs_dir}': {error.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunLocked(
                f"run '{name}' is being trained by another process (pid {holder})",
                hint="wait for it to finish, or stop it first",
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _held(lock_path: Path, operation: int) -> Iterator[None]:
    """Hold `lock_path` with flock `operation` (waiting for it) for the block; without a lock
    where the lock file cannot be created: such a runs directory is read-only, so the run can
    neither be deleted nor written to."""
    try:
        handle = open(lock_path, "a")  # noqa: SIM115
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, operation)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def reading(run_path: Path, lock_path: Path) -> Iterator[None]:
    """Keep the run at `run_path` from being deleted for the block (a shared lock on
    `lock_path`, which waits only while a run is being deleted), so results computed from its
    old training never land in a new run."""
    if not run_path.is_dir():  # nothing to protect, and no lock file for a mistyped name
        yield
        return
    with _held(lock_path, fcntl.LOCK_SH):
        yield


def merging(lock_path: Path) -> contextlib.AbstractContextManager[None]:
    """Hold `lock_path` exclusively for the block, waiting for another holder: one command at a
    time reads a results file, merges its own results in and writes it back, so two at once
    both keep theirs."""
    return _held(lock_path, fcntl.LOCK_EX)


@contextlib.contextmanager
def readers_shut_out(lock_path: Path) -> Iterator[bool]:
    """Hold the readers' lock exclusively for the block and yield True, or yield False at once
    when a command is reading the run (see `reading`)."""
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
