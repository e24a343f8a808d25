"""Staged rollouts against the simulator: a real Mosquitto, a real `edgesdk serve --fleet-key` (the
controller) and a real fleet store, with simulated devices for what the hardware here cannot do:
several hardware classes, a release slow on one class, a provider fallback, output drift, too
little data, offline devices. Each rollout is started and followed with the real CLI."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgesdk.broker import parse_broker_url
from edgesdk.cli.fleet_cmd import record_release
from edgesdk.cli.main import app
from edgesdk.fleet import rollouts as R
from edgesdk.fleet.repository import publish_package
from edgesdk.fleet.store import FleetStore
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from edgesdk.sim import FleetTrust, SimConfig, StartRelease, parse_behaviour
from tests.edgesdk.sim.conftest import running
from tests.fixtures.packages import random_package
from tests.fixtures.serve import ServeProcess

FLEET = "rollfleet"
WAIT_S = 90.0
FAST = ["--bake", "2s", "--min-samples", "300", "--activation-timeout", "20s", "--max-wait", "20s"]


@dataclass
class Rig:
    url: str
    tmp: Path
    store: Path
    repo: Path
    fleet_key: Path
    trust: FleetTrust
    packages: dict[str, str]  # version -> package id
    env: dict[str, str]

    def sim(self, devices: int, behaviour: dict, **changes: object) -> SimConfig:
        start = StartRelease("det", "1.0", self.packages["1.0"])
        return SimConfig(parse_broker_url(self.url), FLEET, devices, behaviour=parse_behaviour(behaviour),
                         telemetry_interval_s=0.5, start_with=(start,), trust=self.trust, **changes)

    def cli(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, [*args, "--store", str(self.store)], env=self.env, catch_exceptions=False)
        return result.exit_code, result.output

    def wait_devices(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with FleetStore.open(self.store) as store:
            while time.monotonic() < deadline:
                if sum(1 for d in store.devices(FLEET) if d.status == "online" and d.models) >= n:
                    return
                time.sleep(0.2)  # the collector is another process
        raise AssertionError(f"{n} devices did not register within {timeout} s")

    def wait_offline(self, n: int, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        with FleetStore.open(self.store) as store:
            while time.monotonic() < deadline:
                offline = sorted(d.device_id for d in store.devices(FLEET) if d.status == "offline")
                if len(offline) >= n:
                    return offline
                time.sleep(0.2)  # the collector is another process
        raise AssertionError(f"{n} devices did not go offline within {timeout} s")

    def rollout(self, rollout_id: str) -> tuple[R.RolloutRecord, list[R.RolloutDevice], list[R.Decision]]:
        with FleetStore.open(self.store) as store:
            found = R.get_rollout(store, rollout_id)
            assert found is not None
            return found, R.rollout_devices(store, found.id), R.decisions(store, found.id)

    def running_versions(self) -> dict[str, str]:
        with FleetStore.open(self.store) as store:
            return {d.device_id: next((m.version for m in d.models if m.name == "det"), "—")
                    for d in store.devices(FLEET)}

    def wait_versions(self, expected: str, devices: list[str], timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            versions = self.running_versions()
            if all(versions.get(d) == expected for d in devices) or time.monotonic() > deadline:
                return versions
            time.sleep(0.2)


@pytest.fixture
def rig(mosquitto, tmp_path: Path) -> Iterator[Rig]:
    release = generate_keys(tmp_path / "keys")
    fleet = generate_keys(tmp_path / "keys", role="fleet")
    repo, store_path = tmp_path / "repo", tmp_path / "fleet.db"
    packages = {}
    with FleetStore.open(store_path) as store:
        for version in ("1.0", "2.0"):
            pkg = random_package(tmp_path / f"det-{version}.edgepkg", load_private_key(release.private_path),
                                 size=4096, name="det", version=version)
            published = publish_package(pkg, repo, [load_public_key(release.public_path)])
            record_release(published, store)
            packages[version] = published.package_id
    env = {**os.environ, "EDGESDK_HOME": str(tmp_path / "home")}
    env.pop("EDGESDK_SHARE_GROUP", None)
    serve = ServeProcess(mosquitto.url, repo, env, FLEET, "--fleet-key", str(fleet.private_path), "--store",
                         str(store_path)).wait_ready()
    try:
        yield Rig(mosquitto.url, tmp_path, store_path, repo, fleet.private_path,
                  FleetTrust(keys=(load_public_key(fleet.public_path),)), packages, env)
    finally:
        serve.terminate()


def behaviour(**release_v2: object) -> dict:
    return {"hardware": {"classes": {"nano": 0.5, "orin": 0.5}},
            "default": {"p50_ms": 10, "sigma": 0.2, "install_s": 0.3, "calls_per_window": 4000,
                        "provider": "TensorrtExecutionProvider"},
            "releases": {"det@2.0": release_v2} if release_v2 else {}}


def start(rig: Rig, *args: str) -> tuple[int, str, str]:
    code, output = rig.cli("rollout", "start", "det@2.0", "--fleet", FLEET, *args, "--wait")
    rollout_id = next(line for line in output.splitlines() if line.startswith("ro-"))
    return code, output, rollout_id


def test_a_good_release_completes_wave_by_wave_with_every_device_on_it(rig: Rig) -> None:
    with running(rig.sim(6, behaviour())):
        rig.wait_devices(6)
        code, output, rid = start(rig, "--waves", "1,50%,100%", *FAST)
        assert code == 0, output
        rollout, devices, decisions = rig.rollout(rid)
        assert rollout.state == R.COMPLETED and rollout.outcome.startswith("completed: 6 active")
        assert sorted(d.wave for d in devices) == [0, 1, 1, 2, 2, 2]
        assert {d.state for d in devices} == {R.ACTIVE}
        assert set(rig.wait_versions("2.0", [d.device_id for d in devices]).values()) == {"2.0"}
        # Every wave judged every gate with numbers; nothing failed.
        for wave in range(3):
            gates = {d.gate: d for d in decisions if d.wave == wave and d.verdict != "wait"}
            assert gates["p95-regression"].verdict == "pass", gates["p95-regression"].summary
            assert gates["p95-regression"].evidence["classes"]
            assert gates["output-drift"].verdict == "pass"
            assert gates["failure-rate"].verdict == "pass"
        code, status = rig.cli("rollout", "status", rid, "--json")
        data = json.loads(status)
        assert code == 0 and data["state"] == "completed" and data["counts"] == {"active": 6}
        assert [w["verdict"] for w in data["waves_detail"]] == ["pass", "pass", "pass"]


def test_a_release_slow_on_one_hardware_class_is_halted_and_every_touched_device_rolled_back(rig: Rig) -> None:
    slow = behaviour(by_hardware={"nano": {"p50_ms": 14}})  # +40 % on nano only, fine on orin
    with running(rig.sim(8, slow)):
        rig.wait_devices(8)
        code, output, rid = start(rig, "--waves", "2,100%", *FAST)
        assert code == 4, output
        rollout, devices, decisions = rig.rollout(rid)
        assert rollout.state == R.HALTED
        failed = [d for d in decisions if d.verdict == "fail"]
        assert failed and failed[0].gate == "p95-regression" and failed[0].wave == 0
        assert "on nano" in failed[0].summary and "nano" in rollout.outcome
        nano = failed[0].evidence["classes"]["nano"]
        assert nano["verdict"] == "fail" and nano["regression_vs_same_devices_old"] > 0.2
        assert nano["new"]["calls"] >= 300 and nano["same_devices_old"]["calls"] >= 300
        if "orin" in failed[0].evidence["classes"]:
            assert failed[0].evidence["classes"]["orin"]["verdict"] == "pass"
        touched = [d for d in devices if d.wave == 0]
        assert len(touched) == 2 and {d.hardware_class for d in touched} == {"nano", "orin"}  # stratified
        assert all(d.state == R.ROLLED_BACK for d in touched)
        assert all(d.state == R.WAITING for d in devices if d.wave == 1)  # the second wave never went out
        versions = rig.running_versions()
        assert all(versions[d.device_id] == "1.0" for d in devices), versions
        assert "rolled back 2 of 2 touched devices" in rollout.outcome
        code, text = rig.cli("rollout", "status", rid)
        assert code == 4 and "p95-regression" in text and "SAME DEVICES BEFORE" in text


def test_a_provider_fallback_on_one_class_halts_the_rollout(rig: Rig) -> None:
    fallback = behaviour(by_hardware={"nano": {"provider": "CPUExecutionProvider"}})
    with running(rig.sim(4, fallback)):
        rig.wait_devices(4)
        code, output, rid = start(rig, "--waves", "100%", *FAST)
        assert code == 4, output
        rollout, devices, decisions = rig.rollout(rid)
        failed = next(d for d in decisions if d.verdict == "fail")
        assert failed.gate == "provider-fallback"
        fell = failed.evidence["fallbacks"]
        assert fell and all(f["hardware_class"] == "nano" and f["to"] == "CPUExecutionProvider" for f in fell)
        assert all(d.state == R.ROLLED_BACK for d in devices)


def test_output_drift_halts_the_rollout_with_its_population_stability_index(rig: Rig) -> None:
    with running(rig.sim(3, behaviour(output_drift=1.0))):
        rig.wait_devices(3)
        code, output, rid = start(rig, "--waves", "100%", *FAST)
        assert code == 4, output
        _, devices, decisions = rig.rollout(rid)
        failed = next(d for d in decisions if d.verdict == "fail")
        assert failed.gate == "output-drift" and failed.evidence["outputs"]["output"]["psi"] > 0.2
        assert all(d.state == R.ROLLED_BACK for d in devices)


def test_too_little_data_never_passes_it_halts_as_inconclusive(rig: Rig) -> None:
    with running(rig.sim(2, behaviour(calls_per_window=1))):
        rig.wait_devices(2)
        code, output, rid = start(rig, "--waves", "100%", "--bake", "1s", "--min-samples", "100000",
                                  "--max-wait", "3s", "--activation-timeout", "20s")
        assert code == 4, output
        rollout, devices, decisions = rig.rollout(rid)
        assert "inconclusive" in rollout.outcome
        assert any(d.verdict == "inconclusive" for d in decisions)
        assert not any(d.verdict == "pass" and d.gate == "p95-regression" for d in decisions)
        assert all(d.state == R.ROLLED_BACK for d in devices)


def test_an_offline_device_is_unknown_never_a_success(rig: Rig) -> None:
    config = rig.sim(3, behaviour())
    with running(config):
        rig.wait_devices(3)
    # The simulator stopped: its devices' Wills/offline states mark them offline. Start a second set.
    offline = rig.wait_offline(3)
    with running(rig.sim(3, behaviour(), prefix="live")):
        rig.wait_devices(6 - 3)
        code, output, rid = start(rig, "--waves", "100%", *FAST)
        assert code == 0, output
        rollout, devices, _ = rig.rollout(rid)
        states = {d.device_id: d.state for d in devices}
        assert {states[d] for d in offline} == {R.UNKNOWN}
        assert sorted(s for d, s in states.items() if d not in offline) == [R.ACTIVE] * 3
        assert "3 active, 3 unknown" in rollout.outcome


def test_hostile_device_messages_during_a_rollout_neither_stop_the_controller_nor_fake_its_outcome(rig: Rig) -> None:
    """While a wave runs, something on the broker floods a device's topics with malformed JSON,
    oversized reasons, control characters, an `activated` event for a package the device was not
    told to run and a state claiming it. The collector drops what does not parse; the controller
    keeps stepping and counts the device by what it was told: the rollout completes, and the
    forged claims about another package change nothing."""
    from edgesdk import protocol
    from edgesdk.broker import connect_blocking, disconnect, make_client
    from edgesdk.protocol import InstallEvent, InstallEventKind

    with running(rig.sim(3, behaviour())):
        rig.wait_devices(3)
        target = "sim-00001"
        hostile = make_client("hostile-test", parse_broker_url(rig.url), clean_start=True)
        connect_blocking(hostile, parse_broker_url(rig.url))
        forged = InstallEvent(kind=InstallEventKind.ACTIVATED, package_id="f" * 64, at=time.time(), model="det",
                              rollout_id="ro-forged", reason="\x1b[31m" + "x" * 100_000)
        payloads = [b"{not json", b"[]", b'{"kind": "activated"}', b"\xff\xfe", forged.to_json(),
                    json.dumps({"device_id": target, "online": True, "models": [{"name": "det", "version": "9.9",
                                "package_id": "f" * 64, "provider": "\x1b]8;;evil"}]}).encode()]
        stop = time.monotonic() + 8.0

        def flood() -> None:
            while time.monotonic() < stop:
                for payload in payloads:
                    hostile.publish(protocol.device_events(FLEET, target), payload, qos=1)
                    hostile.publish(protocol.device_telemetry(FLEET, target), payload, qos=1)

        import threading

        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            code, output, rid = start(rig, "--waves", "1,100%", *FAST)
        finally:
            flooder.join()
            disconnect(hostile)
        assert code == 0, output
        rollout, devices, _ = rig.rollout(rid)
        assert rollout.state == R.COMPLETED and {d.state for d in devices} == {R.ACTIVE}
        assert set(rig.wait_versions("2.0", [d.device_id for d in devices]).values()) == {"2.0"}
