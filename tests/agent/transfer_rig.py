"""What test_transfer.py and test_transfer_attacks.py share: a 2 MiB package published in small
blocks, and devices and repositories logged in to a broker started with the shipped policy
(`edgesdk broker config`: TLS, one login per device, the ACL of edgesdk.fleet.broker_policy).

Every test gets its own fleet name and device id, so most tests share one broker
(`secure_mosquitto_session`): a fleet's topics, its repository's shared subscription and a
device's persistent session are then the test's alone. Tests that kill the broker start their own.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.transfer import PackageFetcher
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.fleet.repository import PublishedPackage, RepositoryServer, publish_package
from edgesdk.protocol import DeploymentStatement
from edgesdk.signing import generate_keys, load_private_key
from tests.fixtures.broker import SecureMosquitto
from tests.fixtures.packages import random_package

BLOCK = 64 * 1024  # small blocks: many of them from a 2 MiB package keeps the tests fast
SIZE = 2 * 1024 * 1024
FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "connect_timeout_s": 5}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def fleet_service(broker: SecureMosquitto, **timings: float) -> BrokerConfig:
    """The fleet service's login (repository, deployments): the only one that may read block
    requests and write block responses."""
    return broker.config(*broker.fleet_service, **{**FAST, **timings})


def repository_server(broker: SecureMosquitto, fleet: str, repo_dir: Path, **options: object) -> RepositoryServer:
    """A repository as `edgesdk serve` runs one: the fleet-service login and the broker's secret
    share group (EDGESDK_SHARE_GROUP). Not started."""
    return RepositoryServer(fleet_service(broker), fleet, repo_dir, share_group=broker.share_group,
                            **options)  # type: ignore[arg-type]


class Device:
    """The agent's side: a provisioned device (username = client id = device id) whose one
    connected client's on_connect feeds the current fetcher."""

    def __init__(self, broker: SecureMosquitto, fleet: str, device_id: str, data_dir: Path) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.config = broker.config(*broker.provision(device_id), **FAST)
        self.data_dir = data_dir
        self.fetcher: PackageFetcher | None = None
        self.connects = 0
        self.client = make_client(device_id, self.config, clean_start=False)
        self.client.on_connect = self._on_connect
        connect_blocking(self.client, self.config)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        self.connects += 1
        if self.fetcher is not None:
            self.fetcher.on_connected()

    def new_fetcher(self, **options: float) -> PackageFetcher:
        options = {"window": 4, "stall_timeout_s": 10, "request_timeout_s": 2, **options}
        self.fetcher = PackageFetcher(self.client, self.fleet, self.device_id, self.data_dir,  # type: ignore[arg-type]
                                      **options)
        return self.fetcher

    def spec(self, published: PublishedPackage) -> DeploymentStatement:
        """What the agent fetches from: the deployment statement for this device (signing is not
        the fetcher's business; it only reads the transfer fields)."""
        return published.statement(self.fleet, self.device_id, serial=1)

    def close(self) -> None:
        disconnect(self.client)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- fixtures (imported by both test modules) ------------------------------------------------------
@pytest.fixture
def fleet() -> str:
    return new_id("lab")


@pytest.fixture
def published(tmp_path: Path) -> PublishedPackage:
    keys = generate_keys(tmp_path / "keys")
    pkg = random_package(tmp_path / "demo.edgepkg", load_private_key(keys.private_path), size=SIZE,
                         version="2.0", target="raspberry-pi-5")
    return publish_package(pkg, tmp_path / "repo", block_size=BLOCK)


@pytest.fixture
def device(secure_mosquitto_session: SecureMosquitto, fleet: str, tmp_path: Path) -> Iterator[Device]:
    with Device(secure_mosquitto_session, fleet, new_id("pi"), tmp_path / "agent") as dev:
        yield dev


@pytest.fixture
def repository(secure_mosquitto_session: SecureMosquitto, fleet: str,
               published: PublishedPackage) -> Iterator[RepositoryServer]:
    with repository_server(secure_mosquitto_session, fleet, published.path.parent) as server:
        yield server
