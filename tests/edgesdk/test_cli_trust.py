"""`edgesdk trust init|rotate|show|publish`: real keys in tmp folders, the real typer app.

Every failure is one `error:` line on stderr with the documented exit code, never a traceback;
a refused command writes nothing.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgesdk.cli import common
from edgesdk.cli.main import app
from edgesdk.signing import generate_keys, key_id, load_private_key, load_public_key
from edgesdk.trustroot import TrustRoot, create_root, parse_root_chain

runner = CliRunner()


@pytest.fixture(autouse=True)
def terminal_80_columns(monkeypatch):
    """Rich wraps to the terminal width; pin 80 columns so a long error line is still one line."""
    monkeypatch.setattr(common.console, "width", 80)
    monkeypatch.setattr(common.out, "width", 80)


class KeyFiles:
    """One key pair per name, each in its own tmp folder (generate_keys(out_dir, overwrite=False))."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _made(self, name: str):
        folder = self.folder / name
        if not folder.exists():
            generate_keys(folder, False)
        return folder

    def private(self, name: str) -> str:
        return str(self._made(name) / "signing.key")

    def public(self, name: str) -> str:
        return str(self._made(name) / "signing.pub")

    def id(self, name: str) -> str:
        return key_id(load_public_key(self.public(name)))


@pytest.fixture
def keyfiles(tmp_path: Path) -> KeyFiles:
    return KeyFiles(tmp_path / "a-rather-long-folder-name-for-keys" / "of-the-fleet-operators")


def assert_clean_failure(result, exit_code: int) -> None:
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error:"), result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def init_args(keyfiles: KeyFiles, out: Path, *, threshold: int = 2) -> list[str]:
    return ["trust", "init", "--root-key", keyfiles.private("root1"), "--root-key", keyfiles.private("root2"),
            "--root-key", keyfiles.private("root3"), "--threshold", str(threshold),
            "--release-key", keyfiles.public("release"), "--fleet-key", keyfiles.public("fleet"),
            "--out", str(out)]


@pytest.fixture
def root_json(tmp_path: Path, keyfiles: KeyFiles) -> Path:
    out = tmp_path / "root.json"
    result = runner.invoke(app, init_args(keyfiles, out))
    assert result.exit_code == 0, result.output
    return out


