"""The fetcher against a hostile or flaky repository side, over a real Mosquitto running the shipped
policy (TLS, one login per device, the ACL of edgesdk.fleet.broker_policy): what a device login can
and cannot see of other devices' transfers, forged replies from a client that reads the block
requests, a trickling repository, a repository that goes away, and downloads that must be refused
and deleted. Named after the attack (python-tuf style).

Under the ACL only the fleet service may read block requests and write block responses, so the
clients below that read requests and answer them (a sniffer, a trickling repository) log in with
the fleet-service credentials: they stand for a leaked fleet-service credential, or a broker run
without the policy. A device login can do neither; the first test shows it."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transfer import PackageFetcher, Progress, TransferLimits
from edgesdk import protocol
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.errors import ConfigError, TransferError, TransferStalledError
from edgesdk.fleet.repository import PublishedPackage
from edgesdk.protocol import INDEX_BLOCK, BlockRequest, BlockResponse, BlockStatus
from tests.agent.transfer_rig import (BLOCK, FAST, Device, device, fleet, fleet_service, new_id,  # noqa: F401
                                      published, repository, repository_server, sha256)

# Quick retries so the bounded-retry paths take well under a second.
QUICK = {"retry_base_s": 0.05, "retry_max_s": 0.2}
WAIT_S = 10.0  # bound on waiting for a SUBACK or a reply that must come


def downloads_of(device: Device, package_id: str) -> list[str]:
    downloads = device.data_dir / "downloads"
    return sorted(p.name for p in downloads.iterdir() if package_id in p.name) if downloads.exists() else []


# -- what a device login sees of another device's transfer -----------------------------------------
class Eavesdropper:
    """Another provisioned device (its own valid login) that subscribes wherever it likes and
    records every message the broker delivers to it."""

    def __init__(self, config: BrokerConfig, fleet: str, device_id: str) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.received: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client = make_client(device_id, config, clean_start=True)
        self.client.on_message = self._on_message
        connect_blocking(self.client, config)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.received.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def subscribe(self, *filters: str) -> list[mqtt.ReasonCode]:
        """Subscribe to ``filters`` and return the SUBACK's reason codes."""
        acked = threading.Event()
        codes: list[mqtt.ReasonCode] = []

        def on_subscribe(client: mqtt.Client, userdata: object, mid: int, reasons: list[mqtt.ReasonCode],
                         props: object) -> None:
            codes.extend(reasons)
            acked.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe([(f, 1) for f in filters])
        if not acked.wait(WAIT_S):
            raise AssertionError(f"no SUBACK within {WAIT_S} s")
        return codes

    def request_index(self, package_id: str, block_size: int) -> None:
        """A legitimate request of its own (any device may write `packages/+/get`), answered on
        its own blocks topic."""
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = protocol.device_blocks(self.fleet, self.device_id)
        props.CorrelationData = b"eve"
        info = self.client.publish(protocol.package_get(self.fleet, package_id),
                                   BlockRequest(index=True, block_size=block_size).to_json(), qos=1, properties=props)
        info.wait_for_publish(WAIT_S)

    def wait_for(self, topic: str) -> bytes:
        with self.cond:
            if not self.cond.wait_for(lambda: any(t == topic for t, _ in self.received), WAIT_S):
                raise AssertionError(f"nothing on {topic} within {WAIT_S} s; got {self.topics()}")
            return next(payload for t, payload in self.received if t == topic)

    def topics(self) -> list[str]:
        with self.cond:
            return [t for t, _ in self.received]

    def close(self) -> None:
        disconnect(self.client)


