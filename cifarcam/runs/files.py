"""Atomic file writes: a temporary file in the target's directory, fsync, then os.replace, so a
reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the block finishes without error."""
    temporary, handle = _open_temporary(path)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_files(files: Mapping[Path, bytes]) -> None:
    """Replace several files as one result: every temporary file is written and synced before the
    first rename, so an error while writing (a full disk) leaves all targets as they were; only a
    failure between the renames could leave some replaced. No temporary file is left either way."""
    for path in files:  # os.replace cannot put a file over a folder: found before any write
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    pending: list[tuple[Path, Path]] = []  # (temporary, target) not yet renamed
    try:
        for path, data in files.items():
            temporary, handle = _open_temporary(path)
            pending.append((temporary, path))
            with handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        while pending:
            os.replace(*pending[0])
            pending.pop(0)
    except BaseException:
        for temporary, _ in pending:
            temporary.unlink(missing_ok=True)
        raise


def _open_temporary(path: Path) -> tuple[Path, IO[bytes]]:
    """A new hidden `.NAME.RANDOM.tmp` next to `path`, open for writing, mode 0666 minus the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    return temporary, os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


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
    atomic_write_files({path: json_bytes(value)})


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_files({path: text.encode("utf-8")})