def show_json(path: Path) -> dict:
    result = runner.invoke(app, ["trust", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- init and show --------------------------------------------------------------------------------
def test_trust_init_then_show_json(tmp_path: Path, keyfiles: KeyFiles):
    out = tmp_path / "root.json"
    result = runner.invoke(app, init_args(keyfiles, out))
    assert result.exit_code == 0, result.output
    assert "trust root version 1" in result.stderr

    info = show_json(out)

    assert info["version"] == 1
    assert info["roles"] == {
        "root": {"threshold": 2, "keys": [keyfiles.id("root1"), keyfiles.id("root2"), keyfiles.id("root3")]},
        "release": {"threshold": 1, "keys": [keyfiles.id("release")]},
        "fleet": {"threshold": 1, "keys": [keyfiles.id("fleet")]},
    }
    assert TrustRoot.from_bytes(out.read_bytes()).expires.isoformat() == info["expires"]


def test_trust_show_prints_a_line_per_role(root_json: Path, keyfiles: KeyFiles):
    result = runner.invoke(app, ["trust", "show", str(root_json)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("trust root version 1, expires ")
    assert lines[2] == f"  release: threshold 1, keys {keyfiles.id('release')}"


def test_trust_init_refuses_an_existing_out_without_force(tmp_path: Path, keyfiles: KeyFiles):
    out = tmp_path / "root.json"
    out.write_bytes(b"the operator's current root")

    assert_clean_failure(runner.invoke(app, init_args(keyfiles, out)), 2)
    assert out.read_bytes() == b"the operator's current root"

    result = runner.invoke(app, [*init_args(keyfiles, out), "--force"])
    assert result.exit_code == 0, result.output
    assert TrustRoot.from_bytes(out.read_bytes()).version == 1


@pytest.mark.parametrize("case", ["missing-root-key", "missing-fleet-key", "public-key-as-root-key",
                                  "private-key-as-fleet-key"])
def test_trust_init_with_a_bad_key_file_is_one_line(tmp_path: Path, keyfiles: KeyFiles, case: str):
    out = tmp_path / "root.json"
    args = init_args(keyfiles, out)
    swap = {"missing-root-key": (keyfiles.private("root1"), str(tmp_path / "nowhere" / "root.key")),
            "missing-fleet-key": (keyfiles.public("fleet"), str(tmp_path / "fleet.pub")),
            "public-key-as-root-key": (keyfiles.private("root2"), keyfiles.public("root2")),
            "private-key-as-fleet-key": (keyfiles.public("fleet"), keyfiles.private("fleet"))}[case]
    args[args.index(swap[0])] = swap[1]

    result = runner.invoke(app, args)

    assert_clean_failure(result, 2)
    assert not out.exists()


@pytest.mark.parametrize("case,code", [("threshold-above-keys", 2), ("threshold-zero", 2), ("out-in-missing-folder", 2),
                                       ("out-is-a-folder", 2)])
def test_trust_init_with_bad_options_is_one_line(tmp_path: Path, keyfiles: KeyFiles, case: str, code: int):
    out = {"out-in-missing-folder": tmp_path / "missing" / "root.json", "out-is-a-folder": tmp_path}.get(
        case, tmp_path / "root.json")
    threshold = {"threshold-above-keys": 4, "threshold-zero": 0}.get(case, 1)
    assert_clean_failure(runner.invoke(app, init_args(keyfiles, out, threshold=threshold)), code)
    assert not (tmp_path / "root.json").exists()


@pytest.mark.parametrize("days", ["nan", "inf", "-1", "0", "1e9"])
def test_trust_init_with_a_lifetime_out_of_range_is_one_line(tmp_path: Path, keyfiles: KeyFiles, days: str):
    out = tmp_path / "root.json"
    result = runner.invoke(app, [*init_args(keyfiles, out), "--expires-days", days])
    assert_clean_failure(result, 2)
    assert "root lifetime" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("content,code", [(None, 2), (b"not a root", 1), (b"{}", 1)])
def test_trust_show_of_a_missing_or_malformed_root_is_one_line(tmp_path: Path, content: bytes | None, code: int):
    path = tmp_path / "root.json"
    if content is not None:
        path.write_bytes(content)
    assert_clean_failure(runner.invoke(app, ["trust", "show", str(path), "--json"]), code)


# -- rotate ---------------------------------------------------------------------------------------
def test_trust_rotate_with_the_threshold_met_writes_the_next_root(tmp_path: Path, keyfiles: KeyFiles,
                                                                    root_json: Path):
    out = tmp_path / "root-2.json"
    result = runner.invoke(app, ["trust", "rotate", "--root", str(root_json), "--sign-with", keyfiles.private("root1"),
                                 "--sign-with", keyfiles.private("root3"), "--fleet-key", keyfiles.public("fleet2"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "trust root version 2" in result.stderr

    info = show_json(out)
    assert info["version"] == 2
    assert info["roles"]["fleet"]["keys"] == [keyfiles.id("fleet2")]  # the old fleet key is revoked
    assert info["roles"]["release"]["keys"] == [keyfiles.id("release")]
    assert info["roles"]["root"] == {"threshold": 2, "keys": [keyfiles.id(k) for k in ("root1", "root2", "root3")]}
    # and a device holding version 1 follows it
    assert TrustRoot.from_bytes(root_json.read_bytes()).follow([out.read_bytes()]).version == 2


def test_trust_rotate_below_the_threshold_fails_and_writes_nothing(tmp_path: Path, keyfiles: KeyFiles,
                                                                    root_json: Path):
    out = tmp_path / "root-2.json"
    result = runner.invoke(app, ["trust", "rotate", "--root", str(root_json), "--sign-with", keyfiles.private("root1"),
                                 "--fleet-key", keyfiles.public("attacker"), "--out", str(out)])
    assert_clean_failure(result, 1)
    assert "threshold" in result.stderr
    assert not out.exists()


def test_trust_rotate_signed_by_keys_outside_the_root_fails(tmp_path: Path, keyfiles: KeyFiles, root_json: Path):
    out = tmp_path / "root-2.json"
    result = runner.invoke(app, ["trust", "rotate", "--root", str(root_json), "--sign-with", keyfiles.private("root1"),
                                 "--sign-with", keyfiles.private("attacker"), "--fleet-key",
                                 keyfiles.public("attacker"), "--out", str(out)])
    assert_clean_failure(result, 1)
    assert not out.exists()


def test_trust_rotate_replaces_the_root_keys_when_asked(tmp_path: Path, keyfiles: KeyFiles, root_json: Path):
    out = tmp_path / "root-2.json"
    result = runner.invoke(app, ["trust", "rotate", "--root", str(root_json), "--sign-with", keyfiles.private("root1"),
                                 "--sign-with", keyfiles.private("root2"), "--new-root-key", keyfiles.private("new1"),
                                 "--new-root-key", keyfiles.private("root2"), "--threshold", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert show_json(out)["roles"]["root"] == {"threshold": 2, "keys": [keyfiles.id("new1"), keyfiles.id("root2")]}


@pytest.mark.parametrize("case,code", [("missing-root", 2), ("missing-signer", 2), ("out-exists", 2)])
def test_trust_rotate_with_missing_files_is_one_line(tmp_path: Path, keyfiles: KeyFiles, root_json: Path,
                                                     case: str, code: int):
    out = tmp_path / "root-2.json"
    if case == "out-exists":
        out.write_bytes(b"keep me")
    root = tmp_path / "nowhere.json" if case == "missing-root" else root_json
    signer = str(tmp_path / "no.key") if case == "missing-signer" else keyfiles.private("root1")
    result = runner.invoke(app, ["trust", "rotate", "--root", str(root), "--sign-with", signer,
                                 "--sign-with", keyfiles.private("root2"), "--out", str(out)])
    assert_clean_failure(result, code)
    assert not out.exists() or out.read_bytes() == b"keep me"


# -- publish --------------------------------------------------------------------------------------
def rotate_to(tmp_path: Path, keyfiles: KeyFiles, root: Path, version: int) -> Path:
    out = tmp_path / f"root-{version}.json"
    result = runner.invoke(app, ["trust", "rotate", "--root", str(root), "--sign-with", keyfiles.private("root1"),
                                 "--sign-with", keyfiles.private("root2"), "--fleet-key",
                                 keyfiles.public(f"fleet{version}"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_trust_publish_refuses_a_chain_with_a_gap_before_connecting(tmp_path: Path, keyfiles: KeyFiles,
                                                                     root_json: Path):
    v2 = rotate_to(tmp_path, keyfiles, root_json, 2)
    v3 = rotate_to(tmp_path, keyfiles, v2, 3)
    # no broker listens on port 9: had it tried to connect, the error would be about the broker
    result = runner.invoke(app, ["trust", "publish", str(root_json), str(v3), "--broker", "mqtt://127.0.0.1:9"])
    assert_clean_failure(result, 1)
    assert "expected root version 2, got 3" in result.stderr


def test_trust_publish_refuses_a_chain_whose_newest_root_expired(tmp_path: Path, keyfiles: KeyFiles,
                                                                   root_json: Path):
    roots = [load_private_key(keyfiles.private(k)) for k in ("root1", "root2", "root3")]
    expired = tmp_path / "root-2.json"
    expired.write_bytes(create_root(roots, [load_public_key(keyfiles.public("release"))],
                                    [load_public_key(keyfiles.public("fleet2"))], threshold=2, version=2,
                                    expires_days=30, now=datetime(2001, 1, 1, tzinfo=timezone.utc)))
    result = runner.invoke(app, ["trust", "publish", str(expired), "--broker", "mqtt://127.0.0.1:9"])
    assert_clean_failure(result, 1)
    assert "trust root version 2 expired at 2001-01-31" in result.stderr


def read_retained(url: str, topic: str, timeout_s: float = 10.0) -> bytes:
    from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url

    config = parse_broker_url(url)
    got, box = threading.Event(), []
    client = make_client(f"test-reader-{uuid.uuid4().hex[:8]}", config, clean_start=True)
    client.on_message = lambda c, u, message: (box.append(message.payload), got.set())
    connect_blocking(client, config, timeout_s)
    try:
        client.subscribe(topic, qos=1)
        assert got.wait(timeout_s), f"no retained message on {topic}"
    finally:
        disconnect(client)
    return box[0]


def test_trust_publish_retains_the_chain_devices_follow(tmp_path: Path, keyfiles: KeyFiles, root_json: Path,
                                                        mosquitto):
    v2 = rotate_to(tmp_path, keyfiles, root_json, 2)
    v3 = rotate_to(tmp_path, keyfiles, v2, 3)

    result = runner.invoke(app, ["trust", "publish", str(v3), str(v2), "--fleet", "plant-7",
                                 "--broker", mosquitto.url])
    assert result.exit_code == 0, result.output
    assert "published trust roots 2, 3 for fleet plant-7" in result.stdout

    chain = parse_root_chain(read_retained(mosquitto.url, "edgesdk/v1/plant-7/trust/root"))
    assert chain == [v2.read_bytes(), v3.read_bytes()]  # oldest first, whatever the order given
    newest = TrustRoot.from_bytes(root_json.read_bytes()).follow(chain)
    assert [key_id(k) for k in newest.keys_for("fleet")] == [keyfiles.id("fleet3")]
