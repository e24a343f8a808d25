"""Package repository, deploy and the protocol's messages, against a real Mosquitto."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.errors import BrokerError, ConfigError, IntegrityError, PackageError, ProtocolError, SignatureError
from edgesdk.fleet.deploy import deploy
from edgesdk.fleet.repository import RepositoryServer, find_package, publish_package
from edgesdk.protocol import BlockResponse, BlockStatus, DeploymentStatement, InstallEvent, SignedStatement, TelemetryWindow
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from tests.fixtures.packages import random_package

FLEET = "test-fleet"
BLOCK = 64 * 1024


def make_package(tmp: Path, size: int = 2 * 1024 * 1024, name: str = "demo", keys_dir: Path | None = None) -> tuple[Path, Path]:
    """A signed .edgepkg with one random 'model' file; returns (package path, public key path)."""
    keys = generate_keys(keys_dir or tmp / "keys", overwrite=True)
    pkg = random_package(tmp / f"{name}.edgepkg", load_private_key(keys.private_path), size=size, name=name)
    return pkg, keys.public_path


# -- publish ---------------------------------------------------------------------------------------
def test_publish_verifies_and_stores_package_under_its_sha256(tmp_path: Path) -> None:
    pkg, pub = make_package(tmp_path)
    published = publish_package(pkg, tmp_path / "repo", [load_public_key(pub)], block_size=BLOCK)

    digest = hashlib.sha256(pkg.read_bytes()).hexdigest()
    assert published.package_id == published.sha256 == digest
    assert published.path == tmp_path / "repo" / f"{digest}.edgepkg"
    assert published.path.read_bytes() == pkg.read_bytes()
    assert published.signer is not None
    meta = json.loads((tmp_path / "repo" / f"{digest}.json").read_text())
    assert (meta["name"], meta["size"], meta["block_size"]) == ("demo", pkg.stat().st_size, BLOCK)
    index = b"".join(protocol.block_digests(pkg, BLOCK))
    assert (tmp_path / "repo" / f"{digest}.index").read_bytes() == index
    assert meta["blocks_digest"] == hashlib.sha256(index).hexdigest()
    assert publish_package(pkg, tmp_path / "repo", [load_public_key(pub)], block_size=BLOCK) == published


def test_rejects_package_signed_by_unknown_key_and_stores_nothing(tmp_path: Path) -> None:
    pkg, _ = make_package(tmp_path)
    other = generate_keys(tmp_path / "other").public_path
    with pytest.raises(SignatureError):
        publish_package(pkg, tmp_path / "repo", [load_public_key(other)])
    assert list((tmp_path / "repo").iterdir()) == []


def test_rejects_tampered_package_file(tmp_path: Path) -> None:
    pkg, pub = make_package(tmp_path, size=100_000)
    data = bytearray(pkg.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the model file's bytes
    pkg.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        publish_package(pkg, tmp_path / "repo", [load_public_key(pub)])
    assert list((tmp_path / "repo").iterdir()) == []


def test_rejects_file_that_is_not_a_package(tmp_path: Path) -> None:
    junk = tmp_path / "junk.edgepkg"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(PackageError):
        publish_package(junk, tmp_path / "repo")


def test_find_package_by_prefix_or_path(tmp_path: Path) -> None:
    pkg, _ = make_package(tmp_path, size=10_000)
    published = publish_package(pkg, tmp_path / "repo")
    assert find_package(tmp_path / "repo", published.package_id[:8]) == published
    assert find_package(tmp_path / "repo", pkg) == published
    with pytest.raises(PackageError, match="too short"):
        find_package(tmp_path / "repo", published.package_id[:3])
    with pytest.raises(PackageError, match="matches 0"):
        find_package(tmp_path / "repo", "0" * 12 if not published.package_id.startswith("0") else "1" * 12)


# -- the server ---------------------------------------------------------------------------------------
class Requester:
    """A device-like client that sends raw requests and collects replies on its blocks topic."""

    def __init__(self, url: str, device_id: str = "dev-raw") -> None:
        self.config = parse_broker_url(url)
        self.reply_topic = protocol.device_blocks(FLEET, device_id)
        self.replies: list[tuple[bytes, BlockResponse]] = []
        self.cond = threading.Condition()
        self.client = make_client(device_id, self.config, clean_start=True)
        self.client.on_message = self._on_message
        connect_blocking(self.client, self.config)
        self.client.subscribe(self.reply_topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.replies.append((getattr(msg.properties, "CorrelationData", b""), BlockResponse.decode(msg.payload)))
            self.cond.notify_all()

    def ask(self, package_id: str, payload: bytes, correlation: bytes, reply_to: str | None = None,
            expect: int = 1) -> list[BlockResponse]:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_to or self.reply_topic
        props.CorrelationData = correlation
        self.client.publish(f"{protocol.fleet_root(FLEET)}/packages/{package_id}/get", payload, qos=1,
                            properties=props).wait_for_publish(5)
        with self.cond:
            assert self.cond.wait_for(lambda: sum(c == correlation for c, _ in self.replies) >= expect, 5)
            return [r for c, r in self.replies if c == correlation]

    def close(self) -> None:
        disconnect(self.client)


@pytest.fixture
def served(tmp_path: Path, mosquitto):  # noqa: ANN001, ANN201
    pkg, _ = make_package(tmp_path, size=300_000)
    published = publish_package(pkg, tmp_path / "repo", block_size=BLOCK)
    server = RepositoryServer(parse_broker_url(mosquitto.url), FLEET, tmp_path / "repo")
    server.start()
    requester = Requester(mosquitto.url)
    yield published, server, requester
    requester.close()
    server.stop()


@pytest.mark.parametrize("payload, why", [
    (b"not json", "bad JSON"),
    (b'{"index": true, "blocks": [1]}', "both index and blocks"),
    (b'{"blocks": []}', "neither"),
    (b'{"blocks": [1, 1]}', "a block twice"),
    (b'{"blocks": ["1"]}', "wrong type"),
    (json.dumps({"blocks": list(range(17))}).encode(), "more than the server's 16 per request"),
    (b'{"blocks": [0], "block_size": 1048576}', "another block size"),
])
def test_malformed_block_request_is_answered_bad_request(served, payload: bytes, why: str) -> None:  # noqa: ANN001
    published, server, requester = served
    [reply] = requester.ask(published.package_id, payload, b"corr-" + why.encode()[:20])
    assert reply.status == BlockStatus.BAD_REQUEST, why
    assert reply.payload  # a one-line reason for whoever reads the traffic
    assert server.stats.bad_requests == 1


def test_unknown_package_and_block_past_the_end_are_answered(served) -> None:  # noqa: ANN001
    published, _, requester = served
    [missing] = requester.ask("f" * 64, b'{"index": true}', b"c1")
    assert missing.status == BlockStatus.NOT_FOUND
    [traversal] = requester.ask("..", b'{"index": true}', b"c2")
    assert traversal.status == BlockStatus.NOT_FOUND
    last = (published.size - 1) // BLOCK
    replies = requester.ask(published.package_id, json.dumps({"blocks": [last, last + 1]}).encode(), b"c3", expect=2)
    assert [(r.status, r.block) for r in replies] == [(BlockStatus.OK, last), (BlockStatus.OUT_OF_RANGE, last + 1)]
    assert len(replies[0].payload) == published.size - last * BLOCK


def test_serves_index_and_blocks_that_match_the_published_file(served) -> None:  # noqa: ANN001
    published, _, requester = served
    [index] = requester.ask(published.package_id, b'{"index": true}', b"i")
    assert index.block == protocol.INDEX_BLOCK
    assert protocol.index_digest(index.payload) == published.blocks_digest
    [block] = requester.ask(published.package_id, b'{"blocks": [2]}', b"b")
    assert block.payload == published.path.read_bytes()[2 * BLOCK:3 * BLOCK]


def test_never_reflects_blocks_onto_a_topic_outside_a_devices_blocks(served, mosquitto) -> None:  # noqa: ANN001
    published, server, requester = served
    victim = Requester(mosquitto.url, "victim")
    victim.client.subscribe("elsewhere/#", qos=1)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData = "elsewhere/flood", b"evil"
    requester.client.publish(protocol.package_get(FLEET, published.package_id), b'{"blocks": [0]}', qos=1,
                             properties=props).wait_for_publish(5)
    requester.ask(published.package_id, b'{"blocks": [1]}', b"after")  # served after the hostile one
    victim.close()
    assert server.stats.dropped == 1
    assert not any(c == b"evil" for c, _ in victim.replies)


# -- deploy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("broker_restarts", [False, True], ids=["same-broker", "after-clean-restart"])
def test_deploy_writes_retained_desired_that_a_late_subscriber_receives(tmp_path: Path, mosquitto,  # noqa: ANN001
                                                                        broker_restarts: bool) -> None:
    pkg, _ = make_package(tmp_path, size=10_000)
    published = publish_package(pkg, tmp_path / "repo")
    config = parse_broker_url(mosquitto.url)
    fleet_key = load_private_key(generate_keys(tmp_path / "fleet", role="fleet").private_path)
    sent = deploy(config, FLEET, ["dev-a", "dev-b"], published, fleet_key, rollout_id="r1", timeout_s=5)["dev-b"]
    if broker_restarts:
        mosquitto.restart()  # SIGTERM saves the persistence database; the start loads it

    got: list[SignedStatement] = []
    arrived = threading.Event()
    late = make_client("dev-b", config, clean_start=True)

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        got.append(SignedStatement.from_json(msg.payload, msg.topic))
        arrived.set()

    late.on_message = on_message
    connect_blocking(late, config)
    late.subscribe(protocol.device_desired(FLEET, "dev-b", published.name), qos=1)
    assert arrived.wait(5)
    disconnect(late)
    assert got == [sent]
    statement = sent.statement
    assert (statement.device, statement.package_id, statement.rollout_id, statement.block_size) == (
        "dev-b", published.package_id, "r1", published.block_size)


def test_deploy_to_unreachable_broker_fails_with_one_line(tmp_path: Path, mosquitto) -> None:  # noqa: ANN001
    pkg, _ = make_package(tmp_path, size=10_000)
    published = publish_package(pkg, tmp_path / "repo")
    mosquitto.kill()
    with pytest.raises(BrokerError, match=r"cannot reach broker mqtt://127\.0\.0\.1:\d+: connection refused"):
        fleet_key = load_private_key(generate_keys(tmp_path / "fleet", role="fleet").private_path)
        deploy(parse_broker_url(mosquitto.url), FLEET, ["dev-a"], published, fleet_key, timeout_s=2)


# -- broker URLs and protocol messages -------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://h", "mqtt://h:99999", "mqtt://h:0", "mqtt:///", "mqtt://h/path"])
def test_rejects_bad_broker_url(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_broker_url(url)


def test_parses_broker_url_with_credentials_and_tls_default_port() -> None:
    config = parse_broker_url("mqtts://ops:s%40cret@broker.example")
    assert (config.host, config.port, config.username, config.password) == ("broker.example", 8883, "ops", "s@cret")
    assert config.url == "mqtts://broker.example:8883"  # never the password


STATEMENT = DeploymentStatement("f", "d", "a" * 64, "m", "1", "pi", 1000, 4096, "b" * 64, 1, 1.0, 2.0).to_json()


@pytest.mark.parametrize("cls, raw, field", [
    (DeploymentStatement, b"{oops", "not valid JSON"),
    (DeploymentStatement, b"[1]", "JSON object"),
    (DeploymentStatement, STATEMENT.replace(b'"blocks_digest"', b'"blocks_dgst"'), "'blocks_digest'"),
    (DeploymentStatement, STATEMENT.replace(b'"size":1000', b'"size":"1000"'), "'size'"),
    (DeploymentStatement, STATEMENT.replace(b'"size":1000', b'"size":-1'), "'size'"),
    (DeploymentStatement, STATEMENT.replace(b'"a' + b"a" * 63, b'"A' + b"a" * 63, 1), "package_id"),
    (InstallEvent, b'{"kind":"exploded","package_id":"x","at":1}', "'kind'"),
    (InstallEvent, b'{"kind":"failed","at":1}', "'package_id'"),
    (TelemetryWindow, b'{"seq":1,"window_start":0,"window_end":1,"count":true,"errors":0}', "'count'"),
])
def test_protocol_messages_reject_malformed_json_naming_the_field(cls, raw: bytes, field: str) -> None:  # noqa: ANN001
    with pytest.raises(ProtocolError, match="edgesdk/v1/f/devices/d/x") as err:
        cls.from_json(raw, "edgesdk/v1/f/devices/d/x")
    assert field in str(err.value)


def test_block_response_framing_rejects_truncation_and_bad_magic() -> None:
    framed = BlockResponse(BlockStatus.OK, 7, b"abc").encode()
    assert BlockResponse.decode(framed) == BlockResponse(BlockStatus.OK, 7, b"abc")
    for bad in (framed[:-1], b"XX" + framed[2:], framed[:5]):
        with pytest.raises(ProtocolError):
            BlockResponse.decode(bad)


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "$SYS", "x" * 200])
def test_topic_builders_refuse_ids_that_escape_their_topic_level(bad: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.device_state(FLEET, bad)
