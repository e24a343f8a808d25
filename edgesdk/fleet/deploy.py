"""Tell devices what to run: one signed deployment statement per device and model name, retained, QoS 1.

A device runs several models, one active version per model *name*; each name has its own retained
topic `devices/{id}/desired/{name}`, so deploying one model never replaces another's statement.
Retained, so a device that is offline now receives it when it next connects; QoS 1 and a wait for
each PUBACK (with a deadline), so `deploy` returning means the broker holds every message. Each
statement is signed with the fleet key and carries a serial above every earlier one (microsecond
time, kept strictly growing within this process), so a device refuses a replay of an older one.

`undeploy` publishes a signed undeploy statement on the name's topic, waits for each device to
confirm (its `undeployed` event), and clears the retained message of the devices that confirmed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgesdk import protocol
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.errors import BrokerError, ConfigError, EdgeError, ProtocolError
from edgesdk.fleet.repository import PublishedPackage
from edgesdk.protocol import (DEFAULT_LIFETIME_S, DeploymentStatement, DeviceState, InstallEvent, InstallEventKind,
                              SignedStatement, new_serial, sign_statement, undeploy_statement)
from edgesdk.signing import key_id

log = logging.getLogger(__name__)

_serial_lock = threading.Lock()
_last_serial = 0


def next_serial() -> int:
    """A serial above every one this process issued and above the current time in microseconds."""
    global _last_serial
    with _serial_lock:
        _last_serial = new_serial(_last_serial)
        return _last_serial


def check_model_name(name: object, what: str = "model name") -> str:
    """``name`` if it can be a model name (a topic level: the id rule), else one-line ProtocolError."""
    if not protocol.is_valid_id(name):
        raise ProtocolError(f"invalid {what} {name!r}: a model name is a topic level "
                            f"(devices/{{id}}/desired/{{name}}), so it must be {protocol.ID_RULE}")
    return name  # type: ignore[return-value]


def check_fleet_key(fleet_key: Ed25519PrivateKey, published: PublishedPackage, allow_release_key: bool) -> None:
    """Refuse to sign statements with the key that signed the package unless the user said so: one
    stolen key would then both build and deploy a model (docs/security.md)."""
    if published.signer and key_id(fleet_key.public_key()) == published.signer and not allow_release_key:
        raise ConfigError(f"the fleet key {published.signer} is the release key that signed "
                          f"{published.name}@{published.version}; use a separate fleet key (edgesdk keys generate "
                          "--role fleet) or pass --release-key-as-fleet-key")


def _check_ids(fleet: str, device_ids: Iterable[str]) -> list[str]:
    protocol.check_id(fleet, "fleet")
    return list(dict.fromkeys(protocol.check_id(d, "device id") for d in device_ids))


def sign_for_devices(published: PublishedPackage, fleet: str, device_ids: Iterable[str],
                     fleet_key: Ed25519PrivateKey, *, rollout_id: str | None = None, rollback: bool = False,
                     lifetime_s: float = DEFAULT_LIFETIME_S, now: float | None = None,
                     hints: Mapping[str, dict[str, Any]] | None = None) -> dict[str, SignedStatement]:
    """One signed statement per device (ids and the package's name checked first: nothing is signed
    for a bad one); ``hints``: device id → the fleet's selection ranking its statement carries."""
    check_model_name(published.name, f"package name (in {published.name}@{published.version})")
    ids = _check_ids(fleet, device_ids)
    issued = time.time() if now is None else now
    hints = hints or {}
    return {d: sign_statement(published.statement(fleet, d, next_serial(), issued_at=issued, lifetime_s=lifetime_s,
                                                  rollout_id=rollout_id, rollback=rollback,
                                                  selection_hint=hints.get(d)), fleet_key)
            for d in ids}


def deploy(broker_config: BrokerConfig, fleet: str, device_ids: Iterable[str], published: PublishedPackage,
           fleet_key: Ed25519PrivateKey, *, rollout_id: str | None = None, rollback: bool = False,
           lifetime_s: float = DEFAULT_LIFETIME_S, timeout_s: float = 10.0,
           client: mqtt.Client | None = None) -> dict[str, SignedStatement]:
    """Sign and publish ``published`` as each device's desired deployment of ``published.name`` (its
    other models' statements are untouched); wait ≤ ``timeout_s`` for the broker.

    Pass a connected ``client`` to reuse the caller's connection; otherwise one is opened and closed.
    """
    signed = sign_for_devices(published, fleet, device_ids, fleet_key, rollout_id=rollout_id,
                              rollback=rollback, lifetime_s=lifetime_s)
    publish_statements(broker_config, fleet, signed.values(), timeout_s, client)
    return signed


