"""The simulator against a real Mosquitto: devices come online with retained states and a Will,
send exactly mergeable telemetry with per-device seqs, obey signed statements (and refuse forged
ones) with install events, and stop cleanly; the CLI runs it and its Wills fire when it is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.cli.main import app
from edgesdk.protocol import DeploymentStatement, DeviceState, InstallEvent, InstallEventKind as K, TelemetryWindow
from edgesdk.protocol.histogram import LatencyHistogram, histogram_of
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from edgesdk.sim import FleetTrust, ScaledClock, SimConfig, StartRelease, fake_package_id, parse_behaviour
from tests.edgesdk.sim.conftest import WAIT_S, running
from tests.fixtures.cli_json import doc_section

FLEET = "simfleet"
BEHAVIOUR = {
    "hardware": {"classes": {"nano": 0.5, "nx": 0.5}},
    "labels": {"site": {"berlin": 0.6, "munich": 0.4}},
    "default": {"p50_ms": 10, "sigma": 0.25, "install_s": 0.6},
    "releases": {"det": {"by_hardware": {"nano": {"p50_ms": 20}, "nx": {"p50_ms": 5}}}},
}
DET = StartRelease("det", "1.0", fake_package_id("det", "1.0"))


def states(messages) -> dict[str, DeviceState]:  # noqa: ANN001
    """The latest state per device."""
    latest = {}
    for m in messages:
        if m.topic.endswith("/state") and m.payload:
            state = DeviceState.from_json(m.payload, m.topic)
            latest[state.device_id] = state
    return latest


def config(url: str, devices: int, **changes: object) -> SimConfig:
    return SimConfig(parse_broker_url(url), FLEET, devices, behaviour=parse_behaviour(BEHAVIOUR), **changes)


def test_devices_come_online_with_labels_and_classes_and_go_offline_when_stopped(mosquitto, watcher) -> None:
    watch = watcher(parse_broker_url(mosquitto.url), protocol.devices_filter(FLEET, "state"))
    with running(config(mosquitto.url, 50, labels={"ring": "canary"}, start_with=(DET,))) as sim:
        online = watch.wait_for(lambda ms: (s := states(ms)) and len(s) == 50 and all(x.online for x in s.values())
                                and s, what="50 online states")
        assert sim.all_connected.is_set() and sim.counters.connected == 50
    assert sorted(online) == [f"sim-{n:05d}" for n in range(50)]
    classes = [s.hardware_class for s in online.values()]
    assert classes.count("nano") == classes.count("nx") == 25
    assert sorted(s.labels["site"] for s in online.values()).count("berlin") == 30
    assert {s.labels["ring"] for s in online.values()} == {"canary"}
    assert {(s.model("det")["version"], s.telemetry_interval_s) for s in online.values()} == {("1.0", 60.0)}
    offline = watch.wait_for(lambda ms: (s := states(ms)) and not any(x.online for x in s.values()) and s,
                             what="50 offline states after the stop")
    assert len(offline) == 50 and sim.counters.connected == 0 and sim.counters.states_sent == 100


def test_telemetry_windows_have_per_device_seqs_and_merge_to_the_behaviours_latency(mosquitto, watcher) -> None:
    watch = watcher(parse_broker_url(mosquitto.url), protocol.devices_filter(FLEET, "telemetry"),
                    protocol.devices_filter(FLEET, "state"))
    # 60x simulated time: a 30 s window every 0.5 s of real time.
    with running(config(mosquitto.url, 10, telemetry_interval_s=30.0, start_with=(DET,)), clock=ScaledClock(60)):
        watch.wait_for(lambda ms: len({m.topic for m in ms if m.topic.endswith("telemetry")}) == 10
                       and all(len([m for m in ms if m.topic == t]) >= 4
                               for t in {m.topic for m in ms if m.topic.endswith("telemetry")}),
                       what="4 windows from each of 10 devices")
    by_device: dict[str, list[TelemetryWindow]] = defaultdict(list)
    for m in watch.on("/telemetry"):
        by_device[m.topic.split("/")[-2]].append(TelemetryWindow.from_json(m.payload, m.topic))
    classes = {d: s.hardware_class for d, s in states(watch.on("/state")).items()}
    merged = {"nano": LatencyHistogram(), "nx": LatencyHistogram()}
    for device, windows in by_device.items():
        assert [w.seq for w in windows] == list(range(len(windows)))  # from 0, one each, in order
        for w in windows:
            assert (w.model, w.package_id, w.variant, w.provider) == ("det", DET.package_id, "fp32",
                                                                     "CPUExecutionProvider")
            hist = histogram_of(w)
            assert hist.count == w.count - w.errors and w.p95_ms == hist.percentile(95)
            merged[classes[device]].merge(hist)
        assert all(25.0 < w.window_end - w.window_start < 35.0 for w in windows[1:])  # simulated seconds
    assert merged["nano"].percentile(50) == pytest.approx(20.0, rel=0.1)
    assert merged["nx"].percentile(50) == pytest.approx(5.0, rel=0.1)


def test_signed_statements_are_obeyed_forged_ones_refused_and_undeploy_removes_the_model(
        mosquitto, watcher, tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "fleet", role="fleet")
    fleet_key = load_private_key(keys.private_path)
    broker = parse_broker_url(mosquitto.url)
    watch = watcher(broker, protocol.devices_filter(FLEET, "events"), protocol.devices_filter(FLEET, "state"))
    publisher = make_client("operator-test", broker, clean_start=True)
    connect_blocking(publisher, broker)

    def send(device: str, statement: DeploymentStatement, key=fleet_key) -> None:  # noqa: ANN001
        payload = protocol.sign_statement(statement, key).to_json()
        publisher.publish(protocol.device_desired(FLEET, device, statement.name), payload, qos=1,
                          retain=True).wait_for_publish(WAIT_S)

    def events(device: str) -> list[InstallEvent]:
        return [InstallEvent.from_json(m.payload) for m in watch.on(f"/{device}/events")]

    now = time.time()
    v2 = DeploymentStatement(fleet=FLEET, device="sim-00001", package_id=fake_package_id("det", "2.0"), name="det",
                             version="2.0", target="t", size=5000, block_size=4096, blocks_digest="b" * 64,
                             serial=protocol.new_serial(), issued_at=now, expires=now + 3600, rollout_id="r-1")
    trust = FleetTrust(keys=(load_public_key(keys.public_path),))
    try:
        with running(config(mosquitto.url, 3, start_with=(DET,), trust=trust)) as sim:
            watch.wait_for(lambda ms: len(states(ms)) == 3, what="3 devices online")
            send("sim-00001", v2)
            watch.wait_for(lambda ms: (s := states(ms).get("sim-00001")) and s.model("det")["version"] == "2.0",
                           what="sim-00001 to report det@2.0")
            assert [e.kind for e in events("sim-00001")] == [K.DOWNLOADING, K.DOWNLOADED, K.VERIFIED, K.EXTRACTED,
                                                            K.SELECTED, K.HEALTH_CHECKED, K.ACTIVATED]
            assert {(e.model, e.package_id, e.rollout_id) for e in events("sim-00001")} == {
                ("det", v2.package_id, "r-1")}

            forged = DeploymentStatement(**{**v2.__dict__, "device": "sim-00002"})
            send("sim-00002", forged, key=load_private_key(generate_keys(tmp_path / "evil", role="fleet").private_path))
            [refused] = watch.wait_for(lambda ms: [e for e in events("sim-00002")], what="a refused event")
            assert refused.kind is K.REFUSED and refused.model == "det" and "refused" in refused.reason

            gone = protocol.undeploy_statement(FLEET, "sim-00001", "det", protocol.new_serial(v2.serial), time.time())
            send("sim-00001", gone)
            watch.wait_for(lambda ms: (s := states(ms).get("sim-00001")) and s.models == [],
                           what="sim-00001 to report no model")
            assert events("sim-00001")[-1].kind is K.UNDEPLOYED
            assert events("sim-00001")[-1].package_id == v2.package_id
            assert states(watch.messages)["sim-00002"].model("det")["version"] == "1.0"
            assert events("sim-00000") == []
            assert (sim.counters.statements_obeyed, sim.counters.statements_refused) == (2, 1)
            assert (sim.counters.activations, sim.counters.undeploys) == (1, 1)
    finally:
        disconnect(publisher)


def sim_process(url: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "edgesdk.cli.main", "sim", "--fleet", FLEET, "--broker", url,
                             "--progress", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "200"})


def test_the_broker_marks_devices_offline_with_their_will_when_the_simulator_is_killed(mosquitto, watcher) -> None:
    watch = watcher(parse_broker_url(mosquitto.url), protocol.devices_filter(FLEET, "state"))
    proc = sim_process(mosquitto.url, "--devices", "5", "--start-with", "det@1.0")
    try:
        watch.wait_for(lambda ms: len(s := states(ms)) == 5 and all(x.online for x in s.values()),
                       what="5 online states")
    finally:
        proc.kill()
        proc.communicate(timeout=WAIT_S)
    wills = watch.wait_for(lambda ms: (s := states(ms)) and not any(x.online for x in s.values()) and s,
                           what="5 Wills")
    assert len(wills) == 5 and all(s.model("det")["version"] == "1.0" for s in wills.values())


def test_sigterm_stops_cleanly_and_prints_a_summary(mosquitto, watcher) -> None:
    watch = watcher(parse_broker_url(mosquitto.url), protocol.devices_filter(FLEET, "state"))
    proc = sim_process(mosquitto.url, "--devices", "4", "--json")
    try:
        watch.wait_for(lambda ms: len(states(ms)) == 4, what="4 devices online")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    assert set(summary) == doc_section("edgesdk sim --json")
    assert (summary["ever_connected"], summary["connected"], summary["devices"]) == (4, 0, 4)
    assert "sim: 4/4 devices connected" in err.decode()
    assert not any(s.online for s in states(watch.messages).values())


@pytest.mark.parametrize("content, message", [
    ("default: {p50_ms: -1}\n", "default.p50_ms: expected a number > 0"),
    ("releases: {det@2: {latency: 3}}\n", "releases.det@2.latency: unknown key"),
])
def test_a_bad_behaviour_file_is_one_line_and_exit_code_2(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(content)
    result = CliRunner().invoke(app, ["sim", "--devices", "2", "--behaviour", str(path)])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_sim_help_lists_its_options() -> None:
    result = CliRunner().invoke(app, ["sim", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--devices", "--behaviour", "--start-with", "--telemetry-interval", "--fleet-key-pub",
                   "--trust-root", "--credentials", "--broker"):
        assert option in result.output


def test_five_hundred_devices_all_come_online(mosquitto, watcher) -> None:
    watch = watcher(parse_broker_url(mosquitto.url), protocol.devices_filter(FLEET, "state"))
    with running(config(mosquitto.url, 500, connect_rate=1000.0)) as sim:
        assert sim.all_connected.wait(WAIT_S)
        online = watch.wait_for(lambda ms: len(s := states(ms)) == 500 and all(x.online for x in s.values()) and s,
                                what="500 online states")
    assert len(online) == 500 and sim.counters.connect_failures == 0


def test_devices_log_in_with_their_own_credentials_over_tls(secure_mosquitto, watcher) -> None:
    passwords = {f"sim-{n:05d}": secure_mosquitto.provision(f"sim-{n:05d}")[1] for n in range(3)}
    watch = watcher(secure_mosquitto.config(*secure_mosquitto.operator), protocol.devices_filter(FLEET, "state"))
    broker = secure_mosquitto.config(None, None)
    with running(SimConfig(broker, FLEET, 3, credentials=passwords, telemetry_interval_s=0.2)) as sim:
        watch.wait_for(lambda ms: len(s := states(ms)) == 3 and all(x.online for x in s.values()),
                       what="3 devices online over TLS")
        assert sim.counters.connect_failures == 0


def test_devices_reconnect_after_the_broker_is_killed_and_keep_their_seqs(mosquitto, watcher) -> None:
    broker = parse_broker_url(mosquitto.url).with_timeouts(reconnect_min_s=0.2, reconnect_max_s=1.0)
    watch = watcher(broker, protocol.devices_filter(FLEET, "state"), protocol.devices_filter(FLEET, "telemetry"))
    sim_config = SimConfig(broker, FLEET, 20, telemetry_interval_s=0.3, start_with=(DET,))
    with running(sim_config) as sim:
        watch.wait_for(lambda ms: len({m.topic for m in ms if m.topic.endswith("telemetry")}) == 20,
                       what="windows from 20 devices")
        mosquitto.kill()  # no clean shutdown: the retained states are gone with it
        before = len(watch.messages)
        mosquitto.start()
        watch.wait_for(lambda ms: len(s := states(ms[before:])) == 20 and all(x.online for x in s.values()),
                       what="20 devices online again")
        watch.wait_for(lambda ms: len({m.topic for m in ms[before:] if m.topic.endswith("telemetry")}) == 20,
                       what="windows from 20 devices after the restart")
        assert sim.counters.disconnects >= 20 and sim.counters.connected == 20
    for device in {m.topic for m in watch.on("/telemetry")}:
        seqs = [TelemetryWindow.from_json(m.payload).seq for m in watch.messages if m.topic == device]
        after = [TelemetryWindow.from_json(m.payload).seq for m in watch.messages[before:] if m.topic == device]
        # At least once: a window whose PUBACK was lost may come twice, but the sequence never restarts.
        assert seqs == sorted(seqs) and max(after) > max(set(seqs) - set(after), default=-1)


def test_an_error_in_one_device_is_counted_and_the_others_go_on(mosquitto, watcher) -> None:
    def broken(*args: object, **kwargs: object) -> list:
        raise RuntimeError("injected")

    def break_first_device(sim) -> None:  # noqa: ANN001
        sim.devices[0].roll = broken

    watch = watcher(parse_broker_url(mosquitto.url), protocol.devices_filter(FLEET, "telemetry"))
    with running(config(mosquitto.url, 3, telemetry_interval_s=0.2), prepare=break_first_device) as sim:
        watch.wait_for(lambda ms: len([m for m in ms if "/sim-00002/" in m.topic]) >= 5, what="5 windows of sim-00002")
        assert sim.counters.internal_errors >= 1 and "injected" in sim.counters.last_error
    assert watch.on("/sim-00000/telemetry") == [] and watch.on("/sim-00001/telemetry") != []
