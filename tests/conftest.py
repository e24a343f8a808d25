"""Shared fixtures: a real Mosquitto broker (tests/fixtures/broker.py) and models (tests/fixtures/models.py)."""

pytest_plugins = ["tests.fixtures.broker", "tests.fixtures.models"]
