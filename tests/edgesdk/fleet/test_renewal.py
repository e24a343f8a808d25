"""The fleet service keeps live statements alive (re-signs them before they expire, deploy and
undeploy statements alike, each on its own device's and model's topic) and never renews a
statement it did not sign or one that sits on another model's topic. Real Mosquitto, real signatures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.fleet.deploy import deploy, publish_statements, sign_undeploy, write_desired
from edgesdk.fleet.renewal import StatementRenewer
from edgesdk.fleet.repository import publish_package
from edgesdk.protocol import SignedStatement, sign_statement
from edgesdk.signing import generate_keys, load_private_key
from tests.edgesdk.fleet.test_repository import make_package

FLEET = "renew-fleet"


class RetainedWatcher:
    """Every statement published on the fleet's desired topics, with its topic, as it arrives."""

    def __init__(self, url: str) -> None:
        self.config = parse_broker_url(url)
        self.got: list[tuple[str, SignedStatement]] = []
        self.cond = threading.Condition()
        self.client = make_client(f"watch-{time.monotonic_ns()}", self.config, clean_start=True)
        self.client.on_connect = lambda c, *a: c.subscribe(protocol.devices_filter(FLEET, "desired/+"), qos=1)
        self.client.on_message = self._on_message

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self.cond:
            self.got.append((msg.topic, SignedStatement.from_json(msg.payload, msg.topic)))
            self.cond.notify_all()

    def wait_renewed(self, device: str, name: str, after: SignedStatement, timeout: float = 20.0) -> SignedStatement:
        """The first statement on `desired/{name}` of ``device`` with a serial above ``after``'s."""
        topic = protocol.device_desired(FLEET, device, name)

        def found() -> list[SignedStatement]:
            return [s for t, s in self.got if t == topic and s.statement.serial > after.statement.serial]

        with self.cond:
            if not self.cond.wait_for(found, timeout):
                raise AssertionError(f"{topic} not renewed; seen: {[(t, s.statement.serial) for t, s in self.got]}")
            return found()[0]


def test_live_statements_are_reissued_on_their_topics_and_foreign_ones_are_not(mosquitto, tmp_path: Path) -> None:
    pkg, pub = make_package(tmp_path)
    published = publish_package(pkg, tmp_path / "repo")
    fleet_key = load_private_key(generate_keys(tmp_path / "fleet").private_path)
    attacker = load_private_key(generate_keys(tmp_path / "attacker").private_path)
    config = parse_broker_url(mosquitto.url)
    deployed = deploy(config, FLEET, ["dev-a"], published, fleet_key, lifetime_s=4.0)["dev-a"]
    undeployed = sign_undeploy(FLEET, ["dev-a"], "ocr", fleet_key, lifetime_s=4.0)["dev-a"]
    publish_statements(config, FLEET, [undeployed])
    forged = sign_statement(published.statement(FLEET, "dev-b", 1, lifetime_s=4.0), attacker)
    write_desired(config, FLEET, published.name, {"dev-b": forged.to_json()})
    # Genuine, but on another model's topic: renewing it there would give that model this package.
    misplaced = sign_statement(published.statement(FLEET, "dev-c", 1, lifetime_s=4.0), fleet_key)
    write_desired(config, FLEET, "other", {"dev-c": misplaced.to_json()})

    watcher = RetainedWatcher(mosquitto.url)
    connect_blocking(watcher.client, watcher.config)
    renewer = StatementRenewer(config, FLEET, fleet_key, lifetime_s=60.0, renew_before_s=3.9, check_every_s=0.1)
    renewer.start()
    try:
        renewed = watcher.wait_renewed("dev-a", published.name, deployed)
        renewed_undeploy = watcher.wait_renewed("dev-a", "ocr", undeployed)
        # The two refusals happen on paho's thread as the retained messages arrive: no event to
        # wait on, so poll the counter, bounded.
        deadline = time.monotonic() + 10
        while renewer.ignored < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        renewer.stop()
        disconnect(watcher.client)
    for fresh, old in ((renewed, deployed), (renewed_undeploy, undeployed)):
        fresh.verify([fleet_key.public_key()])
        assert fresh.statement == old.statement.reissued(fresh.statement.serial, fresh.statement.issued_at, 60.0)
    assert renewed_undeploy.statement.undeploy and renewed_undeploy.statement.name == "ocr"
    assert renewer.ignored == 2  # the forged dev-b statement and the misplaced dev-c one
    assert set(renewer.live) == {("dev-a", published.name), ("dev-a", "ocr")}
    assert not any(s.statement.device in ("dev-b", "dev-c") and s.statement.serial > 1 for _, s in watcher.got)
