"""The fetcher's writer thread (hash, write, whole-file sha256, checkpoints off the receive path),
against a real Mosquitto running the shipped policy: blocks out of order, a forged copy racing the
genuine one, a crash after the last checkpoint, and a deployment statement whose blocks verify but
whose whole file does not. What must hold: a block is done only once its hash matched, the whole
file is checked, and a resume keeps exactly what the record claims."""

from __future__ import annotations

import dataclasses
import os
import re
import threading

import pytest

from agent.transfer import Progress
from edgesdk import protocol
from edgesdk.errors import TransferError
from edgesdk.fleet.repository import PublishedPackage
from edgesdk.protocol import INDEX_BLOCK, BlockRequest, BlockResponse, BlockStatus
from tests.agent.test_transfer_attacks import RequestTap, downloads_of, forge_other_id
from tests.agent.transfer_rig import (BLOCK, Device, device, fleet, fleet_service, new_id,  # noqa: F401
                                      published, repository, sha256)


class ScramblingRepository:
    """Answers each request itself (the fleet-service login, no RepositoryServer): the index as
    is, the blocks of each request in reverse order, each one preceded by a forged copy when
    ``forge`` is set (random bytes of the right length: only the hash can tell them apart)."""

    def __init__(self, broker, device: Device, published: PublishedPackage, forge: bool) -> None:  # noqa: ANN001
        self.data = published.path.read_bytes()
        self.index = b"".join(protocol.block_digests(published.path, published.block_size))
        self.forge = forge
        self.lock = threading.Lock()
        self.answered: list[int] = []
        self.tap = RequestTap(fleet_service(broker), device.fleet, new_id("scrambler"), self._answer)

    def _answer(self, request: BlockRequest, correlation: bytes) -> list[bytes]:
        if request.index:
            return [BlockResponse(BlockStatus.OK, INDEX_BLOCK, self.index).encode()]
        replies = []
        for block in reversed(request.blocks):
            data = self.data[block * BLOCK:(block + 1) * BLOCK]
            if self.forge:
                replies.append(BlockResponse(BlockStatus.OK, block, os.urandom(len(data))).encode())
            replies.append(BlockResponse(BlockStatus.OK, block, data).encode())
        with self.lock:
            self.answered.extend(reversed(request.blocks))
        return replies

    def close(self) -> None:
        self.tap.close()


@pytest.mark.parametrize("forge", [False, True], ids=["reversed", "reversed-each-after-a-forged-copy"])
def test_blocks_out_of_order_and_forged_copies_still_give_the_verified_file(
        secure_mosquitto_session, device: Device, published: PublishedPackage, forge: bool) -> None:  # noqa: ANN001
    scrambler = ScramblingRepository(secure_mosquitto_session, device, published, forge)
    try:
        fetcher = device.new_fetcher(window=8, checkpoint_every=3)  # retry backoff 0.5 s and up
        path = fetcher.fetch(device.spec(published))
    finally:
        scrambler.close()

    assert sha256(path) == published.sha256  # the whole-file hash, fed in order from blocks out of order
    stats = fetcher.stats
    assert scrambler.answered[:2] != sorted(scrambler.answered[:2])  # they really came in reverse
    assert stats.blocks_fetched == stats.blocks_total
    # Each forged copy failed its hash; the genuine copy right behind it was accepted without
    # waiting out the backoff (no request was sent again).
    assert stats.corrupt_blocks == (stats.blocks_total if forge else 0)
    assert stats.retries == 0 and stats.blocks_refetched == 0


def test_a_crash_after_the_last_checkpoint_finishes_without_fetching(repository, device: Device,  # noqa: ANN001
                                                                    published: PublishedPackage) -> None:
    class AgentDied(Exception):
        pass

    def die_at_the_last_block(progress: Progress) -> None:
        if progress.blocks_done == progress.blocks_total:
            raise AgentDied  # every block written and checkpointed, not yet renamed into place

    first = device.new_fetcher(checkpoint_every=1, checkpoint_interval_s=0)
    with pytest.raises(AgentDied):
        first.fetch(device.spec(published), die_at_the_last_block)
    assert not (device.data_dir / "downloads" / f"{published.package_id}.edgepkg").exists()

    second = device.new_fetcher()
    path = second.fetch(device.spec(published))

    assert sha256(path) == published.sha256  # the whole-file hash of the resumed blocks, read back
    assert second.stats.resumed_from == second.stats.blocks_total
    assert second.stats.blocks_fetched == 0 and second.stats.requests_sent == 0


def test_resumed_blocks_with_another_packages_whole_hash_are_refused(repository, device: Device,  # noqa: ANN001
                                                                      published: PublishedPackage) -> None:
    # A statement naming id X with the blocks of another package, resumed from a complete part
    # file: every block verifies, so only the whole-file sha256 (of bytes read back) can refuse it.
    statement = dataclasses.replace(device.spec(published), package_id=forge_other_id(published))

    def crash(progress: Progress) -> None:
        if progress.blocks_done == progress.blocks_total:
            raise RuntimeError("crash before the finish")

    with pytest.raises(RuntimeError, match="crash before the finish"):
        device.new_fetcher(checkpoint_every=1, checkpoint_interval_s=0).fetch(statement, crash)
    resumed = device.new_fetcher()
    with pytest.raises(TransferError, match="whole-file sha256 differs"):
        resumed.fetch(statement)
    assert resumed.stats.resumed_from == resumed.stats.blocks_total and resumed.stats.requests_sent == 0
    assert downloads_of(device, statement.package_id) == []


def test_checkpoints_come_at_most_once_per_interval_but_a_stop_always_saves(repository, device: Device,  # noqa: ANN001
                                                                            published: PublishedPackage) -> None:
    class AgentDied(Exception):
        pass

    def die_at_block_10(progress: Progress) -> None:
        if progress.blocks_done == 10:
            raise AgentDied

    # A checkpoint per block is asked for, but at most one an hour: nothing was claimed by the crash.
    with pytest.raises(AgentDied):
        device.new_fetcher(checkpoint_every=1, checkpoint_interval_s=3600).fetch(device.spec(published),
                                                                                 die_at_block_10)
    assert not (device.data_dir / "downloads" / f"{published.package_id}.blocks").exists()

    # A cancel (like a stall or a refused block) saves what was written, whatever the interval.
    fetcher = device.new_fetcher(checkpoint_every=1, checkpoint_interval_s=3600)
    with pytest.raises(TransferError, match=r"cancelled \((\d+)/\d+ blocks kept\)") as err:
        fetcher.fetch(device.spec(published), lambda p: p.blocks_done == 10 and fetcher.cancel())
    kept = int(re.search(r"\((\d+)/", str(err.value)).group(1))  # type: ignore[union-attr]
    assert kept >= 10

    resumed = device.new_fetcher()
    path = resumed.fetch(device.spec(published))
    assert sha256(path) == published.sha256 and resumed.stats.resumed_from == kept
