"""Who may change a run at once: fcntl locks next to its directory (the kernel drops them when a
process dies). One `train` per run; readers that write results hold a shared lock, which
`train --overwrite` takes exclusively to delete the run; merges into a results file take turns."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from cifarcam.errors import RunError, RunLocked


@contextlib.contextmanager
def training(runs_dir: Path, name: str) -> Iterator[None]:
    """Hold run `name`'s exclusive lock (`runs_dir/.NAME.lock`, which records the holder's pid)."""
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
def _flock(lock_path: Path, operation: int) -> Iterator[bool]:
    """Hold `lock_path` with flock `operation` for the block and yield True; yield False at once,
    holding nothing, when a non-blocking `operation` finds it taken."""
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, operation)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:  # not only at close: a forked worker may still hold a copy of the descriptor
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def reading(run_path: Path, lock_path: Path) -> Iterator[None]:
    """Keep the run at `run_path` from being deleted for the block (shared, so it waits only for
    a deletion): results computed from its old training never land in a new run."""
    if not run_path.is_dir():  # nothing to protect, and no lock file for a mistyped name
        yield
        return
    with _flock(lock_path, fcntl.LOCK_SH):
        yield


def merging(lock_path: Path) -> contextlib.AbstractContextManager[bool]:
    """Hold `lock_path` exclusively, waiting for another holder: one command at a time reads a
    results file, merges its own in and writes it back, so two at once both keep theirs."""
    return _flock(lock_path, fcntl.LOCK_EX)


def readers_shut_out(lock_path: Path) -> contextlib.AbstractContextManager[bool]:
    """Hold the readers' lock exclusively and yield True, or yield False at once while one reads."""
    return _flock(lock_path, fcntl.LOCK_EX | fcntl.LOCK_NB)
