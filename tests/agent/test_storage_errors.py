"""A failing disk is a StorageError, never tampering and never a bare OSError.

The faults are real: a small tmpfs mounted for the test is filled up (ENOSPC) or remounted
read-only (EROFS). Mounting needs root (the test machines run as root); elsewhere these tests skip
with the reason rather than fake the fault.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.spool import TelemetrySpool
from agent.store import VersionStore
from agent.telemetry import LatencyRecorder, ProcessStats
from edgesdk.errors import IntegrityError, StorageError
from edgesdk.package import extract_package, verify_package
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from tests.fixtures.disk import SmallDisk, tmpfs
from tests.fixtures.packages import random_package

SELECTION = {"variant": "onnx-fp32", "runtime": "onnxruntime", "provider": "CPUExecutionProvider"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with tmpfs(tmp_path / "disk", 256 * 1024) as disk:
        yield disk


@pytest.fixture
def keys(tmp_path: Path):
    pair = generate_keys(tmp_path / "keys")
    return load_private_key(pair.private_path), load_public_key(pair.public_path)


def make_package(tmp_path: Path, private, version: str, size: int) -> Path:
    return random_package(tmp_path / f"detector-{version}.edgepkg", private, size=size, name="detector",
                          version=version)


# -- package extraction ---------------------------------------------------------------------------
def test_full_disk_during_extraction_is_storage_error_not_tampering(tmp_path: Path, keys, small_disk) -> None:
    private, public = keys
    package = make_package(tmp_path, private, "1.0", size=1024 * 1024)  # 4× the disk
    dest = small_disk.path / "dest"

    with pytest.raises(StorageError) as err:
        extract_package(package, dest, [public])

    assert not isinstance(err.value, IntegrityError)
    assert err.value.disk_full and "disk full" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in small_disk.path.iterdir()) == []  # the staging folder was removed
    verify_package(package, [public])  # the package itself was fine all along
    extract_package(package, tmp_path / "roomy", [public])


def test_full_disk_during_install_keeps_the_active_version(tmp_path: Path, keys, small_disk) -> None:
    private, public = keys
    store = VersionStore(small_disk.path / "data")
    old = make_package(tmp_path, private, "1.0", size=8 * 1024)
    store.stage("detector-1", lambda d: extract_package(old, d, [public]))
    store.activate("detector", "detector-1", SELECTION)
    new = make_package(tmp_path, private, "2.0", size=1024 * 1024)

    with pytest.raises(StorageError, match="disk full") as err:
        store.stage("detector-2", lambda d: extract_package(new, d, [public]))

    assert err.value.disk_full
    assert store.installed() == ["detector-1"] and store.active("detector")["package_id"] == "detector-1"
    assert store.recover() == []  # nothing half-installed was left behind


def test_read_only_disk_makes_activation_a_storage_error(tmp_path: Path, keys, small_disk) -> None:
    private, public = keys
    store = VersionStore(small_disk.path / "data")
    for i, version in ((1, "1.0"), (2, "2.0")):
        pkg = make_package(tmp_path, private, version, size=4096)
        store.stage(f"detector-{i}", lambda d, pkg=pkg: extract_package(pkg, d, [public]))
    store.activate("detector", "detector-1", SELECTION)
    small_disk.read_only()

    with pytest.raises(StorageError, match="read-only file system") as err:
        store.activate("detector", "detector-2", SELECTION)

    assert err.value.errno == errno.EROFS
    assert store.active("detector")["package_id"] == "detector-1"
    with pytest.raises(StorageError, match="read-only"):
        store.gc(keep=1)


# -- telemetry spool and recorder -----------------------------------------------------------------
def test_full_disk_makes_spool_append_a_storage_error_and_keeps_what_was_spooled(small_disk) -> None:
    spool = TelemetrySpool(small_disk.path / "spool")
    spool.append(1, b'{"seq": 1}')
    small_disk.fill()

    with pytest.raises(StorageError, match="disk full") as err:
        spool.append(2, b'{"seq": 2}' + b" " * 8192)

    assert err.value.disk_full
    assert spool.pending() == [1] and spool.read(1) == b'{"seq": 1}'
    small_disk.free()
    assert spool.append(3, b'{"seq": 3}') and spool.pending() == [1, 3]  # it goes on once there is room


def test_read_only_disk_makes_spool_ack_a_storage_error(small_disk) -> None:
    spool = TelemetrySpool(small_disk.path / "spool")
    spool.append(1, b'{"seq": 1}')
    small_disk.read_only()

    assert spool.read(1) == b'{"seq": 1}'
    with pytest.raises(StorageError, match="read-only"):
        spool.ack(1)


def test_full_disk_makes_telemetry_roll_a_storage_error_and_never_reuses_a_seq(small_disk) -> None:
    state = small_disk.path / "telemetry" / "state.json"
    recorder = LatencyRecorder(state, probe=lambda: ProcessStats(None, None))
    assert recorder.roll()[0].seq == 0
    small_disk.fill()

    with pytest.raises(StorageError, match="disk full"):
        recorder.roll()

    small_disk.free()
    assert recorder.roll()[0].seq == 2  # seq 1 went with the lost window; it is never sent twice
    assert LatencyRecorder(state, probe=lambda: ProcessStats(None, None)).next_seq == 3
