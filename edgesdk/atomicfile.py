"""Atomic file writes: temp file in the same folder, fsync, os.replace, fsync the folder.

A crash at any point leaves either the old file or the new one, never a torn one, and no temp
file is left behind on an exception (python-tuf's pattern, plus the fsyncs it leaves out).

These functions raise OSError as it comes; callers wrap them in `edgesdk.errors.map_os_errors`
with what they were writing, so the error names the file's role ("write <spool>/...: disk full").
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from edgesdk.errors import ConfigError, describe_os_error


def fsync_dir(path: str | Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only when the block exits without error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        # Cleanup never hides the original error: on a read-only or failing disk the unlink can
        # fail too (EROFS, EIO); the temp file is then left for the next start to remove.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(path, mode) as handle:
        handle.write(data)


def write_text_atomic(path: str | Path, text: str, mode: int = 0o644) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), mode)


def check_output_folder(path: Path, what: str) -> None:
    """Make sure ``path`` is a folder we can write into, creating it (and its parents) if needed;
    otherwise fail with one line (ConfigError) before any real work starts. Writability is probed
    with a real temporary file: root passes every permission check but not a read-only mount."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: exists and is not a folder")
    if not path.exists():
        parent = path.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"{what} {path}: {parent} is not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{what} {path}: cannot create it ({describe_os_error(exc)})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot write into it ({describe_os_error(exc)})") from None
