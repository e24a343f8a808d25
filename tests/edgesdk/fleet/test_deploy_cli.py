"""`edgesdk deploy NAME@VERSION` and `edgesdk rollback` as a user runs them: the retained statements
they leave on a real Mosquitto are signed by the fleet key and say what was asked; bad input is one
line and a non-zero exit."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.cli.main import app
from edgesdk.fleet.repository import publish_package
from edgesdk.protocol import SignedStatement
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from tests.fixtures.packages import random_package

FLEET = "cli-fleet"


@pytest.fixture
def repo(tmp_path: Path) -> dict:
    release = generate_keys(tmp_path / "release")
    fleet = generate_keys(tmp_path / "fleet")
    private = load_private_key(release.private_path)
    for version in ("1.0", "2.0"):
        pkg = random_package(tmp_path / f"det-{version}.edgepkg", private, size=8192, name="det", version=version)
        publish_package(pkg, tmp_path / "repo", [load_public_key(release.public_path)])
    return {"repo": tmp_path / "repo", "fleet_key": fleet, "release_key": release}


def retained_statement(url: str, device: str) -> SignedStatement:
    got: list[bytes] = []
    done = threading.Event()
    config = parse_broker_url(url)
    client = make_client(f"read-{device}", config, clean_start=True)
    client.on_connect = lambda c, *a: c.subscribe(protocol.device_desired(FLEET, device), qos=1)
    client.on_message = lambda c, u, m: (got.append(m.payload), done.set())
    connect_blocking(client, config)
    try:
        assert done.wait(10), "no retained statement"
    finally:
        disconnect(client)
    return SignedStatement.from_json(got[0])


def run(args: list[str], url: str):  # noqa: ANN201
    return CliRunner().invoke(app, [*args, "--fleet", FLEET, "--broker", url])


def test_deploy_by_name_and_version_then_rollback_leave_signed_statements(mosquitto, repo) -> None:
    key = str(repo["fleet_key"].private_path)
    deployed = run(["deploy", "det@2.0", "--device", "cam-1", "--repo", str(repo["repo"]), "--fleet-key", key],
                   mosquitto.url)
    assert deployed.exit_code == 0, deployed.output
    first = retained_statement(mosquitto.url, "cam-1")
    first.verify([load_public_key(repo["fleet_key"].public_path)])
    assert (first.statement.name, first.statement.version, first.statement.rollback) == ("det", "2.0", False)

    back = run(["rollback", "det", "--to", "1.0", "--device", "cam-1", "--repo", str(repo["repo"]),
                "--fleet-key", key], mosquitto.url)
    assert back.exit_code == 0, back.output
    second = retained_statement(mosquitto.url, "cam-1")
    second.verify([load_public_key(repo["fleet_key"].public_path)])
    assert (second.statement.version, second.statement.rollback) == ("1.0", True)
    assert second.statement.serial > first.statement.serial


@pytest.mark.parametrize("args, message", [
    (["deploy", "det@9.9", "--device", "cam-1"], "det@9.9 is not published (published: det@1.0, det@2.0)"),
    (["deploy", "nope@1.0", "--device", "cam-1"], "no package named 'nope'"),
    (["rollback", "det", "--to", "0.1", "--device", "cam-1"], "det@0.1 is not published"),
    (["deploy", "det@2.0", "--device", "-cam"], "invalid device id '-cam'"),
])
def test_bad_deploy_requests_fail_in_one_line(mosquitto, repo, args: list[str], message: str) -> None:
    result = run([*args, "--repo", str(repo["repo"]), "--fleet-key", str(repo["fleet_key"].private_path)],
                 mosquitto.url)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_release_key_as_fleet_key_needs_consent(mosquitto, repo) -> None:
    args = ["deploy", "det@2.0", "--device", "cam-1", "--repo", str(repo["repo"]),
            "--fleet-key", str(repo["release_key"].private_path)]
    refused = run(args, mosquitto.url)
    assert refused.exit_code != 0 and "is the release key" in refused.output
    assert run([*args, "--release-key-as-fleet-key"], mosquitto.url).exit_code == 0
