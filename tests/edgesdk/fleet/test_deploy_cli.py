"""`edgesdk deploy NAME@VERSION`, `edgesdk rollback` and `edgesdk undeploy NAME` as a user runs them:
the retained statements they leave on a real Mosquitto (one topic per device and model name) are
signed by the fleet key and say what was asked; `undeploy` waits for the device's `undeployed`
event (a paho client playing the device) and clears the statement; bad input is one line and a
non-zero exit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.cli.deploy_cmd import UNCONFIRMED_EXIT
from edgesdk.cli.main import app
from edgesdk.fleet.deploy import publish_retained
from edgesdk.fleet.retained import read_retained
from edgesdk.fleet.repository import publish_package
from edgesdk.protocol import DeviceState, InstallEvent, InstallEventKind, SignedStatement
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from tests.fixtures.packages import random_package

FLEET = "cli-fleet"
WAIT_S = 10.0


@pytest.fixture
def repo(tmp_path: Path) -> dict:
    release = generate_keys(tmp_path / "release")
    fleet = generate_keys(tmp_path / "fleet")
    private = load_private_key(release.private_path)
    for name, version in (("det", "1.0"), ("det", "2.0"), ("ocr", "1.0")):
        pkg = random_package(tmp_path / f"{name}-{version}.edgepkg", private, size=8192, name=name, version=version)
        publish_package(pkg, tmp_path / "repo", [load_public_key(release.public_path)])
    return {"repo": tmp_path / "repo", "fleet_key": fleet, "release_key": release, "tmp": tmp_path}


def retained(url: str, topic_filter: str, marker_topic: str | None = None) -> dict[str, bytes]:
    """Every retained message under ``topic_filter`` (topic -> payload), read behind a marker on
    ``marker_topic`` (a topic the filter matches): `edgesdk.fleet.retained.read_retained`."""
    return read_retained(parse_broker_url(url), topic_filter, marker_topic or topic_filter, timeout_s=WAIT_S)


def retained_statement(url: str, device: str, name: str = "det") -> SignedStatement:
    topic = protocol.device_desired(FLEET, device, name)
    payload = retained(url, topic).get(topic)
    assert payload, f"no retained statement on {topic}"
    return SignedStatement.from_json(payload, topic)


class FakeDevice:
    """A paho client that plays device ``device_id``: it answers every undeploy statement on its
    desired topics with a real InstallEvent for that model on its events topic (`undeployed`, or
    ``answer`` with ``reason``)."""

    def __init__(self, url: str, device_id: str, answer: InstallEventKind = InstallEventKind.UNDEPLOYED,
                 reason: str | None = None) -> None:
        self.config = parse_broker_url(url)
        self.device_id = device_id
        self.answer, self.reason = answer, reason
        self.seen: list[SignedStatement] = []
        self.subscribed = threading.Event()
        self.client = make_client(device_id, self.config, clean_start=True)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:  # a cleared statement: ignored, as the agent does
            return
        signed = SignedStatement.from_json(msg.payload, msg.topic)
        self.seen.append(signed)
        if signed.statement.undeploy:
            event = InstallEvent(kind=self.answer, package_id="", at=time.time(), model=signed.statement.name,
                                 reason=self.reason)
            client.publish(protocol.device_events(FLEET, self.device_id), event.to_json(), qos=1)

    def __enter__(self) -> FakeDevice:
        connect_blocking(self.client, self.config)
        self.client.subscribe(protocol.device_desired_filter(FLEET, self.device_id), qos=1)
        assert self.subscribed.wait(WAIT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        disconnect(self.client)


def run(args: list[str], url: str):  # noqa: ANN201
    # The devices here are test clients the fleet store has never seen.
    return CliRunner().invoke(app, [*args, "--fleet", FLEET, "--broker", url, "--allow-unknown"])


def deploy_args(repo: dict, release: str, *devices: str) -> list[str]:
    return ["deploy", release, *[a for d in devices for a in ("--device", d)], "--repo", str(repo["repo"]),
            "--fleet-key", str(repo["fleet_key"].private_path)]


def undeploy_args(repo: dict, name: str, *devices: str, wait: float | None = None) -> list[str]:
    return ["undeploy", name, *[a for d in devices for a in ("--device", d)],
            "--fleet-key", str(repo["fleet_key"].private_path), *([] if wait is None else ["--wait", f"{wait:g}"])]


# -- deploy and rollback ----------------------------------------------------------------------------
def test_deploy_by_name_and_version_then_rollback_leave_signed_statements(mosquitto, repo) -> None:
    key = str(repo["fleet_key"].private_path)
    deployed = run(deploy_args(repo, "det@2.0", "cam-1"), mosquitto.url)
    assert deployed.exit_code == 0, deployed.output
    assert "det@2.0" in deployed.output
    first = retained_statement(mosquitto.url, "cam-1")
    first.verify([load_public_key(repo["fleet_key"].public_path)])
    assert (first.statement.name, first.statement.version, first.statement.rollback) == ("det", "2.0", False)

    back = run(["rollback", "det", "--to", "1.0", "--immediate", "--device", "cam-1", "--repo", str(repo["repo"]),
                "--fleet-key", key], mosquitto.url)
    assert back.exit_code == 0, back.output
    assert "rollback to det@1.0" in back.output
    second = retained_statement(mosquitto.url, "cam-1")
    second.verify([load_public_key(repo["fleet_key"].public_path)])
    assert (second.statement.version, second.statement.rollback) == ("1.0", True)
    assert second.statement.serial > first.statement.serial


def test_two_models_on_one_device_have_their_own_statements(mosquitto, repo) -> None:
    for release in ("det@1.0", "ocr@1.0"):
        result = run(deploy_args(repo, release, "cam-1"), mosquitto.url)
        assert result.exit_code == 0, result.output
    before = retained(mosquitto.url, protocol.device_desired_filter(FLEET, "cam-1"),
                      protocol.device_desired(FLEET, "cam-1", "marker"))
    assert set(before) == {protocol.device_desired(FLEET, "cam-1", n) for n in ("det", "ocr")}

    again = run(deploy_args(repo, "det@2.0", "cam-1"), mosquitto.url)

    assert again.exit_code == 0, again.output
    after = retained(mosquitto.url, protocol.device_desired_filter(FLEET, "cam-1"),
                     protocol.device_desired(FLEET, "cam-1", "marker"))
    ocr_topic, det_topic = (protocol.device_desired(FLEET, "cam-1", n) for n in ("ocr", "det"))
    assert after[ocr_topic] == before[ocr_topic]  # byte for byte: the other model's statement untouched
    assert SignedStatement.from_json(after[det_topic]).statement.version == "2.0"


@pytest.mark.parametrize("args, message", [
    (["deploy", "det@9.9", "--device", "cam-1"], "det@9.9 is not published (published: det@1.0, det@2.0)"),
    (["deploy", "nope@1.0", "--device", "cam-1"], "no package named 'nope'"),
    (["rollback", "det", "--to", "0.1", "--immediate", "--device", "cam-1"], "det@0.1 is not published"),
    (["deploy", "det@2.0", "--device", "-cam"], "invalid device id '-cam'"),
])
def test_bad_deploy_requests_fail_in_one_line(mosquitto, repo, args: list[str], message: str) -> None:
    result = run([*args, "--repo", str(repo["repo"]), "--fleet-key", str(repo["fleet_key"].private_path)],
                 mosquitto.url)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_package_whose_name_is_not_a_model_name_is_not_deployed(mosquitto, repo) -> None:
    release = load_private_key(repo["release_key"].private_path)
    pkg = random_package(repo["tmp"] / "bad.edgepkg", release, size=4096, name="my model", version="1.0")
    publish_package(pkg, repo["repo"], [load_public_key(repo["release_key"].public_path)])

    result = run(deploy_args(repo, "my model@1.0", "cam-1"), mosquitto.url)

    assert result.exit_code != 0
    assert "invalid package name (in my model@1.0) 'my model'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    root = protocol.fleet_root(FLEET)
    assert retained(mosquitto.url, f"{root}/#", f"{root}/marker") == {}


def test_release_key_as_fleet_key_needs_consent(mosquitto, repo) -> None:
    args = ["deploy", "det@2.0", "--device", "cam-1", "--repo", str(repo["repo"]),
            "--fleet-key", str(repo["release_key"].private_path)]
    refused = run(args, mosquitto.url)
    assert refused.exit_code != 0 and "is the release key" in refused.output
    assert run([*args, "--release-key-as-fleet-key"], mosquitto.url).exit_code == 0


# -- undeploy ---------------------------------------------------------------------------------------
def test_undeploy_replaces_that_models_statement_with_a_signed_undeploy_statement(mosquitto, repo) -> None:
    for release in ("det@2.0", "ocr@1.0"):
        assert run(deploy_args(repo, release, "cam-1", "cam-2"), mosquitto.url).exit_code == 0
    ocr_before = retained_statement(mosquitto.url, "cam-1", "ocr")

    result = run(undeploy_args(repo, "det", "cam-1", "cam-2", wait=0), mosquitto.url)

    assert result.exit_code == 0, result.output
    for device in ("cam-1", "cam-2"):
        signed = retained_statement(mosquitto.url, device, "det")
        signed.verify([load_public_key(repo["fleet_key"].public_path)])
        st = signed.statement
        assert (st.undeploy, st.name, st.device, st.fleet, st.package_id, st.version) == (
            True, "det", device, FLEET, "", "")
    assert retained_statement(mosquitto.url, "cam-1", "ocr") == ocr_before
    assert "not waiting" in result.output


def test_undeploy_confirmed_by_the_device_clears_its_statement(mosquitto, repo) -> None:
    assert run(deploy_args(repo, "det@2.0", "cam-1"), mosquitto.url).exit_code == 0
    assert run(deploy_args(repo, "ocr@1.0", "cam-1"), mosquitto.url).exit_code == 0
    with FakeDevice(mosquitto.url, "cam-1") as device:
        result = run(undeploy_args(repo, "det", "cam-1", wait=WAIT_S), mosquitto.url)
    assert result.exit_code == 0, result.output
    assert "cam-1: undeployed it — confirmed; retained statement on desired/det cleared" in result.output
    assert any(s.statement.undeploy and s.statement.name == "det" for s in device.seen)
    left = retained(mosquitto.url, protocol.device_desired_filter(FLEET, "cam-1"),
                    protocol.device_desired(FLEET, "cam-1", "marker"))
    assert list(left) == [protocol.device_desired(FLEET, "cam-1", "ocr")]  # det's cleared, ocr's kept


def test_undeploy_without_an_answer_exits_3_and_the_statement_stays(mosquitto, repo) -> None:
    started = time.monotonic()
    result = run(undeploy_args(repo, "det", "cam-1", wait=1), mosquitto.url)
    assert result.exit_code == UNCONFIRMED_EXIT == 3, result.output
    assert time.monotonic() - started >= 1.0
    assert "cam-1: not confirmed within 1 s: its undeploy statement stays retained" in result.output
    assert retained_statement(mosquitto.url, "cam-1", "det").statement.undeploy


def test_device_refusing_the_undeploy_statement_is_reported_literally(mosquitto, repo) -> None:
    hostile = "[bold red]untrusted key\x1b[2J"
    with FakeDevice(mosquitto.url, "cam-1", InstallEventKind.REFUSED, hostile):
        result = run(undeploy_args(repo, "det", "cam-1", wait=1), mosquitto.url)
    assert result.exit_code == 3, result.output
    assert ("cam-1: not confirmed within 1 s: its undeploy statement stays retained (it refused the statement: "
            "[bold red]untrusted key\\x1b[2J)") in result.output
    assert retained_statement(mosquitto.url, "cam-1", "det").statement.undeploy


def test_undeploy_counts_a_device_whose_state_lacks_the_model_but_not_an_older_agent(mosquitto, repo) -> None:
    """cam-2 is online and runs only ocr (it had already undeployed det); cam-3's state has no
    `models` list but an active package (an agent too old to say which model it runs)."""
    config = parse_broker_url(mosquitto.url)
    states = {
        "cam-2": DeviceState("cam-2", True, models=[{"name": "ocr", "version": "1.0", "package_id": "ab" * 32,
                                                      "variant": "onnx-fp32", "provider": "CPU",
                                                      "runtime": "onnxruntime"}]),
        "cam-3": DeviceState("cam-3", True, active_package="ab" * 32),
    }
    for device, state in states.items():
        publish_retained(config, protocol.device_state(FLEET, device), state.to_json())

    result = run(undeploy_args(repo, "det", "cam-2", "cam-3", wait=1), mosquitto.url)

    assert result.exit_code == 3, result.output
    assert "cam-2: was not running it — confirmed; retained statement on desired/det cleared" in result.output
    assert "cam-3: not confirmed within 1 s" in result.output
    root = protocol.fleet_root(FLEET)
    left = retained(mosquitto.url, protocol.devices_filter(FLEET, "desired/+"), f"{root}/devices/x/desired/marker")
    assert list(left) == [protocol.device_desired(FLEET, "cam-3", "det")]


@pytest.mark.parametrize("name", ["my model", "_det", ".det", "a/b", "det#", "x" * 65])
def test_undeploy_of_a_name_that_is_not_a_model_name_fails_in_one_line(mosquitto, repo, name: str) -> None:
    result = run(undeploy_args(repo, name, "cam-1"), mosquitto.url)
    assert result.exit_code != 0
    assert f"invalid model name {name!r}" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    root = protocol.fleet_root(FLEET)
    assert retained(mosquitto.url, f"{root}/#", f"{root}/marker") == {}
