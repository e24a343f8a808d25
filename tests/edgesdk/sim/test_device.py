"""A simulated device obeys exactly the statements a real agent obeys (table of attacks), and its
installs, undeploys and telemetry change what it reports. No broker: the rules alone."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgesdk import protocol
from edgesdk.protocol import DeploymentStatement, InstallEventKind as K, sign_statement, undeploy_statement
from edgesdk.protocol.histogram import histogram_of
from edgesdk.sim import DEFAULT_BEHAVIOUR, FleetTrust, SimDevice, parse_behaviour
from edgesdk.sim.windows import fake_package_id

FLEET, DEVICE = "f", "sim-00001"
KEY = Ed25519PrivateKey.generate()
TRUST = FleetTrust(keys=(KEY.public_key(),))


def statement(version: str = "2.0", serial: int = 10, **changes: object) -> DeploymentStatement:
    now = time.time()
    base = DeploymentStatement(fleet=FLEET, device=DEVICE, package_id=fake_package_id("det", version), name="det",
                               version=version, target="t", size=5000, block_size=4096, blocks_digest="a" * 64,
                               serial=serial, issued_at=now, expires=now + 3600)
    return replace(base, **changes)  # type: ignore[arg-type]


def device(**behaviour: object) -> tuple[SimDevice, object]:
    b = parse_behaviour({"default": behaviour}) if behaviour else DEFAULT_BEHAVIOUR
    dev = SimDevice(1, DEVICE, FLEET, "nano", {"site": "x"}, 60.0)
    return dev, b.for_release


def consider(dev: SimDevice, behaviour_of: object, payload: bytes, name: str = "det"):
    topic = protocol.device_desired(FLEET, DEVICE, name)
    return dev.consider(name, payload, topic, TRUST, time.time(), behaviour_of, np.random.default_rng(0))


def run_to_end(dev: SimDevice, run) -> list:  # noqa: ANN001
    events = []
    while run.done < len(run.steps):
        events.append(dev.step(run, time.time())[0])
    return events


def test_an_obeyed_statement_runs_every_install_step_and_activates_the_release() -> None:
    dev, behaviour_of = device()
    verdict = consider(dev, behaviour_of, sign_statement(statement(rollout_id="r1"), KEY).to_json())
    assert verdict.event is None and verdict.run is not None
    events = run_to_end(dev, verdict.run)
    assert [e.kind for e in events] == [K.DOWNLOADING, K.DOWNLOADED, K.VERIFIED, K.EXTRACTED, K.SELECTED,
                                        K.HEALTH_CHECKED, K.ACTIVATED]
    assert {(e.model, e.rollout_id, e.package_id) for e in events} == {("det", "r1", fake_package_id("det", "2.0"))}
    state = dev.state(online=True, now=1.0)
    assert state.model("det")["version"] == "2.0" and state.active_package == fake_package_id("det", "2.0")
    assert (state.hardware_class, state.labels, state.telemetry_interval_s) == ("nano", {"site": "x"}, 60.0)


@pytest.mark.parametrize("make, reason", [
    (lambda: sign_statement(statement(), Ed25519PrivateKey.generate()).to_json(), "refused"),  # forged
    (lambda: sign_statement(statement(device="other"), KEY).to_json(), "not 'sim-00001'"),
    (lambda: sign_statement(statement(fleet="g"), KEY).to_json(), "of fleet 'g'"),
    (lambda: sign_statement(statement(issued_at=1.0, expires=2.0), KEY).to_json(), "expired"),
    (lambda: sign_statement(statement(name="ocr"), KEY).to_json(), "misfiled"),
    (lambda: statement().to_json(), "not a signed statement"),  # unsigned
    (lambda: b"{not json", "not valid JSON"),
])
def test_a_statement_the_agent_would_refuse_is_refused_with_an_event(make, reason: str) -> None:  # noqa: ANN001
    dev, behaviour_of = device()
    verdict = consider(dev, behaviour_of, make())
    assert verdict.run is None and verdict.event is not None
    assert verdict.event.kind is K.REFUSED and verdict.event.model == "det" and reason in verdict.event.reason
    assert dev.models == {}


def test_replay_downgrade_and_redelivery_follow_the_per_name_serials() -> None:
    dev, behaviour_of = device()
    first = sign_statement(statement("2.0", serial=10), KEY).to_json()
    run_to_end(dev, consider(dev, behaviour_of, first).run)
    assert consider(dev, behaviour_of, first).redelivered  # the retained message again: ignored
    older = consider(dev, behaviour_of, sign_statement(statement("3.0", serial=9), KEY).to_json())
    assert "replayed" in older.event.reason
    down = consider(dev, behaviour_of, sign_statement(statement("1.0", serial=11), KEY).to_json())
    assert "downgrade refused" in down.event.reason
    back = consider(dev, behaviour_of, sign_statement(statement("1.0", serial=12, rollback=True), KEY).to_json())
    run_to_end(dev, back.run)
    assert dev.active_version("det") == "1.0"
    # Another name has its own serials: serial 5 is not a replay for "ocr".
    ocr = replace(statement(serial=5), name="ocr", package_id=fake_package_id("ocr", "1.0"), version="1.0")
    assert consider(dev, behaviour_of, sign_statement(ocr, KEY).to_json(), name="ocr").run is not None


def test_undeploy_removes_the_model_and_closes_its_window() -> None:
    dev, behaviour_of = device()
    run_to_end(dev, consider(dev, behaviour_of, sign_statement(statement(), KEY).to_json()).run)
    gone = sign_statement(undeploy_statement(FLEET, DEVICE, "det", serial=20, now=time.time()), KEY).to_json()
    [event] = run_to_end(dev, consider(dev, behaviour_of, gone).run)
    assert (event.kind, event.model, event.package_id) == (K.UNDEPLOYED, "det", fake_package_id("det", "2.0"))
    assert dev.models == {} and dev.state(True, 0.0).models == []
    windows = dev.roll(time.time(), np.random.default_rng(0), send=True)
    assert [w.model for w in windows] == ["det"]  # the closed window of the undeployed model
    assert [w.model for w in dev.roll(time.time(), np.random.default_rng(0), send=True)] == [None]  # heartbeat


def test_an_install_that_fails_keeps_the_previous_release() -> None:
    dev, behaviour_of = device(install_failure_rate=1.0)
    dev.activate("det", "1.0", fake_package_id("det", "1.0"), DEFAULT_BEHAVIOUR.for_release("det", "1.0", None), 0.0)
    events = run_to_end(dev, consider(dev, behaviour_of, sign_statement(statement(), KEY).to_json()).run)
    assert events[-1].kind is K.FAILED and "simulated install failure" in events[-1].reason
    assert K.ACTIVATED not in [e.kind for e in events] and dev.active_version("det") == "1.0"


def test_windows_take_one_seq_each_and_offline_ones_are_counted_as_dropped() -> None:
    dev, _ = device()
    for name in ("b", "a"):
        dev.activate(name, "1", fake_package_id(name, "1"), DEFAULT_BEHAVIOUR.for_release(name, "1", None), 0.0)
    rng = np.random.default_rng(0)
    first = dev.roll(60.0, rng, send=True)
    assert [(w.seq, w.model) for w in first] == [(0, "a"), (1, "b")]
    assert dev.roll(120.0, rng, send=False) == [] and dev.dropped_windows == 2
    third = dev.roll(180.0, rng, send=True)
    assert [(w.seq, w.dropped_windows, w.window_start, w.window_end) for w in third] == [
        (4, 2, 120.0, 180.0), (5, 2, 120.0, 180.0)]
    assert all(histogram_of(w).count == w.count - w.errors for w in first + third)
