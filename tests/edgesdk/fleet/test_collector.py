"""The collector stores what devices send, once: real Mosquitto, real fleet store (SQLite in tmp,
one test on PostgreSQL), fake devices that are plain paho clients publishing real protocol JSON
at QoS 1. A message is acknowledged only after its batch is committed, so what a collector could
not store comes back from the broker to the next collector with its client id."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgesdk import protocol
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.errors import FleetError
from edgesdk.fleet.collector import Collector, CollectorStats, claim_client_id, default_client_id
from edgesdk.fleet.store import FleetStore
from edgesdk.protocol import DeploymentStatement, InstallEvent, InstallEventKind, new_serial, sign_statement
from tests.edgesdk.fleet.test_store import state, window

FLEET = "coll"
WAIT_S = 20.0
T0 = 1_700_000_100.0


class FakeDevice:
    """A device as the broker sees one: its own client id, QoS 1 publishes, every PUBACK awaited."""

    def __init__(self, config: BrokerConfig, device_id: str) -> None:
        self.device_id = device_id
        self.client = make_client(device_id, config, clean_start=True, max_inflight=500)
        connect_blocking(self.client, config)

    def topic(self, leaf: str) -> str:
        return f"{protocol.fleet_root(FLEET)}/devices/{self.device_id}/{leaf}"

    def send(self, leaf: str, *payloads: bytes, retain: bool = False) -> None:
        infos = [self.client.publish(self.topic(leaf), p, qos=1, retain=retain) for p in payloads]
        for info in infos:
            info.wait_for_publish(WAIT_S)
            assert info.is_published(), f"no PUBACK for a message on {leaf}"

    def windows(self, seqs) -> None:  # noqa: ANN001 - any iterable of ints
        self.send("telemetry", *(window_json(s) for s in seqs))

    def close(self) -> None:
        disconnect(self.client)


def window_json(seq: int) -> bytes:
    return window(seq, T0 + 60 * seq, [1.0, 2.0, 3.0 + seq % 5])[0].to_json()


def event_json(kind: InstallEventKind, at: float) -> bytes:
    return InstallEvent(kind=kind, package_id="a" * 64, at=at, model="det").to_json()


@pytest.fixture
def config(mosquitto) -> BrokerConfig:  # noqa: ANN001
    return parse_broker_url(mosquitto.url).with_timeouts(reconnect_min_s=0.1, reconnect_max_s=0.5)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FleetStore]:
    with FleetStore.open(tmp_path / "fleet.db") as opened:
        yield opened


@contextmanager
def running(config: BrokerConfig, store, client_id: str = "collector-a",  # noqa: ANN001
            **kwargs) -> Iterator[Collector]:
    collector = Collector(config, FLEET, store, client_id=client_id, **kwargs)
    collector.start()
    try:
        yield collector
    finally:
        collector.stop()


@contextmanager
def device(config: BrokerConfig, device_id: str = "dev-1") -> Iterator[FakeDevice]:
    dev = FakeDevice(config, device_id)
    try:
        yield dev
    finally:
        dev.close()


def settled(received: int):  # noqa: ANN201
    """Predicate: ``received`` messages in, every one committed and acknowledged."""
    return lambda s: s.received >= received and s.queue_depth == 0


def wait(collector: Collector, predicate, what: str) -> CollectorStats:  # noqa: ANN001
    if not collector.wait_for(predicate, WAIT_S):
        raise AssertionError(f"{what}: not within {WAIT_S} s; {collector.stats}")
    return collector.stats


class RecordingStore:
    """The real store, with each add_windows call's size recorded and failures injected."""

    def __init__(self, real: FleetStore, refuse=lambda window: False, down: bool = False) -> None:  # noqa: ANN001
        self.real, self.refuse, self.down = real, refuse, down
        self.window_calls: list[int] = []

    def add_windows(self, items):  # noqa: ANN001, ANN201
        items = list(items)
        self.window_calls.append(len(items))
        if self.down:
            raise FleetError("fleet store sqlite:///x: disk I/O error")
        if any(self.refuse(w) for _, _, w in items):
            raise FleetError("fleet store sqlite:///x: CHECK constraint failed")
        return self.real.add_windows(items)

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else goes to the real store
        return getattr(self.real, name)