def reissue(statement: DeploymentStatement, fleet_key: Ed25519PrivateKey,
            lifetime_s: float = DEFAULT_LIFETIME_S) -> SignedStatement:
    """The same deployment (or undeployment), renewed: a new serial and validity window (the fleet
    service does this before a live statement expires, so devices keep obeying it)."""
    return sign_statement(statement.reissued(next_serial(), time.time(), lifetime_s), fleet_key)


def clear_desired(broker_config: BrokerConfig, fleet: str, device_ids: Iterable[str], name: str,
                  timeout_s: float = 10.0, client: mqtt.Client | None = None) -> None:
    """Remove the retained statement of model ``name`` (an empty retained payload deletes it).
    Devices ignore the empty message: clearing never changes what a device runs."""
    write_desired(broker_config, fleet, name, {d: None for d in device_ids}, timeout_s, client)


def publish_retained(broker_config: BrokerConfig, topic: str, payload: bytes, timeout_s: float = 10.0) -> None:
    """One retained QoS 1 message, acknowledged (or refused) by the broker before returning."""
    _publish_all(broker_config, {topic: payload}, timeout_s, None)


def write_desired(broker_config: BrokerConfig, fleet: str, name: str, payloads: Mapping[str, bytes | None],
                  timeout_s: float = 10.0, client: mqtt.Client | None = None) -> None:
    """Publish each device's payload (None clears it) retained on its `desired/{name}` topic."""
    check_model_name(name)
    topics = {protocol.device_desired(fleet, d, name): p for d, p in payloads.items()}  # validates every id first
    _publish_all(broker_config, topics, timeout_s, client)


def publish_statements(broker_config: BrokerConfig, fleet: str, statements: Iterable[SignedStatement],
                       timeout_s: float = 10.0, client: mqtt.Client | None = None) -> None:
    """Publish each signed statement retained on the topic of its own device and model name."""
    topics = {protocol.device_desired(fleet, s.statement.device, s.statement.name): s.to_json() for s in statements}
    _publish_all(broker_config, topics, timeout_s, client)


def _own_client(broker_config: BrokerConfig, refused: dict[int, object], timeout_s: float,
                purpose: str = "deploy") -> mqtt.Client:
    client = make_client(f"edgesdk-{purpose}-{uuid.uuid4().hex[:12]}", broker_config, clean_start=True)
    # An MQTT 5 broker answers a publish its ACL denies with PUBACK "Not authorized".
    client.on_publish = lambda c, u, mid, reason, props: reason.is_failure and refused.__setitem__(mid, reason)
    connect_blocking(client, broker_config, timeout_s)
    return client


def _publish_all(broker_config: BrokerConfig, topics: Mapping[str, bytes | None], timeout_s: float,
                 client: mqtt.Client | None, refused: dict[int, object] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    own = client is None
    refused = {} if refused is None else refused
    if client is None:
        client = _own_client(broker_config, refused, timeout_s)
    try:
        infos = [(t, client.publish(t, p or b"", qos=1, retain=True)) for t, p in topics.items()]
        for topic, info in infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (ValueError, RuntimeError) as exc:
                raise BrokerError(f"publish to {topic}: publish failed ({exc})") from None
            if not info.is_published():
                raise BrokerError(f"publish to {topic}: broker {broker_config.url} did not acknowledge "
                                  f"within {timeout_s:g} s")
            if info.mid in refused:
                raise BrokerError(f"publish to {topic}: broker {broker_config.url} refused the publish "
                                  f"({refused[info.mid]}): check that this identity may write there")
    finally:
        if own:
            disconnect(client)


# -- undeploy -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UndeployResult:
    """What `undeploy` did, per device. ``confirmed`` maps a device to how it confirmed; those
    devices' retained statements were cleared. The others keep the retained undeploy statement, so
    they obey it when they next connect; ``refused`` has the reason of a device that sent a `refused`
    event for the model while we waited."""

    name: str
    statements: dict[str, SignedStatement]
    confirmed: dict[str, str] = field(default_factory=dict)
    unconfirmed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    waited: bool = True


class _Confirmations:
    """The devices' answers, from paho's thread: an `undeployed` event for the model, or a state
    that shows the device online without it. Anything a device sends is untrusted: a message that
    does not parse is logged and ignored."""

    def __init__(self, fleet: str, name: str, devices: list[str]) -> None:
        self.fleet, self.name = fleet, name
        self.pending = set(devices)
        self.confirmed: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.subscribed = threading.Event()
        self.suback: list[mqtt.ReasonCode] = []
        self.cond = threading.Condition()

    def on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list[mqtt.ReasonCode],
                     props: object) -> None:
        self.suback = list(reasons)
        self.subscribed.set()

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            parsed = protocol.parse_device_topic(self.fleet, msg.topic)
            if parsed is None or parsed[0] not in self.pending or not msg.payload:
                return
            how = self._answer(parsed[0], parsed[1], msg)
        except EdgeError as exc:
            log.warning("undeploy %s: ignoring a message on %s: %s", self.name, msg.topic, exc)
            return
        except Exception:  # noqa: BLE001 - never let a device's message kill paho's thread
            log.exception("undeploy %s: ignoring a message on %s", self.name, msg.topic)
            return
        if how is not None:
            with self.cond:
                self.pending.discard(parsed[0])
                self.confirmed[parsed[0]] = how
                self.cond.notify_all()

    def _answer(self, device: str, leaf: str, msg: mqtt.MQTTMessage) -> str | None:
        if leaf == "events":
            event = InstallEvent.from_json(msg.payload, msg.topic)
            if event.model != self.name:
                return None
            if event.kind is InstallEventKind.UNDEPLOYED:
                return "undeployed"
            if event.kind is InstallEventKind.REFUSED:
                with self.cond:
                    self.refused[device] = event.reason or "no reason given"
            return None
        if leaf == "state":
            state = DeviceState.from_json(msg.payload, msg.topic)
            # A device whose state has no `models` list but an active package is an older agent that
            # cannot say which model it runs: that is no confirmation.
            if state.online and state.model(self.name) is None and (state.models or state.active_package is None):
                return "not running it (state)"
        return None

    def wait(self, deadline: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: not self.pending, max(0.0, deadline - time.monotonic()))


