"""Write a desired deployment to devices: one retained QoS 1 message per device's `desired` topic.

Retained, so a device that is offline now receives it when it next connects; QoS 1 and a wait for
each PUBACK (with a deadline), so `deploy` returning means the broker holds every message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import paho.mqtt.client as mqtt

from edgesdk import protocol
from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.errors import BrokerError
from edgesdk.fleet.repository import PublishedPackage
from edgesdk.protocol import DesiredDeployment


def deploy(broker_config: BrokerConfig, fleet: str, device_ids: Iterable[str], published: PublishedPackage,
           rollout_id: str | None = None, timeout_s: float = 10.0,
           client: mqtt.Client | None = None) -> DesiredDeployment:
    """Publish ``published`` as the desired deployment of each device; wait ≤ ``timeout_s`` in all.

    Pass a connected ``client`` to reuse the caller's connection; otherwise one is opened and closed.
    """
    desired = published.desired(rollout_id)
    write_desired(broker_config, fleet, device_ids, desired, timeout_s, client)
    return desired


def clear_desired(broker_config: BrokerConfig, fleet: str, device_ids: Iterable[str],
                  timeout_s: float = 10.0, client: mqtt.Client | None = None) -> None:
    """Remove the retained desired message (an empty retained payload deletes it)."""
    write_desired(broker_config, fleet, device_ids, None, timeout_s, client)


def write_desired(broker_config: BrokerConfig, fleet: str, device_ids: Iterable[str],
                  desired: DesiredDeployment | None, timeout_s: float = 10.0,
                  client: mqtt.Client | None = None) -> None:
    topics = [protocol.device_desired(fleet, d) for d in device_ids]  # validates every id first
    deadline = time.monotonic() + timeout_s
    own = client is None
    if client is None:
        client = make_client(f"edgesdk-deploy-{uuid.uuid4().hex[:12]}", broker_config, clean_start=True)
        connect_blocking(client, broker_config, timeout_s)
    try:
        payload = desired.to_json() if desired is not None else b""
        infos = [(t, client.publish(t, payload, qos=1, retain=True)) for t in topics]
        for topic, info in infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (ValueError, RuntimeError) as exc:
                raise BrokerError(f"deploy to {topic}: publish failed ({exc})") from None
            if not info.is_published():
                raise BrokerError(f"deploy to {topic}: broker {broker_config.url} did not acknowledge "
                                  f"within {timeout_s:g} s")
    finally:
        if own:
            disconnect(client)
