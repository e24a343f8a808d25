"""Reconnect backoff: exponential growth, bounded, jittered, reset on connect."""

import random

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgesdk.broker import JitteredBackoff, parse_broker_url


def _backoff(seed: int) -> tuple[JitteredBackoff, mqtt.Client]:
    config = parse_broker_url("mqtt://127.0.0.1:1883").with_timeouts(reconnect_min_s=1.0, reconnect_max_s=30.0)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    return JitteredBackoff(client, config, random.Random(seed)), client


def test_reconnect_delays_grow_exponentially_up_to_the_cap():
    backoff, _ = _backoff(1)
    delays = [backoff.failed() for _ in range(10)]
    caps = [min(30.0, 2.0 ** i) for i in range(10)]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps))
    assert max(delays) <= 30.0


def test_devices_do_not_reconnect_in_lockstep():
    first = [_backoff(seed)[0].failed() for seed in range(20)]
    assert len({round(d, 6) for d in first}) == 20


def test_backoff_sets_pahos_next_delay_and_resets_after_connect():
    backoff, client = _backoff(3)
    for _ in range(5):
        delay = backoff.failed()
    assert client._reconnect_min_delay == delay  # what paho waits before the next attempt
    backoff.connected()
    assert backoff.attempts == 0
    assert backoff.failed() <= 1.0


def test_clients_announce_a_packet_cap_near_the_block_size():
    from edgesdk.broker import DEFAULT_MAX_PACKET_SIZE, make_client
    from edgesdk.protocol import BLOCK_SIZE

    config = parse_broker_url("mqtt://127.0.0.1:1883")
    client = make_client("cap", config)

    assert BLOCK_SIZE < config.max_packet_size == DEFAULT_MAX_PACKET_SIZE <= BLOCK_SIZE + 64 * 1024
    assert client._connect_properties.MaximumPacketSize == DEFAULT_MAX_PACKET_SIZE  # sent in CONNECT


def test_packet_cap_is_validated_when_the_config_is_built():
    import pytest

    from edgesdk.errors import ConfigError

    assert parse_broker_url("mqtt://h", max_packet_size=1 << 20).max_packet_size == 1 << 20
    for bad in (0, 100, 1 << 29):
        with pytest.raises(ConfigError, match="max packet size"):
            parse_broker_url("mqtt://h", max_packet_size=bad)
