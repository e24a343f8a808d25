"""`edgesdk sim` options that need no broker: --start-with looked up in --repo (or a fake id),
fleet keys from --fleet-key-pub or a trust root, and one-line errors for each bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from edgesdk.cli.main import app
from edgesdk.cli.sim_cmd import _credentials, _start_releases, _trust
from edgesdk.errors import ConfigError, EdgeError
from edgesdk.fleet.repository import publish_package
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from edgesdk.sim import StartRelease, fake_package_id
from edgesdk.trustroot import create_root
from tests.fixtures.packages import random_package


def test_start_with_takes_the_package_id_from_the_repository(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "release")
    pkg = random_package(tmp_path / "det.edgepkg", load_private_key(keys.private_path), size=4096, name="det",
                         version="2.0")
    published = publish_package(pkg, tmp_path / "repo", [load_public_key(keys.public_path)])
    assert _start_releases(["det@2.0"], tmp_path / "repo", None) == (StartRelease("det", "2.0", published.package_id),)
    with pytest.raises(EdgeError, match=r"det@9 is not published \(published: det@2.0\)"):
        _start_releases(["det@9"], tmp_path / "repo", None)


def test_start_with_without_a_repository_uses_the_sha256_of_the_release_text() -> None:
    [release] = _start_releases(["det@2.0"], None, None)
    assert release.package_id == fake_package_id("det", "2.0") and len(release.package_id) == 64
    with pytest.raises(ConfigError, match="expected NAME@VERSION"):
        _start_releases(["det"], None, None)


def test_devices_trust_the_fleet_keys_of_a_trust_root(tmp_path: Path) -> None:
    fleet = Ed25519PrivateKey.generate()
    root = tmp_path / "root.json"
    root.write_bytes(create_root([Ed25519PrivateKey.generate()], [Ed25519PrivateKey.generate().public_key()],
                                 [fleet.public_key()]))
    [key] = _trust([], root).fleet_keys(now=0.0)
    assert key == fleet.public_key()
    with pytest.raises(ConfigError, match="not both"):
        _trust([tmp_path / "fleet.pub"], root)


def test_credentials_are_a_mapping_of_device_to_password(tmp_path: Path) -> None:
    good, bad = tmp_path / "c.yaml", tmp_path / "bad.yaml"
    good.write_text("sim-00000: secret\n")
    bad.write_text("- sim-00000\n")
    assert _credentials(good) == {"sim-00000": "secret"}
    with pytest.raises(ConfigError, match="expected a mapping of device id -> password"):
        _credentials(bad)


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "--devices must be 1..1000000"),
    (["--devices", "2", "--prefix", "bad/prefix"], "--prefix 'bad/prefix'"),
    (["--devices", "2", "--fleet", "a+b"], "--fleet 'a+b'"),
    (["--devices", "2", "--telemetry-interval", "0"], "--telemetry-interval must be > 0"),
    (["--devices", "2", "--label", "novalue"], "expected key=value"),
    (["--devices", "2", "--fleet-key-pub", "/nonexistent.pub"], "/nonexistent.pub"),
    (["--devices", "2", "--broker", "http://x"], "scheme must be mqtt:// or mqtts://"),
])
def test_bad_options_fail_in_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["sim", *args])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_run_in_which_no_device_connects_fails_with_the_reason() -> None:
    from tests.fixtures.broker import free_port

    result = CliRunner().invoke(app, ["sim", "--devices", "2", "--broker", f"mqtt://127.0.0.1:{free_port()}",
                                      "--duration", "0.5", "--progress", "0"])
    assert result.exit_code == 1
    assert "no simulated device could connect" in result.output and "connection refused" in result.output
