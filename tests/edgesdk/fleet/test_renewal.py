"""The fleet service keeps live statements alive (re-signs them before they expire) and never
renews a statement it did not sign. Real Mosquitto, real signatures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edgesdk import protocol
from edgesdk.broker import connect_blocking, disconnect, make_client, parse_broker_url
from edgesdk.fleet.deploy import deploy, write_desired
from edgesdk.fleet.renewal import StatementRenewer
from edgesdk.fleet.repository import publish_package
from edgesdk.protocol import SignedStatement, sign_statement
from edgesdk.signing import generate_keys, load_private_key
from tests.edgesdk.fleet.test_repository import make_package

FLEET = "renew-fleet"


class RetainedWatcher:
    """Every statement published on the fleet's desired topics, as it arrives."""

    def __init__(self, url: str) -> None:
        self.config = parse_broker_url(url)
        self.got: list[SignedStatement] = []
        self.cond = threading.Condition()
        self.client = make_client(f"watch-{time.monotonic_ns()}", self.config, clean_start=True)
        self.client.on_connect = lambda c, *a: c.subscribe(protocol.devices_filter(FLEET, "desired"), qos=1)
        self.client.on_message = self._on_message

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self.cond:
            self.got.append(SignedStatement.from_json(msg.payload, msg.topic))
            self.cond.notify_all()

    def wait(self, predicate, timeout: float = 20.0):  # noqa: ANN001, ANN201
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.got), timeout):
                raise AssertionError(f"timed out; statements seen: {[s.statement.serial for s in self.got]}")
            return [s for s in self.got if predicate([s])]


def test_live_statement_is_reissued_before_it_expires_and_forged_one_is_not(mosquitto, tmp_path: Path) -> None:
    pkg, pub = make_package(tmp_path)
    published = publish_package(pkg, tmp_path / "repo")
    fleet_key = load_private_key(generate_keys(tmp_path / "fleet").private_path)
    attacker = load_private_key(generate_keys(tmp_path / "attacker").private_path)
    config = parse_broker_url(mosquitto.url)
    first = deploy(config, FLEET, ["dev-a"], published, fleet_key, lifetime_s=4.0)["dev-a"]
    forged = sign_statement(published.statement(FLEET, "dev-b", 1, lifetime_s=4.0), attacker)
    write_desired(config, FLEET, {"dev-b": forged.to_json()})

    watcher = RetainedWatcher(mosquitto.url)
    connect_blocking(watcher.client, watcher.config)
    renewer = StatementRenewer(config, FLEET, fleet_key, lifetime_s=60.0, renew_before_s=3.9, check_every_s=0.1)
    renewer.start()
    try:
        renewed = watcher.wait(lambda got: any(s.statement.device == "dev-a" and s.statement.serial > first.statement.serial
                                               for s in got))[-1]
    finally:
        renewer.stop()
        disconnect(watcher.client)
    assert renewed.verify([fleet_key.public_key()])
    assert renewed.statement.package_id == first.statement.package_id
    assert renewed.statement.expires - renewed.statement.issued_at == 60.0
    assert renewer.ignored >= 1  # the forged dev-b statement was seen and not renewed
    assert not any(s.statement.device == "dev-b" and s.statement.serial > 1 for s in watcher.got)
