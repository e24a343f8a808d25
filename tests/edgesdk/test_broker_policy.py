"""The broker policy `edgesdk broker config` ships, attacked on a real Mosquitto started with exactly
the files it writes (tests/fixtures/broker.py: SecureMosquitto): TLS, passwords, the ACL, packet cap.

How a denial is seen: Mosquitto 2.0 answers a QoS 1 PUBLISH the ACL refuses with PUBACK 0x87 (Not
authorized). Its acl_file grants every SUBSCRIBE (SUBACK 0x01) and checks `read` on each message
it delivers, so for reads the test asserts that nothing arrives, behind a barrier: a legitimate
message sent afterwards by the same publisher to the same client (a broker delivers one
publisher's messages to one subscriber in order), so "nothing arrived" is not "not yet".
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shlex
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from typer.testing import CliRunner

from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client
from edgesdk.cli.main import app
from edgesdk.errors import BrokerError, ConfigError
from edgesdk.fleet.broker_policy import DEVICE_RULES, SERVICE_RULES, BrokerSetup, render_acl, write_broker_config
from edgesdk.fleet.certificates import create_ca
from edgesdk.fleet.mosquitto_passwd import check_password, hash_password, read_password_file
from edgesdk.signing import generate_keys

WAIT_S = 10.0
NOT_AUTHORIZED = 0x87
ACCEPTED = (0x00, 0x10)  # Success, No matching subscribers: both mean the broker took the message
REPO = Path(__file__).resolve().parents[2]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Client:
    """A paho client that records what arrives, PUBACK/SUBACK reason codes and disconnects."""

    def __init__(self, broker, username: str | None, password: str | None, client_id: str | None = None,
                 clean_start: bool = True, **settings) -> None:
        self.config = broker.config(username, password, **settings)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.pubacks: dict[int, queue.Queue[int]] = {}
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.disconnected = threading.Event()
        self.client = make_client(client_id or unique(username or "anon"), self.config, clean_start=clean_start)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_publish = lambda c, u, mid, rc, props: self._ack(mid).put(rc.value)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put([rc.value for rc in rcs])
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnected.set()

    def _ack(self, mid: int) -> queue.Queue[int]:
        return self.pubacks.setdefault(mid, queue.Queue())

    def __enter__(self) -> Client:
        connect_blocking(self.client, self.config)
        return self

    def __exit__(self, *exc: object) -> None:
        disconnect(self.client)

    def subscribe(self, *topics: str) -> list[int]:
        codes: list[int] = []
        for topic in topics:
            self.client.subscribe(topic, qos=1)
            codes += self.subacks.get(timeout=WAIT_S)
        return codes

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._ack(info.mid).get(timeout=WAIT_S)

    def next_message(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT_S)

    def drain(self) -> list[tuple[str, bytes]]:
        got = []
        while not self.messages.empty():
            m = self.messages.get_nowait()
            got.append((m.topic, m.payload))
        return got


def barrier(sender: Client, receiver: Client, topic: str) -> list[tuple[str, bytes]]:
    """Send a marker from ``sender`` on ``topic`` (which ``receiver`` may read) and return everything
    ``receiver`` got before it: whatever the broker delivered earlier is in that list."""
    marker = unique("barrier").encode()
    assert sender.publish(topic, marker) == 0, "the barrier needs the receiver subscribed to its topic"
    before = []
    while True:
        m = receiver.next_message()
        if m.payload == marker:
            return before
        before.append((m.topic, m.payload))


@pytest.fixture
def broker(secure_mosquitto_session):
    return secure_mosquitto_session


@pytest.fixture
def fleet() -> str:
    return unique("f")


# -- authentication and TLS ---------------------------------------------------------------------


def test_anonymous_client_is_refused(broker):
    with pytest.raises(BrokerError, match="refused the connection"):
        with Client(broker, None, None):
            pass


def test_wrong_password_is_refused(broker):
    device, _ = broker.provision(unique("dev"))
    with pytest.raises(BrokerError, match="refused the connection"):
        with Client(broker, device, "not-the-password"):
            pass


def test_wrong_ca_is_refused(broker, tmp_path: Path):
    from cryptography.hazmat.primitives import serialization

    _, other_ca = create_ca("someone else's CA")
    other = tmp_path / "other-ca.crt"
    other.write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    user, password = broker.operator
    from edgesdk.broker import TlsConfig, parse_broker_url

    config = parse_broker_url(broker.url, tls=TlsConfig(ca_file=other), username=user, password=password)
    with pytest.raises(BrokerError) as err:
        connect_blocking(make_client(unique("op"), config, clean_start=True), config)
    assert str(err.value).startswith(f"cannot reach broker {broker.url}: TLS")
    assert "\n" not in str(err.value)


def test_wrong_host_name_is_refused(broker):
    # The broker's certificate names localhost only; 127.0.0.1 is the same listener under a name
    # the certificate does not carry, as a man in the middle with another valid certificate would be.
    user, password = broker.operator
    with pytest.raises(BrokerError) as err:
        with Client(broker, user, password, host="127.0.0.1"):
            pass
    assert str(err.value).startswith(f"cannot reach broker mqtts://127.0.0.1:{broker.port}: TLS")
    assert "mismatch" in str(err.value)


# -- the ACL --------------------------------------------------------------------------------------


def test_device_cannot_publish_another_devices_state(broker, fleet):
    a, a_pw = broker.provision(unique("dev-a"))
    b, _ = broker.provision(unique("dev-b"))
    with Client(broker, *broker.operator) as operator, Client(broker, a, a_pw, client_id=a) as device:
        operator.subscribe(protocol.devices_filter(fleet, "state"))

        forged = device.publish(protocol.device_state(fleet, b), b'{"device_id": "x", "online": false}', retain=True)

        assert forged == NOT_AUTHORIZED
        assert barrier(device, operator, protocol.device_state(fleet, a)) == []


def test_device_reads_but_cannot_write_its_own_desired(broker, fleet):
    a, a_pw = broker.provision(unique("dev-a"))
    det, ocr = protocol.device_desired(fleet, a, "det"), protocol.device_desired(fleet, a, "ocr")
    with Client(broker, *broker.fleet_service) as service, Client(broker, *broker.operator) as operator, \
            Client(broker, a, a_pw, client_id=a) as device:
        device.subscribe(protocol.device_desired_filter(fleet, a))  # what the agent subscribes to

        codes = [device.publish(det, b'{"forged": 1}', retain=True), device.publish(ocr, b"", retain=True)]
        assert codes == [NOT_AUTHORIZED, NOT_AUTHORIZED]
        # The fleet service and operators may write any model's statement; the device reads each.
        assert operator.publish(ocr, b"from the operator") == 0
        assert barrier(service, device, det) == [(ocr, b"from the operator")]


def test_device_cannot_read_another_devices_desired_or_blocks(broker, fleet):
    a, a_pw = broker.provision(unique("dev-a"))
    b, b_pw = broker.provision(unique("dev-b"))
    b_topics = [protocol.device_desired(fleet, b, "det"), protocol.device_desired(fleet, b, "ocr"),
                protocol.device_blocks(fleet, b)]
    with Client(broker, *broker.fleet_service) as service, \
            Client(broker, a, a_pw, client_id=a) as thief, Client(broker, b, b_pw, client_id=b) as owner:
        owner.subscribe(*b_topics)
        thief.subscribe(*b_topics, protocol.device_desired_filter(fleet, b),
                        protocol.devices_filter(fleet, "desired/+"), f"{protocol.fleet_root(fleet)}/#", "#")

        for topic in b_topics:
            assert service.publish(topic, b"for b only", retain=topic != b_topics[-1]) == 0

        assert [owner.next_message().topic for _ in b_topics] == b_topics  # delivered to its owner
        assert barrier(service, thief, protocol.device_desired(fleet, a, "det")) == []
    # Retained copies are checked too when a new subscription would deliver them.
    with Client(broker, *broker.fleet_service) as service, Client(broker, a, a_pw, client_id=a) as late:
        late.subscribe(*b_topics, protocol.device_blocks(fleet, a))
        assert barrier(service, late, protocol.device_blocks(fleet, a)) == []


def test_device_cannot_join_repository_shared_subscription(broker, fleet):
    a, a_pw = broker.provision(unique("dev-a"))
    b, b_pw = broker.provision(unique("dev-b"))
    requests = f"{protocol.fleet_root(fleet)}/packages/+/get"
    get = protocol.package_get(fleet, "ab" * 32)
    with Client(broker, *broker.fleet_service) as repository, \
            Client(broker, a, a_pw, client_id=a) as thief, Client(broker, b, b_pw, client_id=b) as requester:
        repository.subscribe(f"$share/{broker.share_group}/{requests}")
        thief.subscribe(protocol.package_get_shared(fleet), requests,  # the well-known group, and plainly
                        protocol.device_blocks(fleet, a))

        sent = [f"request {i}".encode() for i in range(20)]
        assert all(requester.publish(get, payload) in ACCEPTED for payload in sent)

        assert [repository.next_message().payload for _ in sent] == sent  # every request, none diverted
        assert barrier(repository, thief, protocol.device_blocks(fleet, a)) == []
        # Nor may a device answer another device's block request.
        assert thief.publish(protocol.device_blocks(fleet, b), b"forged block") == NOT_AUTHORIZED


def test_device_with_spoofed_client_id_gets_only_its_own_topics(broker, fleet):
    a, a_pw = broker.provision(unique("dev-a"))
    b, b_pw = broker.provision(unique("dev-b"))
    desired_b, other_b = protocol.device_desired(fleet, b, "det"), protocol.device_desired(fleet, b, "ocr")
    desired_a = protocol.device_desired(fleet, a, "det")
    # B has a persistent session with a message queued for it while it is away.
    with Client(broker, b, b_pw, client_id=b, clean_start=False) as owner:
        owner.subscribe(desired_b)
    with Client(broker, *broker.fleet_service) as service:
        assert service.publish(desired_b, b"queued for b") in ACCEPTED
        assert service.publish(other_b, b"retained for b", retain=True) in ACCEPTED

        # A logs in with its own password but B's client id, resuming "B's" session.
        with Client(broker, a, a_pw, client_id=b, clean_start=False) as spoofer, \
                Client(broker, *broker.operator) as operator:
            spoofer.subscribe(desired_b, protocol.device_desired_filter(fleet, b), protocol.device_blocks(fleet, b),
                              desired_a)
            operator.subscribe(protocol.devices_filter(fleet, "state"))

            assert spoofer.publish(protocol.device_state(fleet, b), b'{"online": false}') == NOT_AUTHORIZED
            assert barrier(service, spoofer, desired_a) == []
            # Its own topics are still its own: the ACL follows the username, not the client id.
            assert spoofer.publish(protocol.device_state(fleet, a), b"own state") == 0
            assert operator.next_message().topic == protocol.device_state(fleet, a)


def test_only_fleet_service_and_operator_write_trust_roots(broker, fleet):
    a, a_pw = broker.provision(unique("dev-a"))
    trust = f"{protocol.fleet_root(fleet)}/trust/root"
    with Client(broker, *broker.operator) as operator, Client(broker, a, a_pw, client_id=a) as device:
        device.subscribe(trust)
        assert device.publish(trust, b'{"forged": "root"}', retain=True) == NOT_AUTHORIZED
        assert barrier(operator, device, trust) == []  # the device reads what the operator publishes


def test_oversized_packet_is_refused(broker, fleet):
    a, a_pw = broker.provision(unique("dev-a"))
    telemetry = protocol.device_telemetry(fleet, a)
    limit = json.loads((broker.folder / "broker.json").read_text())["max_packet_size"]
    with Client(broker, *broker.operator) as operator:
        operator.subscribe(telemetry)
        with Client(broker, a, a_pw, client_id=a) as device:
            device.client.publish(telemetry, b"x" * limit, qos=1)

            assert device.disconnected.wait(WAIT_S), "the broker kept a client that sent an oversized packet"
        with Client(broker, a, a_pw, client_id=a) as device:
            assert barrier(device, operator, telemetry) == []


def test_block_sized_packets_pass_and_a_client_cap_is_honoured(broker, fleet):
    a, a_pw = broker.provision(unique("dev-a"))
    blocks = protocol.device_blocks(fleet, a)
    block = os.urandom(protocol.BLOCK_SIZE) + b"\0" * protocol.HEADER_SIZE
    with Client(broker, *broker.fleet_service) as service, \
            Client(broker, a, a_pw, client_id=a) as device, \
            Client(broker, a, a_pw, client_id=unique(a), max_packet_size=64 * 1024) as small:
        device.subscribe(blocks)
        small.subscribe(blocks)

        assert service.publish(blocks, block) == 0

        assert device.next_message().payload == block  # a whole block fits under the broker's cap
        assert barrier(service, small, blocks) == []  # ...but not under the 64 KiB this client announced


# -- the files ------------------------------------------------------------------------------------


def test_acl_confines_devices_by_username_not_client_id():
    text = render_acl()
    assert "%c" not in "".join(line for line in text.splitlines() if not line.startswith("#"))
    assert all("%u" in rule.topic or "/devices/" not in rule.topic for rule in DEVICE_RULES)
    assert {"fleet-service", "operator"} == set(SERVICE_RULES)


def test_config_is_tls_only_authenticated_and_capped(tmp_path: Path):
    files = write_broker_config(BrokerSetup(tmp_path / "b", port=18883, hosts=("broker.example", "10.0.0.5")))
    conf = files.config.read_text().splitlines()

    for expected in ("allow_anonymous false", "listener 18883", f"password_file {files.password_file}",
                     f"acl_file {files.acl_file}", "tls_version tlsv1.2", "max_packet_size 278528",
                     "max_queued_messages 100000", f"persistence_location {files.folder / 'data'}/"):
        assert expected in conf
    assert files.url == "mqtts://broker.example:18883"
    for private in ("ca.key", "server.key", "passwd", "operator.env", "fleet-service.env"):
        assert stat.S_IMODE((files.folder / private).stat().st_mode) == 0o600, private


def test_server_certificate_names_every_host(tmp_path: Path):
    from cryptography import x509

    files = write_broker_config(BrokerSetup(tmp_path / "b", hosts=("broker.example", "10.0.0.5")))
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(files.ca_cert.read_bytes()))


def test_rerun_keeps_ca_and_identities_and_force_replaces_them(tmp_path: Path):
    first = write_broker_config(BrokerSetup(tmp_path / "b", hosts=("localhost",)))
    ca = first.ca_cert.read_bytes()

    again = write_broker_config(BrokerSetup(tmp_path / "b", hosts=("localhost",), port=9999))
    assert again.ca_cert.read_bytes() == ca
    assert again.identities["operator"].password == first.identities["operator"].password
    assert "mqtts://localhost:9999" in again.env_files["operator"].read_text()

    forced = write_broker_config(BrokerSetup(tmp_path / "b", hosts=("localhost",), force=True))
    assert forced.ca_cert.read_bytes() != ca
    assert forced.identities["operator"].password != first.identities["operator"].password
    entries = read_password_file(forced.password_file)
    assert check_password(entries["operator"], forced.identities["operator"].password)


def test_password_hashes_match_mosquitto_passwd(tmp_path: Path):
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "alice", "s3cret"], check=True, timeout=30)
    theirs = read_password_file(passwd)["alice"]

    assert check_password(theirs, "s3cret") and not check_password(theirs, "s3cre")
    ours = hash_password("s3cret", salt=base64.b64decode(theirs.split("$")[3]))
    assert ours == theirs  # same algorithm, iterations and encoding as Mosquitto's own tool


@pytest.mark.parametrize("args, message", [
    (["--port", "0"], "--port 0: must be 1..65535"),
    (["--port", "65536"], "--port 65536: must be 1..65535"),
    (["--host", "not a host"], "not a host name"),
    (["--max-packet-size", "10"], "--max-packet-size 10"),
])
def test_broker_config_rejects_bad_input_in_one_line(tmp_path: Path, args, message):
    result = CliRunner().invoke(app, ["broker", "config", "--out", str(tmp_path / "b"), *args])
    assert result.exit_code == ConfigError.exit_code, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "mosquitto.conf").exists()


def test_broker_config_refuses_a_file_as_its_folder(tmp_path: Path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    result = CliRunner().invoke(app, ["broker", "config", "--out", str(target)])
    assert result.exit_code == ConfigError.exit_code
    assert result.stderr.startswith("error:") and "not a folder" in result.stderr
    assert target.read_text() == "keep me"


def test_broker_config_prints_the_start_command(tmp_path: Path):
    result = CliRunner().invoke(app, ["broker", "config", "--out", str(tmp_path / "b"), "--host", "localhost"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"mosquitto -c {tmp_path / 'b' / 'mosquitto.conf'}"


# -- host tools and devices use exactly these files -------------------------------------------------


def telemetry_window(seq: int = 1) -> bytes:
    return protocol.TelemetryWindow(seq=seq, window_start=1.0, window_end=2.0, count=3, errors=0,
                                    p50_ms=1.5, p95_ms=2.0, p99_ms=2.5, max_ms=3.0, variant="onnx-fp32",
                                    provider="CPUExecutionProvider").to_json()


def test_operator_env_file_is_all_an_operator_needs(broker, fleet):
    a, a_pw = broker.provision(unique("dev-a"))
    with Client(broker, a, a_pw, client_id=a) as device:  # retained: the watch gets it when it subscribes
        assert device.publish(protocol.device_telemetry(fleet, a), telemetry_window(7), retain=True) in ACCEPTED
    env_file = broker.files.env_files["operator"]
    script = (f"set -a; . {shlex.quote(str(env_file))}; set +a; "
              f"exec {shlex.quote(sys.executable)} -m edgesdk.cli.main telemetry watch --fleet {fleet} --count 1")
    clean_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(REPO)}

    result = subprocess.run(["bash", "-c", script], env=clean_env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert f"{a} telemetry #7: 3 calls" in result.stdout


def provision_cli(broker, tmp_path: Path, device_id: str, *extra: str):
    keys = tmp_path / "keys"
    if not keys.exists():
        generate_keys(keys, role="release"), generate_keys(keys, role="fleet")
    return CliRunner().invoke(app, [
        "devices", "provision", "--broker-dir", str(broker.folder), "--out", str(tmp_path / "out" / device_id),
        "--fleet", "plant-7", "--label", "site=berlin", "--label", "line=3",
        "--release-key", str(keys / "signing.pub"), "--fleet-key", str(keys / "fleet.pub"),
        "--broker-url", broker.url, *extra, "--", device_id])


def test_provisioned_device_connects_with_its_agent_yaml(broker, tmp_path: Path):
    device = unique("dev")
    result = provision_cli(broker, tmp_path, device, "--reload-pid", str(broker.process.pid))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / device
    config = yaml.safe_load((folder / "agent.yaml").read_text())

    assert config["device_id"] == config["username"] == device
    assert config["labels"] == {"site": "berlin", "line": "3"}
    assert stat.S_IMODE((folder / "password").stat().st_mode) == 0o600
    password = (folder / config["password_file"]).read_text().strip()
    # The reload is asynchronous: the first attempt may still see the old password file.
    from edgesdk.broker import TlsConfig, parse_broker_url

    settings = parse_broker_url(config["broker"], tls=TlsConfig(ca_file=folder / config["tls"]["ca"]),
                                username=config["username"], password=password)
    deadline = time.monotonic() + WAIT_S
    while True:
        client = make_client(device, settings, clean_start=True)
        try:
            connect_blocking(client, settings)
            break
        except BrokerError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with Client(broker, *broker.operator) as operator:
        operator.subscribe(protocol.devices_filter("plant-7", "state"))
        info = client.publish(protocol.device_state("plant-7", device), b"hello", qos=1)
        info.wait_for_publish(WAIT_S)
        assert operator.next_message().topic == protocol.device_state("plant-7", device)
    disconnect(client)


def test_provisioned_agent_yaml_loads(broker, tmp_path: Path):
    from agent.config import load_config

    device = unique("dev")
    assert provision_cli(broker, tmp_path, device).exit_code == 0
    config = load_config(tmp_path / "out" / device / "agent.yaml")

    assert config.device_id == device and config.fleet == "plant-7"
    assert config.password and config.tls is not None
    assert config.labels == {"site": "berlin", "line": "3"}  # type: ignore[attr-defined]


@pytest.mark.parametrize("device_id, message", [
    ("fleet-service", "reserved"), ("operator", "reserved"), ("a:b", "invalid device id"),
    ("dev/+", "invalid device id"), ("-rf", "invalid device id"),
])
def test_provision_refuses_ids_that_would_break_the_policy(broker, tmp_path: Path, device_id, message):
    before = broker.files.password_file.read_bytes()
    result = provision_cli(broker, tmp_path, device_id)
    assert result.exit_code == ConfigError.exit_code, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert broker.files.password_file.read_bytes() == before


def test_provision_refuses_a_missing_default_key(broker, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EDGESDK_HOME", str(tmp_path / "empty-home"))
    result = CliRunner().invoke(app, ["devices", "provision", unique("dev"), "--broker-dir", str(broker.folder),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == ConfigError.exit_code
    assert "keys generate --role release" in result.stderr


def test_provision_twice_needs_force(broker, tmp_path: Path):
    device = unique("dev")
    assert provision_cli(broker, tmp_path, device).exit_code == 0
    first = (tmp_path / "out" / device / "password").read_text()

    again = provision_cli(broker, tmp_path, device)
    assert again.exit_code == ConfigError.exit_code and "--force" in again.stderr

    forced = provision_cli(broker, tmp_path, device, "--force")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "out" / device / "password").read_text() != first
    assert check_password(read_password_file(broker.files.password_file)[device],
                          (tmp_path / "out" / device / "password").read_text().strip())
