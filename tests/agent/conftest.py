"""Fixtures the agent's integration tests share: signed test packages and their reference models."""

import pytest

from tests.agent.agent_harness import PackageSet, ReferenceModels, package_set


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> PackageSet:
    """v1/v2 for x86-64-cpu, an aarch64 user-profile package and one signed by an untrusted key."""
    return package_set(tmp_path_factory)


@pytest.fixture(scope="module")
def refs(packages: PackageSet) -> ReferenceModels:
    return ReferenceModels(packages)
