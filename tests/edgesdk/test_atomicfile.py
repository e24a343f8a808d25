"""Atomic writes: readers see the old file or the new one, never a torn one, and no temp file survives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgesdk.atomicfile import atomic_writer, write_bytes_atomic, write_text_atomic


class Boom(Exception):
    pass


def test_write_replaces_content(tmp_path: Path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    write_bytes_atomic(path, b"new content")

    assert path.read_bytes() == b"new content"
    assert sorted(tmp_path.iterdir()) == [path]


def test_write_text_creates_a_new_file(tmp_path: Path):
    path = tmp_path / "notes.txt"

    write_text_atomic(path, "héllo\n")

    assert path.read_text(encoding="utf-8") == "héllo\n"


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o444])
def test_mode_is_applied_regardless_of_umask(tmp_path: Path, mode: int):
    path = tmp_path / "file.bin"
    old_umask = os.umask(0o077)
    try:
        write_bytes_atomic(path, b"x", mode=mode)
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_readers_see_the_old_content_until_the_block_exits(tmp_path: Path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")

    with atomic_writer(path) as handle:
        handle.write(b"half of the new")
        handle.flush()
        assert path.read_bytes() == b"old"
        temps = [p for p in tmp_path.iterdir() if p != path]
        assert len(temps) == 1 and temps[0].parent == tmp_path  # same folder: os.replace is atomic

    assert path.read_bytes() == b"half of the new"


@pytest.mark.parametrize("exc", [Boom("disk on fire"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_exception_inside_writer_keeps_old_file_and_leaves_no_temp(tmp_path: Path, exc: BaseException):
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    with pytest.raises(type(exc)):
        with atomic_writer(path, mode=0o600) as handle:
            handle.write(b"torn")
            raise exc

    assert path.read_bytes() == b"old"
    assert sorted(tmp_path.iterdir()) == [path]


def test_exception_while_creating_leaves_no_file_at_all(tmp_path: Path):
    path = tmp_path / "new.bin"

    with pytest.raises(Boom):
        with atomic_writer(path) as handle:
            handle.write(b"partial")
            raise Boom()

    assert list(tmp_path.iterdir()) == []
