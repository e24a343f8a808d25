"""PackageFetcher against a real Mosquitto and RepositoryServer: faults are injected for real
(the broker is SIGKILLed, repository bytes are flipped, the disk is /dev/full). The broker runs the
shipped policy: the device logs in as itself, the repository as the fleet service."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.transfer import Progress
from edgesdk.errors import TransferError, TransferStalledError
from edgesdk.fleet.repository import PublishedPackage
from tests.agent.transfer_rig import (BLOCK, Device, device, fleet, new_id, published,  # noqa: F401
                                      repository, repository_server, sha256)


def test_fetch_over_loopback_matches_sha256(repository, device: Device, published: PublishedPackage) -> None:  # noqa: ANN001
    seen: list[Progress] = []
    path = device.new_fetcher().fetch(device.spec(published), seen.append)

    assert path == device.data_dir / "downloads" / f"{published.package_id}.edgepkg"
    assert sha256(path) == published.sha256
    stats = device.fetcher.stats  # type: ignore[union-attr]
    total = -(-published.size // BLOCK)
    assert (stats.blocks_total, stats.blocks_fetched, stats.resumed_from, stats.corrupt_blocks) == (total, total, 0, 0)
    assert seen[-1] == Progress(total, total, published.size, published.size)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no .part/.blocks/.index left


def test_resumes_transfer_after_broker_restart(secure_mosquitto, fleet: str, published: PublishedPackage,  # noqa: ANN001
                                               tmp_path: Path) -> None:
    # A broker of its own: this one is killed. It comes back with the same TLS files, password
    # file and ACL, so the device and the repository log in again with the same credentials.
    with Device(secure_mosquitto, fleet, new_id("pi"), tmp_path / "agent") as device, \
            repository_server(secure_mosquitto, fleet, published.path.parent):
        # request_timeout_s=1: replies to requests re-issued before the repository re-subscribed
        # are lost (a shared subscription with no member drops them); the timeout asks again.
        fetcher = device.new_fetcher(window=4, request_timeout_s=1)
        restarted = threading.Event()

        def kill_broker_once(progress: Progress) -> None:
            if progress.blocks_done >= 10 and not restarted.is_set():
                secure_mosquitto.kill()  # SIGKILL: in-flight requests and replies die with it
                secure_mosquitto.restart()
                restarted.set()

        path = fetcher.fetch(device.spec(published), kill_broker_once)

    assert restarted.is_set() and device.connects == 2  # the fault really hit mid-transfer
    assert sha256(path) == published.sha256
    stats = fetcher.stats
    # At most what was in flight when the broker died; 0 when those replies had already arrived
    # or paho re-sent the unacknowledged requests itself.
    assert stats.blocks_refetched <= 4
    assert stats.blocks_fetched == stats.blocks_total


def test_resumes_after_agent_restart_fetching_only_missing_blocks(repository, device: Device,  # noqa: ANN001
                                                                   published: PublishedPackage) -> None:
    class AgentDied(Exception):
        pass

    def die_at_block_10(progress: Progress) -> None:
        if progress.blocks_done == 10:
            raise AgentDied  # no cleanup, no checkpoint: like a crash after the data was written

    first = device.new_fetcher(checkpoint_every=4, checkpoint_interval_s=0)  # every 4 blocks, however fast
    with pytest.raises(AgentDied):
        first.fetch(device.spec(published), die_at_block_10)

    second = device.new_fetcher(checkpoint_every=4)  # a new process: same data_dir, fresh object
    path = second.fetch(device.spec(published))

    assert sha256(path) == published.sha256
    # Only checkpointed blocks are claimed: the checkpoint at 8 came before block 9 was written
    # (one writer, in order); the writer may have written and checkpointed the blocks it held
    # (at most the window of 4) before the crash stopped it, so 12 is possible, 10 or 14 never.
    resumed = second.stats.resumed_from
    assert resumed in (8, 12), resumed
    assert second.stats.blocks_fetched == second.stats.blocks_total - resumed


def test_superseded_partial_download_is_discarded(repository, device: Device,  # noqa: ANN001
                                                  published: PublishedPackage) -> None:
    fetcher = device.new_fetcher(checkpoint_every=2)
    with pytest.raises(TransferError, match=r"cancelled \(\d+/\d+ blocks kept\)"):
        fetcher.fetch(device.spec(published), lambda p: p.blocks_done == 4 and fetcher.cancel())
    downloads = device.data_dir / "downloads"
    assert (downloads / f"{published.package_id}.blocks").exists()

    assert fetcher.prune(keep={"0" * 64}) == 1
    assert list(downloads.iterdir()) == []


def test_corrupt_repository_block_is_refused_after_bounded_retries_then_repaired(
        repository, device: Device, published: PublishedPackage) -> None:  # noqa: ANN001
    original = published.path.read_bytes()
    with open(published.path, "r+b") as handle:  # flip bytes inside block 5 of the stored package
        handle.seek(5 * BLOCK + 100)
        handle.write(bytes(b ^ 0xFF for b in original[5 * BLOCK + 100:5 * BLOCK + 110]))

    fetcher = device.new_fetcher(max_retries=2)
    with pytest.raises(TransferError, match=r"block 5 came 3 times and it failed verification"):
        fetcher.fetch(device.spec(published))
    assert fetcher.stats.corrupt_blocks == 3
    assert not (device.data_dir / "downloads" / f"{published.package_id}.edgepkg").exists()

    published.path.write_bytes(original)  # the operator restores the repository copy
    repaired = device.new_fetcher()
    path = repaired.fetch(device.spec(published))
    assert sha256(path) == published.sha256
    assert repaired.stats.resumed_from > 0  # the good blocks were kept


def test_stalled_transfer_fails_within_the_stall_timeout(device: Device, published: PublishedPackage) -> None:
    fetcher = device.new_fetcher(stall_timeout_s=0.6, request_timeout_s=0.2)  # no repository for this fleet
    started = time.monotonic()
    total = device.spec(published).block_count
    with pytest.raises(TransferStalledError, match=rf"stalled: no block for 0\.6 s \(0/{total} blocks, index not received\)"):
        fetcher.fetch(device.spec(published))
    assert time.monotonic() - started < 3.0  # 0.6 s plus generous slack for a loaded CI machine
    assert fetcher.stats.requests_reissued >= 1


def test_two_repository_servers_share_the_requests(secure_mosquitto_session, fleet: str,  # noqa: ANN001
                                                   device: Device, published: PublishedPackage) -> None:
    # Both log in as the fleet service and join its secret share group, as two `edgesdk serve` would.
    servers = [repository_server(secure_mosquitto_session, fleet, published.path.parent) for _ in range(2)]
    for server in servers:
        server.start()
    try:
        path = device.new_fetcher(window=2).fetch(device.spec(published))
    finally:
        for server in servers:
            server.stop()
    assert sha256(path) == published.sha256
    assert all(s.stats.blocks_served > 0 for s in servers), [s.stats for s in servers]


def test_disk_full_keeps_partial_data_for_resume(repository, device: Device,  # noqa: ANN001
                                                 published: PublishedPackage) -> None:
    downloads = device.data_dir / "downloads"
    downloads.mkdir(parents=True)
    part = downloads / f"{published.package_id}.part"
    part.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full SD card
    fetcher = device.new_fetcher()
    total = device.spec(published).block_count
    with pytest.raises(TransferError, match=rf"disk full writing .*\.part \(0/{total} blocks kept for resume\)"):
        fetcher.fetch(device.spec(published))

    part.unlink()  # space freed
    path = device.new_fetcher().fetch(device.spec(published))
    assert sha256(path) == published.sha256


def test_never_accepts_a_deployment_larger_than_the_limit(device: Device, published: PublishedPackage) -> None:
    fetcher = device.new_fetcher(max_package_bytes=1024 * 1024)
    with pytest.raises(TransferError, match="exceeds the limit"):
        fetcher.fetch(device.spec(published))
