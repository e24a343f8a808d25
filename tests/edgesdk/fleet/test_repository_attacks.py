"""The repository server against hostile requesters, over a real Mosquitto: floods, forged response
topics (amplification) and malformed requests. Named after the attack (python-tuf style).

What the server cannot prevent (it cannot see who published a request): a client that may publish
block requests can spend another device's budget, so the victim's own downloads slow to the
per-device rate. What it does prevent: sending any device more than burst + rate x time, and one
requester delaying the others."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.fleet.repository import PublishedPackage, RepositoryServer, publish_package
from edgesdk.protocol import BlockResponse, BlockStatus
from edgesdk.signing import generate_keys, load_private_key
from tests.fixtures.packages import random_package

FLEET = "attack-fleet"
BLOCK = 16 * 1024
HEADER = protocol.HEADER_SIZE


@pytest.fixture
def published(tmp_path: Path) -> PublishedPackage:
    keys = generate_keys(tmp_path / "keys")
    pkg = random_package(tmp_path / "demo.edgepkg", load_private_key(keys.private_path), size=600_000)
    return publish_package(pkg, tmp_path / "repo", block_size=BLOCK)


class Peer:
    """A client of the broker: publishes raw block requests and records what arrives on its topics."""

    def __init__(self, url: str, client_id: str, listen: str | None = None) -> None:
        self.config = parse_broker_url(url)
        self.cond = threading.Condition()
        self.replies: list[tuple[bytes, BlockResponse]] = []
        self.bytes = 0
        self.client = make_client(client_id, self.config, clean_start=True, max_inflight=1000)
        self.client.on_message = self._on_message
        connect_blocking(self.client, self.config)
        if listen is not None:
            subscribed = threading.Event()
            self.client.on_subscribe = lambda *args: subscribed.set()
            self.client.subscribe(listen, qos=1)
            assert subscribed.wait(5)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.bytes += len(msg.payload)
            self.replies.append((getattr(msg.properties, "CorrelationData", b"") or b"",
                                 BlockResponse.decode(msg.payload)))
            self.cond.notify_all()

    def request(self, package_id: str, payload: bytes, correlation: bytes | None = b"c",
                reply_to: str | None = None) -> mqtt.MQTTMessageInfo:
        props = Properties(PacketTypes.PUBLISH)
        if reply_to is not None:
            props.ResponseTopic = reply_to
        if correlation is not None:
            props.CorrelationData = correlation
        return self.client.publish(f"{protocol.fleet_root(FLEET)}/packages/{package_id}/get", payload, qos=1,
                                   properties=props)

    def wait_for(self, correlation: bytes, count: int = 1, timeout_s: float = 5.0) -> list[BlockResponse]:
        with self.cond:
            assert self.cond.wait_for(lambda: sum(c == correlation for c, _ in self.replies) >= count, timeout_s), \
                f"no reply for {correlation!r} within {timeout_s} s"
            return [r for c, r in self.replies if c == correlation]

    def close(self) -> None:
        disconnect(self.client)


def blocks_topic(device_id: str) -> str:
    return protocol.device_blocks(FLEET, device_id)


def wait_until(predicate, timeout_s: float = 10.0) -> None:  # noqa: ANN001
    """Bounded wait on another thread's counters (the server exposes no event for 'processed')."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def peers(mosquitto) -> Iterator[list[Peer]]:  # noqa: ANN001
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


def test_one_requester_flooding_is_rate_limited_and_others_still_served(mosquitto, published: PublishedPackage,  # noqa: ANN001
                                                                       peers: list[Peer]) -> None:
    rate, burst = 40, 40  # blocks per second, per requester
    flooder = Peer(mosquitto.url, "flooder", listen=blocks_topic("flooder"))
    honest = Peer(mosquitto.url, "honest", listen=blocks_topic("honest"))
    peers += [flooder, honest]
    with RepositoryServer(parse_broker_url(mosquitto.url), FLEET, published.path.parent, blocks_per_s=rate,
                          burst_blocks=burst, bytes_per_s=rate * BLOCK, burst_bytes=burst * BLOCK,
                          max_delay_s=0.2) as server:
        started = time.monotonic()
        flood = json.dumps({"blocks": list(range(16))}).encode()
        for i in range(150):  # 2400 blocks asked for in a moment
            flooder.request(published.package_id, flood, f"f{i}".encode(), blocks_topic("flooder"))
        honest.request(published.package_id, b'{"blocks": [1, 2, 3]}', b"h", blocks_topic("honest"))

        first = honest.wait_for(b"h", count=3, timeout_s=5)[0]  # served despite the flood
        wait_until(lambda: server.stats.requests >= 151)
        elapsed = time.monotonic() - started
        with flooder.cond:
            flooded = sum(r.status == BlockStatus.OK for _, r in flooder.replies)

    assert first.status == BlockStatus.OK
    assert server.stats.rate_limited > 0
    # At most the burst, the refill over the time it ran, and one request's overshoot.
    assert flooded <= burst + rate * elapsed + 16, (flooded, elapsed)
    assert flooded < 150 * 16 / 4