def sign_undeploy(fleet: str, device_ids: Iterable[str], name: str, fleet_key: Ed25519PrivateKey, *,
                  rollout_id: str | None = None, lifetime_s: float = DEFAULT_LIFETIME_S,
                  now: float | None = None) -> dict[str, SignedStatement]:
    """One signed undeploy statement per device (ids and name checked first)."""
    check_model_name(name)
    ids = _check_ids(fleet, device_ids)
    issued = time.time() if now is None else now
    return {d: sign_statement(undeploy_statement(fleet, d, name, next_serial(), issued, lifetime_s=lifetime_s,
                                                 rollout_id=rollout_id), fleet_key) for d in ids}


def undeploy(broker_config: BrokerConfig, fleet: str, device_ids: Iterable[str], name: str,
             fleet_key: Ed25519PrivateKey, *, wait_s: float = 30.0, rollout_id: str | None = None,
             lifetime_s: float = DEFAULT_LIFETIME_S, timeout_s: float = 10.0) -> UndeployResult:
    """Tell devices to stop running model ``name``: a signed undeploy statement, retained on each
    device's `desired/{name}` (replacing that name's deploy statement; other names untouched).

    With ``wait_s`` > 0, wait up to that long for each device's `undeployed` event for ``name`` (or
    a state showing it online without ``name``: it had already undeployed) and clear the retained
    statement of every device that confirmed. The devices' topics are subscribed to before the
    statements are published, so no answer is missed. ``timeout_s`` bounds each broker round trip.
    """
    if not (math.isfinite(wait_s) and wait_s >= 0):
        raise ConfigError(f"wait {wait_s!r}: must be 0 (do not wait) or a number of seconds")
    signed = sign_undeploy(fleet, device_ids, name, fleet_key, rollout_id=rollout_id, lifetime_s=lifetime_s)
    devices = list(signed)
    answers = _Confirmations(fleet, name, devices)
    refused: dict[int, object] = {}
    client = _own_client(broker_config, refused, timeout_s, "undeploy")
    try:
        if wait_s > 0:
            client.on_subscribe = answers.on_subscribe
            client.on_message = answers.on_message
            topics = [(protocol.device_events(fleet, d), 1) for d in devices]
            topics += [(protocol.device_state(fleet, d), 1) for d in devices]
            client.subscribe(topics)
            if not answers.subscribed.wait(timeout_s):
                raise BrokerError(f"broker {broker_config.url} did not confirm the subscription to the devices' "
                                  f"events within {timeout_s:g} s")
            if any(r.is_failure for r in answers.suback):
                raise BrokerError(f"broker {broker_config.url} refused the subscription to the devices' events "
                                  f"and state ({answers.suback[0]}): check that this identity may read them")
        _publish_all(broker_config, {protocol.device_desired(fleet, d, name): s.to_json() for d, s in signed.items()},
                     timeout_s, client, refused)
        if wait_s <= 0:
            return UndeployResult(name, signed, unconfirmed=devices, waited=False)
        answers.wait(time.monotonic() + wait_s)
        with answers.cond:
            confirmed = dict(answers.confirmed)
        if confirmed:
            _publish_all(broker_config, {protocol.device_desired(fleet, d, name): None for d in confirmed},
                         timeout_s, client, refused)
    finally:
        disconnect(client)
    return UndeployResult(name, signed, confirmed={d: confirmed[d] for d in devices if d in confirmed},
                          unconfirmed=[d for d in devices if d not in confirmed],
                          refused={d: r for d, r in dict(answers.refused).items() if d not in confirmed})
