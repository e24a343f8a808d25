"""The fetcher against a hostile or flaky repository side, over a real Mosquitto: forged replies from a
client that reads the block requests, a trickling repository, a repository that goes away, and
downloads that must be refused and deleted. Named after the attack (python-tuf style)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transfer import PackageFetcher, Progress, TransferLimits
from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client
from edgesdk.errors import ConfigError, TransferError, TransferStalledError
from edgesdk.fleet.repository import PublishedPackage, RepositoryServer
from edgesdk.protocol import INDEX_BLOCK, BlockRequest, BlockResponse, BlockStatus
from tests.agent.test_transfer import BLOCK, FLEET, Device, device, fast, published, sha256, spec  # noqa: F401

# Quick retries so the bounded-retry paths take well under a second.
QUICK = {"retry_base_s": 0.05, "retry_max_s": 0.2}


class RequestTap:
    """A client that reads every block request (as anyone allowed to subscribe to `packages/+/get`
    could) and answers each itself, through ``answer(request, correlation) -> [payload, ...]``,
    before the repository does."""

    def __init__(self, url: str, client_id: str, answer) -> None:  # noqa: ANN001
        self.config = fast(url)
        self.answer = answer
        self.seen = 0
        self.lock = threading.Lock()
        self.client = make_client(client_id, self.config, clean_start=True)
        self.client.on_message = self._on_message
        connect_blocking(self.client, self.config)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(f"{protocol.fleet_root(FLEET)}/packages/+/get", qos=1)
        assert subscribed.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        reply_to = msg.properties.ResponseTopic
        correlation = msg.properties.CorrelationData
        request = BlockRequest.from_json(msg.payload)
        with self.lock:
            self.seen += 1
        for payload in self.answer(request, correlation):
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
            client.publish(reply_to, payload, qos=1, properties=props)

    def close(self) -> None:
        disconnect(self.client)


@pytest.fixture
def repository(mosquitto, published: PublishedPackage) -> Iterator[RepositoryServer]:  # noqa: ANN001
    with RepositoryServer(fast(mosquitto.url), FLEET, published.path.parent) as server:
        yield server


def downloads_of(device: Device, package_id: str) -> list[str]:
    downloads = device.data_dir / "downloads"
    return sorted(p.name for p in downloads.iterdir() if package_id in p.name) if downloads.exists() else []


# -- forged replies --------------------------------------------------------------------------------
def test_error_reply_injected_by_sniffer_is_retried_not_fatal(mosquitto, repository, device: Device,  # noqa: ANN001
                                                              published: PublishedPackage) -> None:
    # Every request draws forged answers first, three copies each (to try to use up the retries at
    # once), rotating through every kind of bad reply a sniffer can send.
    kinds = itertools.cycle(["bad_request", "not_found", "garbage", "corrupt", "out_of_range"])

    def forge(request: BlockRequest, correlation: bytes) -> list[bytes]:
        block = request.blocks[0] if request.blocks else INDEX_BLOCK
        kind = next(kinds)
        forged = {"bad_request": BlockResponse(BlockStatus.BAD_REQUEST, INDEX_BLOCK, b"go away").encode(),
                  "not_found": BlockResponse(BlockStatus.NOT_FOUND, INDEX_BLOCK).encode(),
                  "garbage": os.urandom(40),
                  "corrupt": BlockResponse(BlockStatus.OK, block, os.urandom(BLOCK)).encode(),
                  "out_of_range": BlockResponse(BlockStatus.OUT_OF_RANGE, block).encode()}[kind]
        return [forged] * 3

    sniffer = RequestTap(mosquitto.url, "sniffer", forge)
    try:
        fetcher = device.new_fetcher(window=4, max_retries=2, retry_base_s=0.2, retry_max_s=1.0)
        path = fetcher.fetch(spec(published))
    finally:
        sniffer.close()

    assert sha256(path) == published.sha256
    stats = fetcher.stats
    assert sniffer.seen >= stats.blocks_total // 4  # the forgeries really answered the requests
    assert stats.error_replies > 0 and stats.corrupt_blocks > 0
    assert stats.blocks_fetched == stats.blocks_total


def test_package_missing_from_repository_fails_after_bounded_backoff(repository, device: Device,  # noqa: ANN001
                                                                     published: PublishedPackage) -> None:
    missing = dataclasses.replace(spec(published), package_id="e" * 64)  # never published
    fetcher = device.new_fetcher(max_retries=2, **QUICK)
    started = time.monotonic()
    with pytest.raises(TransferError, match=r"the repository has no such package \(NOT_FOUND 3 times\)"):
        fetcher.fetch(missing)
    assert time.monotonic() - started < 5  # bounded: 2 backoffs of at most 0.2 s, not a stall
    assert fetcher.stats.retries == 2


# -- slow, stalled and returning repositories --------------------------------------------------------
class TricklingRepository:
    """Serves the real bytes, but one block every ``interval_s`` (the index at once)."""

    def __init__(self, url: str, published: PublishedPackage, interval_s: float) -> None:
        self.data = published.path.read_bytes()
        self.index = b"".join(protocol.block_digests(published.path, published.block_size))
        self.interval_s = interval_s
        self.sent = 0
        self.pending: queue.Queue[tuple[bytes, int]] = queue.Queue()
        self.tap = RequestTap(url, "trickle-repo", self._answer)
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.stop = threading.Event()
        self.thread.start()

    def _answer(self, request: BlockRequest, correlation: bytes) -> list[bytes]:
        if request.index:
            return [BlockResponse(BlockStatus.OK, INDEX_BLOCK, self.index).encode()]
        for block in request.blocks:
            self.pending.put((correlation, block))
        return []

    def _drip(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                correlation, block = self.pending.get_nowait()
            except queue.Empty:
                continue
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
            data = self.data[block * BLOCK:(block + 1) * BLOCK]
            self.tap.client.publish(protocol.device_blocks(FLEET, "pi-7"),
                                    BlockResponse(BlockStatus.OK, block, data).encode(), qos=1, properties=props)
            self.sent += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.tap.close()


def test_trickling_repository_is_abandoned_by_min_rate(mosquitto, device: Device,  # noqa: ANN001
                                                       published: PublishedPackage) -> None:
    trickle = TricklingRepository(mosquitto.url, published, interval_s=0.8)  # 80 KiB/s
    try:
        # stall_timeout_s far above the interval: only the rate rule can stop this fetch.
        fetcher = device.new_fetcher(stall_timeout_s=30, request_timeout_s=30, min_rate_bps=4 * BLOCK,
                                     rate_window_s=2, grace_s=2.5, checkpoint_every=1)
        started = time.monotonic()
        with pytest.raises(TransferStalledError, match=r"too slow: \d+ B/s over the last 2 s, below the minimum"):
            fetcher.fetch(spec(published))
        elapsed = time.monotonic() - started
    finally:
        trickle.close()

    assert elapsed < 6  # grace 2.5 s + one check; not the 30 s stall timeout
    assert fetcher.stats.blocks_fetched >= 1  # it was a trickle, not silence
    downloads = device.data_dir / "downloads"
    assert (downloads / f"{published.package_id}.part").exists()  # kept for resume
    assert (downloads / f"{published.package_id}.blocks").exists()


def test_slow_transfer_is_abandoned_at_its_deadline(mosquitto, device: Device,  # noqa: ANN001
                                                    published: PublishedPackage) -> None:
    trickle = TricklingRepository(mosquitto.url, published, interval_s=0.3)
    try:
        fetcher = device.new_fetcher(stall_timeout_s=30, request_timeout_s=30, min_rate_bps=0, deadline_s=1.5)
        with pytest.raises(TransferStalledError, match=r"not done within the deadline of 1\.5 s"):
            fetcher.fetch(spec(published))
    finally:
        trickle.close()
    assert 0 < fetcher.stats.elapsed_s < 3


def test_stalled_transfer_resumes_when_repository_returns(mosquitto, device: Device,  # noqa: ANN001
                                                          published: PublishedPackage) -> None:
    server = RepositoryServer(fast(mosquitto.url), FLEET, published.path.parent)
    server.start()
    stopper: list[threading.Thread] = []

    def stop_repository_at_block_10(progress: Progress) -> None:
        if progress.blocks_done >= 10 and not stopper:
            stopper.append(threading.Thread(target=server.stop))
            stopper[0].start()

    first = device.new_fetcher(window=4, stall_timeout_s=1.5, request_timeout_s=0.5, min_rate_bps=0)
    with pytest.raises(TransferStalledError, match=r"stalled: no block for 1\.5 s \(\d+/\d+ blocks\)"):
        first.fetch(spec(published), stop_repository_at_block_10)
    stopper[0].join(10)
    kept = first.stats.blocks_fetched
    assert 10 <= kept < first.stats.blocks_total

    with RepositoryServer(fast(mosquitto.url), FLEET, published.path.parent) as again:
        second = device.new_fetcher()
        path = second.fetch(spec(published))
    assert sha256(path) == published.sha256
    assert second.stats.resumed_from == kept  # every block the first fetch verified was kept ...
    assert second.stats.blocks_fetched == second.stats.blocks_total - kept  # ... and not fetched again
    assert again.stats.blocks_served >= second.stats.blocks_total - kept


# -- refused and abandoned downloads -----------------------------------------------------------------
def forge_other_id(published: PublishedPackage) -> str:
    """Store the package's bytes under another id too, as a tampered repository would."""
    other = hashlib.sha256(b"another package").hexdigest()
    repo = published.path.parent
    for suffix in (".edgepkg", ".index", ".json"):
        shutil.copy(repo / f"{published.package_id}{suffix}", repo / f"{other}{suffix}")
    return other