def test_device_login_cannot_sniff_block_requests_or_replies(secure_mosquitto_session, fleet: str,  # noqa: ANN001
                                                            repository, device: Device,
                                                            published: PublishedPackage) -> None:
    """A second device, logged in with its own valid credentials, tries to watch the victim's
    transfer: the requests (directly, and by joining the well-known share group) and the replies
    (the victim's blocks topic, and every device's). The ACL lets a device write block requests but
    never read them, and read only its own blocks topic. Mosquitto 2.0 grants the SUBSCRIBEs and
    checks `read` on each message it would deliver, so the proof is that nothing arrives."""
    root = protocol.fleet_root(fleet)
    broker = secure_mosquitto_session
    eve_id = new_id("eve")
    eve = Eavesdropper(broker.config(*broker.provision(eve_id), **FAST), fleet, eve_id)
    own_blocks = protocol.device_blocks(fleet, eve.device_id)
    try:
        eve.subscribe(f"{root}/packages/+/get",
                      protocol.package_get_shared(fleet),  # the well-known group name, not the secret one
                      protocol.device_blocks(fleet, device.device_id),
                      protocol.devices_filter(fleet, "blocks"))  # every device's replies, its own included
        fetcher = device.new_fetcher()
        path = fetcher.fetch(device.spec(published))
        # The subscriptions were live all along: after the victim's last reply, eve asks for the
        # index herself and the answer reaches her through `devices/+/blocks`. Mosquitto delivers
        # to one client in order, so anything of the victim's would have come before it.
        eve.request_index(published.package_id, published.block_size)
        own_reply = BlockResponse.decode(eve.wait_for(own_blocks))
    finally:
        eve.close()

    assert sha256(path) == published.sha256
    assert (own_reply.status, own_reply.block) == (BlockStatus.OK, INDEX_BLOCK)
    # Nothing but her own reply: no request (not even her own), no block of the victim's.
    assert eve.topics() == [own_blocks]
    # Joining the well-known share group swallowed no request: the repository's group is secret.
    assert fetcher.stats.requests_reissued == 0


# -- forged replies --------------------------------------------------------------------------------
Answer = Callable[[BlockRequest, bytes], list[bytes]]


class RequestTap:
    """A client that reads every block request of ``fleet`` and answers each itself, through
    ``answer(request, correlation) -> [payload, ...]``, before the repository does. Only the
    fleet-service login may read `packages/+/get` and write to a device's blocks topic, so
    ``config`` is that login: a leaked fleet-service credential, or a broker without the policy."""

    def __init__(self, config: BrokerConfig, fleet: str, client_id: str, answer: Answer) -> None:
        self.answer = answer
        self.seen = 0
        self.lock = threading.Lock()
        self.client = make_client(client_id, config, clean_start=True)
        self.client.on_message = self._on_message
        connect_blocking(self.client, config)
        subscribed = threading.Event()
        granted: list[mqtt.ReasonCode] = []

        def on_subscribe(client: mqtt.Client, userdata: object, mid: int, reasons: list[mqtt.ReasonCode],
                         props: object) -> None:
            granted.extend(reasons)
            subscribed.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(f"{protocol.fleet_root(fleet)}/packages/+/get", qos=1)
        if not subscribed.wait(WAIT_S) or any(code.is_failure for code in granted):
            raise AssertionError(f"{client_id}: subscription to block requests not granted: {granted}")

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


def test_error_reply_injected_by_sniffer_is_retried_not_fatal(secure_mosquitto_session, fleet: str,  # noqa: ANN001
                                                              repository, device: Device,
                                                              published: PublishedPackage) -> None:
    """A client reading the block requests forges replies to each before the repository answers.
    It needs the fleet-service login (a leaked credential, or a broker without the policy): a
    device login sees no request (test_device_login_cannot_sniff_block_requests_or_replies)."""
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

    sniffer = RequestTap(fleet_service(secure_mosquitto_session), fleet, new_id("sniffer"), forge)
    try:
        fetcher = device.new_fetcher(window=4, max_retries=2, retry_base_s=0.2, retry_max_s=1.0)
        path = fetcher.fetch(device.spec(published))
    finally:
        sniffer.close()

    assert sha256(path) == published.sha256
    stats = fetcher.stats
    assert sniffer.seen >= stats.blocks_total // 4  # the forgeries really answered the requests
    assert stats.error_replies > 0 and stats.corrupt_blocks > 0
    assert stats.blocks_fetched == stats.blocks_total


def test_package_missing_from_repository_fails_after_bounded_backoff(repository, device: Device,  # noqa: ANN001
                                                                     published: PublishedPackage) -> None:
    missing = dataclasses.replace(device.spec(published), package_id="e" * 64)  # never published
    fetcher = device.new_fetcher(max_retries=2, **QUICK)
    started = time.monotonic()
    with pytest.raises(TransferError, match=r"the repository has no such package \(NOT_FOUND 3 times\)"):
        fetcher.fetch(missing)
    assert time.monotonic() - started < 5  # bounded: 2 backoffs of at most 0.2 s, not a stall
    assert fetcher.stats.retries == 2


