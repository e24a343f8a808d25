"""The fleet service keeps deployment statements alive: it re-issues each live statement before
it expires, so a device keeps obeying its current deployment while a fleet whose service has
stopped (a frozen or captured control plane) cannot pin devices to a statement forever.

The renewer reads the retained `desired/{name}` statements of every device (one per model name:
deploy and undeploy statements alike), keeps only those signed by its own fleet key (a forged
statement is never renewed into a genuine one) and addressed to the device and model of the topic
they sit on, and re-signs each one that has less than ``renew_before_s`` left with a new serial and
validity window, published back on the same topic.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgesdk import protocol
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.errors import EdgeError
from edgesdk.fleet.deploy import reissue
from edgesdk.protocol import DEFAULT_LIFETIME_S, SignedStatement

log = logging.getLogger(__name__)


class StatementRenewer:
    def __init__(self, broker_config: BrokerConfig, fleet: str, fleet_key: Ed25519PrivateKey, *,
                 lifetime_s: float = DEFAULT_LIFETIME_S, renew_before_s: float | None = None,
                 check_every_s: float = 3600.0, clock: Callable[[], float] = time.time) -> None:
        self.config, self.fleet, self.key = broker_config, protocol.check_id(fleet, "fleet"), fleet_key
        self.lifetime_s = lifetime_s
        self.renew_before_s = lifetime_s / 3 if renew_before_s is None else renew_before_s
        self.check_every_s, self.clock = check_every_s, clock
        # (device id, model name) -> the newest statement signed by our key on that topic
        self.live: dict[tuple[str, str], SignedStatement] = {}
        self.renewed = 0
        self.ignored = 0  # statements not signed by our key, or malformed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        client = make_client(f"edgesdk-renew-{uuid.uuid4().hex[:12]}", self.config, clean_start=True)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        connect_blocking(client, self.config)
        self._client = client
        self._thread = threading.Thread(target=self._loop, name="statement-renewer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._client is not None:
            disconnect(self._client)

    def check_now(self) -> None:
        self._wake.set()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                    props: object) -> None:
        if not reason.is_failure:
            client.subscribe(protocol.devices_filter(self.fleet, "desired/+"), qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            parsed = protocol.parse_device_topic(self.fleet, msg.topic)
            if parsed is None or not parsed[1].startswith("desired/"):
                return
            topic = (parsed[0], parsed[1].removeprefix("desired/"))
            if not msg.payload:
                with self._lock:
                    self.live.pop(topic, None)  # cleared: nothing to keep alive
                return
            signed = SignedStatement.from_json(msg.payload, msg.topic)
            signed.verify([self.key.public_key()])
            if (signed.statement.device, signed.statement.name) != topic:
                raise EdgeError(f"statement for {signed.statement.device}'s {signed.statement.name!r} on the topic "
                                f"of {topic[0]}'s {topic[1]!r}")
        except EdgeError as exc:
            self.ignored += 1
            log.warning("not renewing %s: %s", msg.topic, exc)
            return
        except Exception:  # noqa: BLE001 - never let a message kill paho's thread
            self.ignored += 1
            log.exception("not renewing %s", msg.topic)
            return
        with self._lock:
            current = self.live.get(topic)
            if current is None or signed.statement.serial > current.statement.serial:
                self.live[topic] = signed
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.renew_due()
            except Exception:  # noqa: BLE001 - one failed round must not end the renewals
                log.exception("statement renewal round failed")
            self._wake.wait(self.check_every_s)
            self._wake.clear()

    def renew_due(self) -> int:
        """Re-issue every statement with less than ``renew_before_s`` left; returns how many."""
        from edgesdk.fleet.deploy import publish_statements

        now = self.clock()
        with self._lock:
            due = {t: s for t, s in self.live.items() if s.statement.expires - now < self.renew_before_s}
        if not due or self._client is None:
            return 0
        fresh = {t: reissue(s.statement, self.key, self.lifetime_s) for t, s in due.items()}
        # Each renewed statement keeps its device and name, so it goes back on the topic it came from.
        publish_statements(self.config, self.fleet, fresh.values(), client=self._client)
        with self._lock:
            for topic, signed in fresh.items():
                if self.live.get(topic) is due[topic]:
                    self.live[topic] = signed
        self.renewed += len(fresh)
        log.info("renewed %d deployment statement(s)", len(fresh))
        return len(fresh)
