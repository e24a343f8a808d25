"""Attacks on what a device is told to run, done for real against a running agent and a real
Mosquitto (python-tuf style: one test per attack). Each asserts that the device still serves its
previous model, reported a `refused` event saying why, and still obeys the next legitimate
deployment."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from edgesdk.package import extract_package
from edgesdk.protocol import InstallEventKind as K
from edgesdk.protocol import sign_statement
from edgesdk.signing import generate_keys, load_private_key, load_public_key
from tests.agent.agent_harness import Rig, deploy, publish_desired, repository, running_agent


def refused(rig: Rig, after: int = 0) -> str:
    event = rig.col.wait_event(K.REFUSED, after=after)
    assert event.reason and "\n" not in event.reason and "Traceback" not in event.reason
    return event.reason


def obeys_next_deploy(rig: Rig, agent, pkg) -> None:  # noqa: ANN001
    """The agent survived the attack: a legitimate statement is still installed and served."""
    deploy(rig.broker.url, rig.device, pkg)
    rig.col.wait_event(K.ACTIVATED, pkg.pid)
    assert rig.served(agent.api.url) == ("v2" if pkg is rig.packages.v2 else "v1")


def test_statement_signed_by_attacker_key_is_refused(rig: Rig, tmp_path) -> None:
    attacker = load_private_key(generate_keys(tmp_path / "attacker").private_path)
    forged = sign_statement(rig.packages.v2.statement(rig.device), attacker)
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        publish_desired(rig.broker.url, rig.device, forged.to_json())
        assert "does not match any trusted key" in refused(rig)
        rig.assert_v1_still_serving(agent)
        assert rig.col.of_kind(K.DOWNLOADING) == []  # nothing was fetched on a forged word
        obeys_next_deploy(rig, agent, rig.packages.v2)


def test_unsigned_desired_message_is_refused(rig: Rig) -> None:
    v2 = rig.packages.v2
    unsigned = rig.packages.v2.statement(rig.device).to_json()  # the statement alone, no signature
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        publish_desired(rig.broker.url, rig.device, unsigned)
        assert "not a signed statement" in refused(rig)
        rig.assert_v1_still_serving(agent)
        obeys_next_deploy(rig, agent, v2)


def test_statement_for_another_device_is_refused(rig: Rig) -> None:
    other = rig.packages.sign(rig.packages.v2.statement("someone-else"))
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        publish_desired(rig.broker.url, rig.device, other.to_json())
        assert "someone-else" in refused(rig)
        rig.assert_v1_still_serving(agent)
        obeys_next_deploy(rig, agent, rig.packages.v2)


def test_statement_dated_2001_is_refused_as_expired(rig: Rig) -> None:
    old = rig.packages.v2.statement(rig.device, issued_at=978307200.0, lifetime_s=30 * 24 * 3600)
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        publish_desired(rig.broker.url, rig.device, rig.packages.sign(old).to_json())
        assert "expired at 2001-" in refused(rig)
        rig.assert_v1_still_serving(agent)
        obeys_next_deploy(rig, agent, rig.packages.v2)


def test_downgrade_to_older_signed_version_is_refused_but_rollback_is_obeyed(rig: Rig) -> None:
    v1, v2 = rig.packages.v1, rig.packages.v2
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        deploy(rig.broker.url, rig.device, v2)
        rig.col.wait_event(K.ACTIVATED, v2.pid)
        # A validly signed statement for the older version, without rollback: the downgrade attack.
        publish_desired(rig.broker.url, rig.device, rig.packages.sign(v1.statement(rig.device)).to_json())
        assert "downgrade refused" in refused(rig)
        assert rig.served(agent.api.url) == "v2"
        deploy(rig.broker.url, rig.device, v1, rollback=True)  # what `edgesdk rollback` sends
        rig.col.wait_event(K.ACTIVATED, v1.pid)
        assert rig.served(agent.api.url) == "v1"


def test_replayed_older_statement_is_refused(rig: Rig) -> None:
    v1, v2 = rig.packages.v1, rig.packages.v2
    # Signed earlier (lower serial), captured by an attacker, replayed after a newer statement.
    captured = rig.packages.sign(v1.statement(rig.device, rollback=True))
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        deploy(rig.broker.url, rig.device, v2)
        rig.col.wait_event(K.ACTIVATED, v2.pid)
        publish_desired(rig.broker.url, rig.device, captured.to_json())
        assert "replayed statement" in refused(rig)
        assert rig.served(agent.api.url) == "v2"
        assert agent.status()["statements"]["serials"]["mlp"] > captured.statement.serial


def test_statement_naming_other_version_than_its_package_is_refused(rig: Rig) -> None:
    # Mix-and-match: v2's bytes (its package id) under a statement that says version 9.0.0.
    v2 = rig.packages.v2
    lying = dataclasses.replace(v2.statement(rig.device), version="9.0.0")
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        publish_desired(rig.broker.url, rig.device, rig.packages.sign(lying).to_json())
        failed = rig.only_failure(v2.pid)
        assert "mix-and-match refused" in failed.reason and "9.0.0" in failed.reason
        rig.assert_v1_still_serving(agent)


def test_poisoned_version_folder_is_not_trusted(rig: Rig) -> None:
    """A versions/<v2 id> folder holding v1's files (what a lying desired message could leave
    behind before statements were signed) must not be activated as v2: it is fetched and verified."""
    v1, v2 = rig.packages.v1, rig.packages.v2
    poisoned = rig.data_dir / "versions" / v2.pid
    extract_package(v1.path, poisoned, [load_public_key(rig.packages.keys.public_path)])
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        deploy(rig.broker.url, rig.device, v2)
        rig.col.wait_event(K.ACTIVATED, v2.pid)
        assert rig.col.of_kind(K.DOWNLOADED, v2.pid)  # the real bytes were fetched and verified
        assert rig.served(agent.api.url) == "v2"


@pytest.mark.parametrize("payload", [
    b"[1,2,3]",
    b"{" * 100_000,
    b'{"statement": "{\\"serial\\": ' + b"9" * 5000 + b'}", "signature": {"keyid": "x", "sig": "00"}}',
    b"\xff\xfe\x00garbage",
    b'{"statement": 5, "signature": []}',
    b'{"statement": "{}", "signature": {"keyid": "k", "sig": "zz"}}',
], ids=["array", "deep-nesting", "huge-int", "not-utf8", "wrong-types", "bad-hex"])
def test_malformed_desired_does_not_kill_the_network_thread(rig: Rig, payload: bytes) -> None:
    with repository(rig.broker.url, rig.packages.repo), running_agent(rig.config()) as agent:
        rig.wait_v1_online()
        publish_desired(rig.broker.url, rig.device, payload)
        refused(rig)
        assert agent.connected.is_set()
        assert agent.errors == {}  # refused by a parser, not caught as an unexpected error
        obeys_next_deploy(rig, agent, rig.packages.v2)  # paho's thread still delivers messages


def test_statement_signed_with_release_key_needs_explicit_consent(rig: Rig) -> None:
    from edgesdk.errors import ConfigError
    from edgesdk.fleet.deploy import check_fleet_key

    release = load_private_key(rig.packages.keys.private_path)
    with pytest.raises(ConfigError, match="release key"):
        check_fleet_key(release, rig.packages.v2.published, allow_release_key=False)
    check_fleet_key(release, rig.packages.v2.published, allow_release_key=True)
    shutil.rmtree(rig.tmp / "unused", ignore_errors=True)


def test_fleet_key_rotated_through_trust_root_without_touching_the_device(rig: Rig, tmp_path) -> None:
    """The device is provisioned with root v1 only. The fleet key is rotated (root v2, signed by
    the root key): a statement from the new key is refused until v2 arrives over MQTT, then obeyed
    (the refused statement is looked at again); the revoked old key is refused from then on."""
    from edgesdk.fleet.deploy import publish_retained
    from edgesdk.protocol import trust_root_topic
    from edgesdk.trustroot import TrustRoot, create_root, root_chain_message, rotate_root
    from tests.agent.agent_harness import FLEET, fast_broker

    root_key = load_private_key(generate_keys(tmp_path / "root").private_path)
    old_fleet = load_private_key(rig.packages.fleet_keys.private_path)
    new_fleet = load_private_key(generate_keys(tmp_path / "fleet2").private_path)
    release = load_public_key(rig.packages.keys.public_path)
    v1_root = create_root([root_key], [release], [old_fleet.public_key()])
    (tmp_path / "root.json").write_bytes(v1_root)
    v2_root = rotate_root(TrustRoot.from_bytes(v1_root), [root_key], fleet_keys=[new_fleet.public_key()])
    config = rig.config(trust_root=str(tmp_path / "root.json"), trusted_keys=None, fleet_keys=None)
    with repository(rig.broker.url, rig.packages.repo), running_agent(config) as agent:
        rig.wait_v1_online()
        new_statement = sign_statement(rig.packages.v2.statement(rig.device), new_fleet)
        publish_desired(rig.broker.url, rig.device, new_statement.to_json())
        assert "does not match any trusted key" in refused(rig)
        publish_retained(fast_broker(rig.broker.url), trust_root_topic(FLEET), root_chain_message([v2_root]))
        rig.col.wait_event(K.ACTIVATED, rig.packages.v2.pid)
        assert agent.guard.root.version == 2
        assert rig.served(agent.api.url) == "v2"
        after = len(rig.col.events)
        revoked = sign_statement(rig.packages.v1.statement(rig.device, rollback=True), old_fleet)
        publish_desired(rig.broker.url, rig.device, revoked.to_json())
        assert "does not match any trusted key" in refused(rig, after=after)
        assert rig.served(agent.api.url) == "v2"