# -- windows and events ---------------------------------------------------------------------------
def test_windows_and_events_are_stored_once_and_malformed_messages_are_dropped(config, store) -> None:
    with running(config, store) as collector, device(config) as dev:
        dev.windows(range(1, 6))
        dev.windows([3])  # redelivered by the device (its spool resends after a lost PUBACK)
        dev.send("events", event_json(InstallEventKind.DOWNLOADING, T0), event_json(InstallEventKind.ACTIVATED, T0 + 5))
        dev.send("events", event_json(InstallEventKind.ACTIVATED, T0 + 5))  # the same event again
        dev.send("telemetry", b"{not json", b'{"seq": 7}', window_json(8).replace(b'"seq":8', b'"seq":' + b"9" * 30))
        dev.send("state", state("dev-2").to_json())  # another device's state on this device's topic
        dev.windows([6])  # the collector still works
        stats = wait(collector, settled(12), "12 messages committed")

    assert store.window_count(FLEET) == 6
    assert [e.kind for e in store.events(FLEET)] == ["downloading", "activated"]
    assert (stats.stored, stats.duplicates, stats.malformed) == (8, 2, 4)
    assert store.devices(FLEET) == []  # the misfiled state was not recorded


def test_windows_reach_the_store_in_batches(config, store) -> None:
    recording = RecordingStore(store)
    with running(config, recording) as collector, device(config) as dev:
        dev.windows(range(1200))
        wait(collector, settled(1200), "1200 windows committed")

    assert store.window_count(FLEET) == 1200
    assert sum(recording.window_calls) == 1200 and max(recording.window_calls) <= 500
    assert len(recording.window_calls) <= 1200 / 20, recording.window_calls  # batches, not one call per window


def test_nothing_is_acknowledged_before_the_store_commits(config, store) -> None:
    down = RecordingStore(store, down=True)
    with device(config) as dev:
        with running(config, down, client_id="collector-x", retry_min_s=0.05, retry_max_s=0.2) as failing:
            dev.windows(range(50))
            stats = wait(failing, lambda s: s.received == 50 and s.store_errors >= 2, "50 windows, store down")
            assert stats.queue_depth == 50 and stats.stored == 0
        assert store.window_count(FLEET) == 0

        # The broker still holds the 50 unacknowledged windows for collector-x's session.
        with running(config, store, client_id="collector-x") as collector:
            stats = wait(collector, settled(50), "the unacknowledged windows redelivered")

    assert store.window_count(FLEET) == 50
    assert stats.stored == 50


def test_a_window_the_store_refuses_is_dropped_and_the_batch_stored(config, store) -> None:
    poisoned = RecordingStore(store, refuse=lambda w: w.seq == 13)
    with running(config, poisoned) as collector, device(config) as dev:
        dev.windows(range(1, 21))
        stats = wait(collector, settled(20), "20 windows committed")

    assert store.window_count(FLEET) == 19
    assert (stats.stored, stats.malformed) == (19, 1)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "each-reads-all"])
def test_two_collectors_on_one_store_store_each_window_once(config, store, shared: bool) -> None:
    with running(config, store, "collector-a", shared=shared) as a, running(config, store, "collector-b",
                                                                            shared=shared) as b:
        with device(config, "dev-1") as one, device(config, "dev-2") as two:
            one.windows(range(150))
            two.windows(range(150))
            expected = 300 if shared else 600
            deadline = time.monotonic() + WAIT_S
            while a.stats.received + b.stats.received < expected or a.stats.queue_depth or b.stats.queue_depth:
                assert time.monotonic() < deadline, (a.stats, b.stats)
                a.wait_for(lambda s: False, 0.05)  # no event spans two collectors: poll, bounded

    assert store.window_count(FLEET) == 300
    assert a.stats.stored + b.stats.stored == 300
    if shared:
        assert a.stats.received > 0 and b.stats.received > 0  # the broker split the load
    else:
        assert a.stats.received == b.stats.received == 300
        assert a.stats.duplicates + b.stats.duplicates == 300


def test_windows_are_stored_once_in_postgresql(config, postgres_url: str) -> None:
    with FleetStore.open(postgres_url) as pg, running(config, pg) as collector, device(config) as dev:
        dev.windows(range(40))
        dev.windows(range(30, 45))
        stats = wait(collector, settled(55), "55 windows committed")
        assert pg.window_count(FLEET) == 45
        assert (stats.stored, stats.duplicates) == (45, 10)