def test_request_with_foreign_response_topic_is_bounded(mosquitto, published: PublishedPackage,  # noqa: ANN001
                                                        peers: list[Peer]) -> None:
    # Tiny requests naming the victim's blocks topic: each asks for 16 blocks (the per-request cap).
    rate_bytes, burst_bytes = 8 * BLOCK, 16 * BLOCK
    victim = Peer(mosquitto.url, "victim", listen=blocks_topic("victim"))
    attacker = Peer(mosquitto.url, "attacker")
    peers += [victim, attacker]
    with RepositoryServer(parse_broker_url(mosquitto.url), FLEET, published.path.parent,
                          bytes_per_s=rate_bytes, burst_bytes=burst_bytes, max_delay_s=0.2) as server:
        started = time.monotonic()
        request = json.dumps({"blocks": list(range(16))}).encode()
        assert len(request) < 80
        for i in range(60):
            attacker.request(published.package_id, request, f"a{i}".encode(), blocks_topic("victim"))
        too_many = json.dumps({"blocks": list(range(17))}).encode()
        attacker.request(published.package_id, too_many, b"big", blocks_topic("victim"))
        wait_until(lambda: server.stats.requests >= 61)
        [refused] = victim.wait_for(b"big")
        elapsed = time.monotonic() - started
        with victim.cond:
            received = victim.bytes

    assert refused.status == BlockStatus.BAD_REQUEST  # a request over the cap costs one short reply
    assert server.stats.rate_limited > 0
    one_request = 16 * (BLOCK + HEADER)
    assert received <= burst_bytes + rate_bytes * elapsed + one_request + 600, (received, elapsed)
    assert received < 60 * one_request / 4  # far from what was asked for


MALFORMED = [
    ("not JSON", b"not json"),
    ("invalid UTF-8", b'{"blocks": [1], "x": "\xff\xfe"}'),
    ("huge JSON", json.dumps({"blocks": [1], "pad": "x" * 200_000}).encode()),
    ("deep nesting", b"[" * 3000 + b"]" * 3000),
    ("deep nesting in a field", b'{"blocks": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
    ("wrong types", b'{"blocks": "all", "index": "yes", "block_size": [1]}'),
    ("boolean block numbers", b'{"blocks": [true, false]}'),
    ("negative and huge block numbers", b'{"blocks": [-1, 99999999999999999999]}'),
    ("a number with 4000 digits", b'{"blocks": [' + b"9" * 4000 + b"]}"),
    ("NaN", b'{"blocks": [NaN]}'),
    ("a JSON array", b"[1, 2, 3]"),
    ("empty", b""),
]


def test_malformed_requests_do_not_kill_repository(mosquitto, published: PublishedPackage,  # noqa: ANN001
                                                   peers: list[Peer]) -> None:
    device = Peer(mosquitto.url, "dev-m", listen=blocks_topic("dev-m"))
    peers.append(device)
    reply_to = blocks_topic("dev-m")
    with RepositoryServer(parse_broker_url(mosquitto.url), FLEET, published.path.parent) as server:
        for i, (_, payload) in enumerate(MALFORMED):
            device.request(published.package_id, payload, f"m{i}".encode(), reply_to)
        device.request(published.package_id, b'{"blocks": [0]}', b"no-response-topic", reply_to=None)
        device.request(published.package_id, b'{"blocks": [0]}', b"x" * 65, reply_to)  # > 64 B correlation
        device.request(published.package_id, b'{"blocks": [0]}', b"other-fleet",
                       reply_to=protocol.device_blocks("other", "dev-m"))
        device.request("not-a-package-id", b'{"index": true}', b"bad-id", reply_to)
        device.request(published.package_id, b'{"blocks": [0]}', b"good", reply_to)

        [good] = device.wait_for(b"good")  # answered after all of the above
        for i, (why, _) in enumerate(MALFORMED):
            [reply] = device.wait_for(f"m{i}".encode())
            assert reply.status == BlockStatus.BAD_REQUEST and reply.payload, why
        [missing] = device.wait_for(b"bad-id")
        assert server._worker is not None and server._worker.is_alive()
        assert server._client is not None and server._client.is_connected()
        stats = server.stats

    assert good.status == BlockStatus.OK and good.payload == published.path.read_bytes()[:BLOCK]
    assert missing.status == BlockStatus.NOT_FOUND
    assert stats.bad_requests == len(MALFORMED) + 1  # + the oversized correlation data
    assert stats.dropped == 2  # no response topic; a topic outside this fleet's devices
