"""Helpers for the simulator's broker tests: a watcher that records what the devices publish, and
a simulator running in a thread for the length of a test."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.sim import SimConfig, Simulator

WAIT_S = 20.0


class Watcher:
    """Subscribes to ``filters`` (before the simulator starts, so nothing is missed) and keeps every
    message; `wait_for` blocks until a predicate over the messages holds."""

    def __init__(self, config: BrokerConfig, *filters: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = make_client(f"watch-{uuid.uuid4().hex[:8]}", config, clean_start=True)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        # Subscribe on every CONNACK: a clean session loses its subscriptions when the broker restarts.
        self.client.on_connect = lambda c, *a: c.subscribe([(f, 1) for f in filters])
        connect_blocking(self.client, config)
        assert self._subscribed.wait(WAIT_S), "no SUBACK"

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[mqtt.MQTTMessage]], Any], timeout: float = WAIT_S,
                 what: str = "condition") -> Any:
        with self._cond:
            result = self._cond.wait_for(lambda: predicate(list(self.messages)), timeout)
        assert result, f"timed out after {timeout} s waiting for {what}"
        return result

    def on(self, suffix: str) -> list[mqtt.MQTTMessage]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def close(self) -> None:
        disconnect(self.client)


@pytest.fixture
def watcher() -> Iterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(config: BrokerConfig, *filters: str) -> Watcher:
        made.append(Watcher(config, *filters))
        return made[-1]

    yield make
    for w in made:
        w.close()


@contextmanager
def running(config: SimConfig, prepare: Callable[[Simulator], None] | None = None,
            **kwargs: Any) -> Iterator[Simulator]:
    """The simulator in a thread (``prepare`` sees it first); stopped (offline states, DISCONNECT)
    when the block ends."""
    simulator = Simulator(config, **kwargs)
    if prepare is not None:
        prepare(simulator)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            simulator.run(stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="sim", daemon=True)
    thread.start()
    try:
        yield simulator
    finally:
        stop.set()
        thread.join(WAIT_S)
        assert not thread.is_alive(), "simulator did not stop"
        if errors:
            raise errors[0]
