"""Fixtures the agent's integration tests share: signed test packages and their reference models."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.agent_harness import (Collector, PackageSet, ReferenceModels, Rig, new_device_id, package_set,
                                       secure, seeded_data_dir)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> PackageSet:
    """v1/v2 for x86-64-cpu, an aarch64 user-profile package and one signed by an untrusted key."""
    return package_set(tmp_path_factory)


@pytest.fixture(scope="module")
def refs(packages: PackageSet) -> ReferenceModels:
    return ReferenceModels(packages)


@pytest.fixture
def rig(secure_mosquitto, packages: PackageSet, refs: ReferenceModels, tmp_path: Path) -> Iterator[Rig]:
    """One device whose data_dir has v1 installed and active, with a collector on its topics, on a
    broker started with the generated policy (TLS, per-device logins, ACL)."""
    broker = secure(secure_mosquitto)
    device = new_device_id("fault")
    with Collector(broker.url, device) as col:
        yield Rig(broker, packages, refs, tmp_path, device, seeded_data_dir(packages, tmp_path / "data"), col)