# -- state and desired ----------------------------------------------------------------------------
def signed(device_id: str, name: str, key: Ed25519PrivateKey) -> bytes:
    now = time.time()
    statement = DeploymentStatement(fleet=FLEET, device=device_id, package_id="a" * 64, name=name, version="1.0",
                                    target="x86-64-cpu", size=1000, block_size=262144, blocks_digest="b" * 64,
                                    serial=new_serial(), issued_at=now, expires=now + 3600)
    return sign_statement(statement, key).to_json()


def test_retained_state_and_desired_are_recorded_and_cleared(config, store) -> None:
    key = Ed25519PrivateKey.generate()
    with device(config) as dev:
        dev.send("state", state("dev-1", labels={"site": "berlin"}, models=(("det", "1.0", "a" * 64),)).to_json(),
                 retain=True)  # before the collector exists: it gets the retained value
        dev.send("desired/det", signed("dev-1", "det", key), retain=True)
        with running(config, store) as collector:
            wait(collector, lambda s: s.states == 1 and s.desired == 1 and s.queue_depth == 0, "state and desired")
            [record] = store.devices(FLEET)
            assert (record.device_id, record.labels, record.status) == ("dev-1", {"site": "berlin"}, "online")
            assert [(m.name, m.version) for m in record.models] == [("det", "1.0")]
            assert [(d.model, d.package_id) for d in record.desired] == [("det", "a" * 64)]

            dev.send("desired/ocr", signed("dev-1", "det", key), retain=True)  # det's statement under ocr
            dev.send("desired/det", b"", retain=True)  # cleared
            dev.send("state", state("dev-1", online=False).to_json(), retain=True)  # the Will
            stats = wait(collector, lambda s: s.malformed == 1 and s.desired == 2 and s.states == 2
                         and s.queue_depth == 0, "misfiled statement, clear, offline state")

    [record] = store.devices(FLEET)
    assert record.desired == () and record.status == "offline"
    assert stats.malformed == 1


# -- identity and the secure broker ---------------------------------------------------------------
def test_each_serve_on_a_host_claims_its_own_id_and_a_restart_gets_it_back(tmp_path: Path) -> None:
    first = claim_client_id("plant", "group", tmp_path / "ids", host="edge1")
    second = claim_client_id("plant", "group", tmp_path / "ids", host="edge1")
    assert first.client_id == default_client_id("plant", "group", host="edge1")
    assert second.client_id == f"{first.client_id}-1"
    first.release()  # the process ended (a SIGKILL frees the lock the same way)
    again = claim_client_id("plant", "group", tmp_path / "ids", host="edge1")
    assert again.client_id == first.client_id
    again.release()
    second.release()


def test_default_client_id_is_stable_per_host_and_unguessable_without_the_group() -> None:
    one = default_client_id("plant", "edgesdk-repo-1234", host="edge host/1")
    assert one == default_client_id("plant", "edgesdk-repo-1234", host="edge host/1")
    assert one != default_client_id("plant", "edgesdk-repo-5678", host="edge host/1")
    assert re.fullmatch(r"edgesdk-collector-plant-edge-host-1-[0-9a-f]{8}", one)


def test_collects_on_the_secure_broker_with_the_fleet_service_login(secure_mosquitto, tmp_path: Path) -> None:
    device_id, password = secure_mosquitto.provision("dev-s")
    service = secure_mosquitto.config(*secure_mosquitto.fleet_service)
    with FleetStore.open(tmp_path / "fleet.db") as fleet_store, \
            running(service, fleet_store, share_group=secure_mosquitto.share_group) as collector:
        dev = FakeDevice(secure_mosquitto.config(device_id, password), device_id)
        try:
            dev.send("state", state(device_id, labels={"site": "lab"}).to_json(), retain=True)
            dev.windows(range(10))
            wait(collector, settled(11), "state and 10 windows over TLS")
        finally:
            dev.close()
        assert fleet_store.window_count(FLEET) == 10
        assert [d.labels for d in fleet_store.devices(FLEET)] == [{"site": "lab"}]
