"""Reading what a broker holds retained, completely, and clearing it.

MQTT has no "list retained messages". A subscription gets the retained messages of its filter
before anything published after the SUBSCRIBE, so one client subscribes to the filter and to a
private marker topic, publishes a marker there and reads until the marker comes back: everything
retained has arrived by then ("nothing before the marker" means "nothing retained").
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any

from edgesdk.broker import BrokerConfig, connect_blocking, disconnect, make_client
from edgesdk.errors import BrokerError


def read_retained(config: BrokerConfig, topic_filter: str, marker_topic: str, *, timeout_s: float = 10.0,
                  clear: bool = False, why: str = "") -> dict[str, bytes]:
    """Every non-empty retained message under ``topic_filter`` (topic -> payload), read behind a
    marker on ``marker_topic`` (a topic only this call uses; the login must be allowed to read and
    write it). With ``clear``, each of them is then emptied (retained, QoS 1, every PUBACK awaited).
    BrokerError, naming ``why`` when the broker refuses, for anything that goes wrong."""
    marker = uuid.uuid4().hex.encode()
    got: queue.Queue[Any] = queue.Queue()
    subscribed = threading.Event()
    refused: dict[int, object] = {}
    client = make_client(f"edgesdk-read-{uuid.uuid4().hex[:12]}", config, clean_start=True)
    client.on_message = lambda c, u, m: got.put((m.topic, m.payload, m.retain))

    def on_subscribe(c: Any, userdata: Any, mid: int, reasons: list, props: Any) -> None:
        refused.update({-1: r for r in reasons if r.is_failure})
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.on_publish = lambda c, u, mid, reason, props: reason.is_failure and refused.__setitem__(mid, reason)
    hint = f": {why}" if why else ""
    connect_blocking(client, config, timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        filters = [(topic_filter, 1)] + ([] if marker_topic == topic_filter else [(marker_topic, 1)])
        client.subscribe(filters)
        if not subscribed.wait(timeout_s) or -1 in refused:
            raise BrokerError(f"broker {config.url} did not let us subscribe to {topic_filter} "
                              f"({refused.get(-1, 'no answer')}){hint}")
        info = client.publish(marker_topic, marker, qos=1)
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        if info.mid in refused:
            raise BrokerError(f"broker {config.url} refused a publish on {marker_topic} ({refused[info.mid]}){hint}")
        found: dict[str, bytes] = {}
        while True:
            try:
                topic, payload, retain = got.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BrokerError(f"broker {config.url}: the retained messages of {topic_filter} did not all "
                                  f"arrive within {timeout_s:g} s") from None
            if topic == marker_topic and payload == marker:
                break
            if retain and payload:
                found.setdefault(topic, payload)
        if clear:
            infos = [(t, client.publish(t, b"", qos=1, retain=True)) for t in sorted(found)]
            for topic, info in infos:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                if not info.is_published():
                    raise BrokerError(f"clear {topic}: broker {config.url} did not acknowledge within {timeout_s:g} s")
                if info.mid in refused:
                    raise BrokerError(f"clear {topic}: broker {config.url} refused it ({refused[info.mid]}){hint}")
        return dict(sorted(found.items()))
    except (ValueError, RuntimeError) as exc:  # paho: wait_for_publish on a dead connection
        raise BrokerError(f"broker {config.url}: {exc}") from None
    finally:
        disconnect(client)