@pytest.mark.parametrize("case", ["sha256-mismatch", "over-the-size-cap", "smaller-than-the-repository-copy"])
def test_refused_download_files_are_deleted(repository, device: Device, published: PublishedPackage,  # noqa: ANN001
                                            case: str) -> None:
    statement = spec(published)
    limits: dict[str, float] = dict(QUICK)
    if case == "sha256-mismatch":  # a statement naming id X with the blocks of another package
        statement = dataclasses.replace(statement, package_id=forge_other_id(published))
        why = "whole-file sha256 differs"
    elif case == "over-the-size-cap":
        limits["max_package_bytes"] = published.size - 1
        why = "exceeds the limit"
    else:  # the statement says fewer bytes than the repository has: never accept more than `size`
        statement = dataclasses.replace(statement, size=published.size - BLOCK)
        why = r"block index failed 4 times \(it did not match blocks_digest\)"
    downloads = device.data_dir / "downloads"
    downloads.mkdir(parents=True)
    for suffix in (".part", ".blocks", ".index"):  # leftovers of an earlier attempt
        (downloads / f"{statement.package_id}{suffix}").write_bytes(b"old")

    with pytest.raises(TransferError, match=why) as err:
        device.new_fetcher(**limits).fetch(statement)

    assert not isinstance(err.value, TransferStalledError)
    assert downloads_of(device, statement.package_id) == []


