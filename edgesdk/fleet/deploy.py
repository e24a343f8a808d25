"""Tell devices what to run: one signed deployment statement per device, retained, QoS 1.

Retained, so a device that is offline now receives it when it next connects; QoS 1 and a wait for
each PUBACK (with a deadline), so `deploy` returning means the broker holds every message. Each
statement is signed with the fleet key and carries a serial above every earlier one (microsecond
time, kept strictly growing within this process), so a device refuses a replay of an older one.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Mapping

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgesdk import protocol
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.errors import BrokerError, ConfigError
from edgesdk.fleet.repository import PublishedPackage
from edgesdk.protocol import DEFAULT_LIFETIME_S, DeploymentStatement, SignedStatement, new_serial, sign_statement
from edgesdk.signing import key_id

_serial_lock = threading.Lock()
_last_serial = 0


def next_serial() -> int:
    """A serial above every one this process issued and above the current time in microseconds."""
    global _last_serial
    with _serial_lock:
        _last_serial = new_serial(_last_serial)
        return _last_serial


def check_fleet_key(fleet_key: Ed25519PrivateKey, published: PublishedPackage, allow_release_key: bool) -> None:
    """Refuse to sign statements with the key that signed the package unless the user said so: one
    stolen key would then both build and deploy a model (docs/security.md)."""
    if published.signer and key_id(fleet_key.public_key()) == published.signer and not allow_release_key:
        raise ConfigError(f"the fleet key {published.signer} is the release key that signed {published.name} "
                          f"{published.version}; use a separate fleet key (edgesdk keys generate --role fleet) "
                          "or pass --release-key-as-fleet-key")


def sign_for_devices(published: PublishedPackage, fleet: str, device_ids: Iterable[str],
                     fleet_key: Ed25519PrivateKey, *, rollout_id: str | None = None, rollback: bool = False,
                     lifetime_s: float = DEFAULT_LIFETIME_S, now: float | None = None) -> dict[str, SignedStatement]:
    """One signed statement per device (ids checked first: nothing is signed for a bad id)."""
    ids = [protocol.check_id(d, "device id") for d in device_ids]
    protocol.check_id(fleet, "fleet")
    issued = time.time() if now is None else now
    return {d: sign_statement(published.statement(fleet, d, next_serial(), issued_at=issued, lifetime_s=lifetime_s,
                                                  rollout_id=rollout_id, rollback=rollback), fleet_key)
            for d in ids}


def deploy(broker_config: BrokerConfig, fleet: str, device_ids: Iterable[str], published: PublishedPackage,
           fleet_key: Ed25519PrivateKey, *, rollout_id: str | None = None, rollback: bool = False,
           lifetime_s: float = DEFAULT_LIFETIME_S, timeout_s: float = 10.0,
           client: mqtt.Client | None = None) -> dict[str, SignedStatement]:
    """Sign and publish ``published`` as the desired deployment of each device; wait ≤ ``timeout_s``.

    Pass a connected ``client`` to reuse the caller's connection; otherwise one is opened and closed.
    """
    signed = sign_for_devices(published, fleet, device_ids, fleet_key, rollout_id=rollout_id,
                              rollback=rollback, lifetime_s=lifetime_s)
    write_desired(broker_config, fleet, {d: s.to_json() for d, s in signed.items()}, timeout_s, client)
    return signed


def reissue(statement: DeploymentStatement, fleet_key: Ed25519PrivateKey,
            lifetime_s: float = DEFAULT_LIFETIME_S) -> SignedStatement:
    """The same deployment, renewed: a new serial and validity window (the fleet service does this
    before a live statement expires, so devices keep obeying it)."""
    return sign_statement(statement.reissued(next_serial(), time.time(), lifetime_s), fleet_key)


def clear_desired(broker_config: BrokerConfig, fleet: str, device_ids: Iterable[str],
                  timeout_s: float = 10.0, client: mqtt.Client | None = None) -> None:
    """Remove the retained statement (an empty retained payload deletes it)."""
    write_desired(broker_config, fleet, {d: None for d in device_ids}, timeout_s, client)


def publish_retained(broker_config: BrokerConfig, topic: str, payload: bytes, timeout_s: float = 10.0) -> None:
    """One retained QoS 1 message, acknowledged (or refused) by the broker before returning."""
    _publish_all(broker_config, {topic: payload}, timeout_s, None)


def write_desired(broker_config: BrokerConfig, fleet: str, payloads: Mapping[str, bytes | None],
                  timeout_s: float = 10.0, client: mqtt.Client | None = None) -> None:
    """Publish each device's payload (None clears it) retained on its `desired` topic."""
    topics = {protocol.device_desired(fleet, d): p for d, p in payloads.items()}  # validates every id first
    _publish_all(broker_config, topics, timeout_s, client)


def _publish_all(broker_config: BrokerConfig, topics: Mapping[str, bytes | None], timeout_s: float,
                 client: mqtt.Client | None) -> None:
    deadline = time.monotonic() + timeout_s
    own = client is None
    refused: dict[int, object] = {}
    if client is None:
        client = make_client(f"edgesdk-deploy-{uuid.uuid4().hex[:12]}", broker_config, clean_start=True)
        # An MQTT 5 broker answers a publish its ACL denies with PUBACK "Not authorized".
        client.on_publish = lambda c, u, mid, reason, props: reason.is_failure and refused.__setitem__(mid, reason)
        connect_blocking(client, broker_config, timeout_s)
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