# -- slow, stalled and returning repositories --------------------------------------------------------
class TricklingRepository:
    """Serves the real bytes to ``device``, but one block every ``interval_s`` (the index at once).
    Not a RepositoryServer: it logs in as the fleet service and reads the requests directly."""

    def __init__(self, broker, device: Device, published: PublishedPackage,  # noqa: ANN001
                 interval_s: float) -> None:
        self.data = published.path.read_bytes()
        self.index = b"".join(protocol.block_digests(published.path, published.block_size))
        self.reply_topic = protocol.device_blocks(device.fleet, device.device_id)
        self.interval_s = interval_s
        self.sent = 0
        self.pending: queue.Queue[tuple[bytes, int]] = queue.Queue()
        self.tap = RequestTap(fleet_service(broker), device.fleet, new_id("trickle-repo"), self._answer)
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
            self.tap.client.publish(self.reply_topic, BlockResponse(BlockStatus.OK, block, data).encode(),
                                    qos=1, properties=props)
            self.sent += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.tap.close()


def test_trickling_repository_is_abandoned_by_min_rate(secure_mosquitto_session, device: Device,  # noqa: ANN001
                                                       published: PublishedPackage) -> None:
    trickle = TricklingRepository(secure_mosquitto_session, device, published, interval_s=0.8)  # 80 KiB/s
    try:
        # stall_timeout_s far above the interval: only the rate rule can stop this fetch.
        fetcher = device.new_fetcher(stall_timeout_s=30, request_timeout_s=30, min_rate_bps=4 * BLOCK,
                                     rate_window_s=2, grace_s=2.5, checkpoint_every=1)
        started = time.monotonic()
        with pytest.raises(TransferStalledError, match=r"too slow: \d+ B/s over the last 2 s, below the minimum"):
            fetcher.fetch(device.spec(published))
        elapsed = time.monotonic() - started
    finally:
        trickle.close()

    assert elapsed < 6  # grace 2.5 s + one check; not the 30 s stall timeout
    assert fetcher.stats.blocks_fetched >= 1  # it was a trickle, not silence
    downloads = device.data_dir / "downloads"
    assert (downloads / f"{published.package_id}.part").exists()  # kept for resume
    assert (downloads / f"{published.package_id}.blocks").exists()


def test_slow_transfer_is_abandoned_at_its_deadline(secure_mosquitto_session, device: Device,  # noqa: ANN001
                                                    published: PublishedPackage) -> None:
    trickle = TricklingRepository(secure_mosquitto_session, device, published, interval_s=0.3)
    try:
        fetcher = device.new_fetcher(stall_timeout_s=30, request_timeout_s=30, min_rate_bps=0, deadline_s=1.5)
        with pytest.raises(TransferStalledError, match=r"not done within the deadline of 1\.5 s"):
            fetcher.fetch(device.spec(published))
    finally:
        trickle.close()
    assert 0 < fetcher.stats.elapsed_s < 3


def test_stalled_transfer_resumes_when_repository_returns(secure_mosquitto_session, fleet: str,  # noqa: ANN001
                                                          device: Device, published: PublishedPackage) -> None:
    server = repository_server(secure_mosquitto_session, fleet, published.path.parent)
    server.start()
    stopper: list[threading.Thread] = []

    def stop_repository_at_block_10(progress: Progress) -> None:
        if progress.blocks_done >= 10 and not stopper:
            stopper.append(threading.Thread(target=server.stop))
            stopper[0].start()

    first = device.new_fetcher(window=4, stall_timeout_s=1.5, request_timeout_s=0.5, min_rate_bps=0)
    with pytest.raises(TransferStalledError, match=r"stalled: no block for 1\.5 s \(\d+/\d+ blocks\)"):
        first.fetch(device.spec(published), stop_repository_at_block_10)
    stopper[0].join(10)
    kept = first.stats.blocks_fetched
    assert 10 <= kept < first.stats.blocks_total

    with repository_server(secure_mosquitto_session, fleet, published.path.parent) as again:
        second = device.new_fetcher()
        path = second.fetch(device.spec(published))
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
    statement = device.spec(published)
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
        fetcher.fetch(device.spec(published), lambda p: p.blocks_done == 4 and fetcher.cancel())
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

    path = fetcher.fetch(device.spec(published), prune_midway)
    assert pruned == [0] and sha256(path) == published.sha256


def test_transfer_limits_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match="deadline_s"):
        TransferLimits(deadline_s=0)
    with pytest.raises(ConfigError, match="no_such_limit"):
        PackageFetcher(None, "lab", "pi-7", "/tmp", no_such_limit=1)  # type: ignore[arg-type]