def test_prune_deletes_abandoned_downloads(repository, device: Device, published: PublishedPackage) -> None:  # noqa: ANN001
    fetcher = device.new_fetcher(checkpoint_every=2)
    with pytest.raises(TransferError, match="cancelled"):  # an abandoned partial download
        fetcher.fetch(spec(published), lambda p: p.blocks_done == 4 and fetcher.cancel())
    downloads = device.data_dir / "downloads"
    wanted, crashed = "a" * 64, "b" * 64
    (downloads / f"{wanted}.edgepkg").write_bytes(b"a finished package still deployed")
    (downloads / f".{crashed}.blocks.x1y2.tmp").write_bytes(b"temp file of a crash")
    (downloads / "README").write_text("not a download: left alone")
    assert downloads_of(device, published.package_id)  # .part/.blocks/.index are there

    assert fetcher.prune(keep={wanted}) == 2

    assert sorted(p.name for p in downloads.iterdir()) == ["README", f"{wanted}.edgepkg"]
    fetcher.discard(wanted)
    assert sorted(p.name for p in downloads.iterdir()) == ["README"]


def test_prune_never_deletes_the_download_in_progress(repository, device: Device,  # noqa: ANN001
                                                      published: PublishedPackage) -> None:
    fetcher = device.new_fetcher(checkpoint_every=2)
    pruned: list[int] = []

    def prune_midway(progress: Progress) -> None:
        if progress.blocks_done == 6 and not pruned:
            pruned.append(fetcher.prune(keep=set()))
            with pytest.raises(TransferError, match="being fetched"):
                fetcher.discard(published.package_id)

    path = fetcher.fetch(spec(published), prune_midway)
    assert pruned == [0] and sha256(path) == published.sha256


def test_transfer_limits_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match="deadline_s"):
        TransferLimits(deadline_s=0)
    with pytest.raises(ConfigError, match="no_such_limit"):
        PackageFetcher(None, FLEET, "pi-7", "/tmp", no_such_limit=1)  # type: ignore[arg-type]
