"""Atomic file writes (a temporary file in the target's directory, fsync, then os.replace), and
the JSON parsing every reader of cifarcam's files shares."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the block finishes without error.

    The temporary file is created with mode 0666 minus the umask, like a plain open().
    """
    temporary, descriptor = _create_temporary(path)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new hidden file next to `path` (`.NAME.RANDOM.tmp`), and its descriptor open for writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    return temporary, os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_files({path: data})


def atomic_write_files(files: Mapping[Path, bytes]) -> None:
    """Replace several files as one result (a gallery and its JSON, say): every temporary file is
    written and synced before the first target is replaced, so an error while writing (a full
    disk) leaves all the targets as they were. Only a failure between the renames, which need
    no space, could leave some replaced and others not; no temporary file is left either way."""
    for path in files:  # os.replace cannot put a file over a folder: found before any write
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    pending: list[tuple[Path, Path]] = []  # (temporary, target) not yet renamed
    try:
        for path, data in files.items():
            temporary, descriptor = _create_temporary(path)
            pending.append((temporary, path))
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        while pending:
            os.replace(*pending[0])
            pending.pop(0)
    except BaseException:
        for temporary, _ in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        raise


def read_file(path: Path) -> bytes:
    """The bytes of the regular file at `path` (links followed). A FIFO, socket or device is an
    OSError without a read: reading one waits for a writer, or never ends (/dev/zero)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without a writer
    with os.fdopen(descriptor, "rb") as handle:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))
        return handle.read()


def read_text(path: Path) -> str:
    """`read_file` as UTF-8 text (UnicodeDecodeError when it is not)."""
    return read_file(path).decode("utf-8")


def written_file(filename: str) -> str:
    """The file a write was for: `filename` itself, or the target of one of our temporary files
    (an error while writing names the temporary, which the user never asked for)."""
    path = Path(filename)
    match = _TEMPORARY.fullmatch(path.name)
    return str(path.with_name(match.group(1))) if match else filename


def json_bytes(value: Any) -> bytes:
    """A JSON file's bytes as cifarcam writes them: indented, UTF-8, a final newline."""
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json_bytes(value))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _parse_int(text: str) -> int:
    """An integer a reader can also take as a float (cifarcam writes none beyond that range)."""
    digits = len(text.lstrip("-"))
    try:
        if digits > 400:  # beyond any float, and Python's own limit on int() is 4,300 digits
            raise OverflowError
        value = int(text)
        float(value)
    except OverflowError:
        raise ValueError(f"it holds an integer of {digits} digits, beyond a float's range") from None
    return value


MAX_NESTING = 64  # levels of lists and objects; cifarcam's own files (pipelines too) hold far fewer


def _nesting(value: Any) -> int:
    """How many levels of lists and objects `value` has (0 for a scalar), without recursion."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            level.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(text: str) -> Any:
    """json.loads for files a user may have edited: a ValueError (json.JSONDecodeError for bad
    syntax) also for integers beyond a float's range and for nesting deeper than MAX_NESTING
    (which the code reading it would recurse into)."""
    try:
        value = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    if _nesting(value) > MAX_NESTING:
        raise ValueError(f"it is nested more than {MAX_NESTING} levels deep")
    return value
