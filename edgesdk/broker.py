"""Broker connection settings and a paho-mqtt 2.x MQTT 5 client built from them.

`parse_broker_url` validates a URL once, at load time (ConfigError names what is wrong);
`make_client` builds a client without touching the network; `connect_blocking` connects,
starts paho's network thread and waits for CONNACK with a deadline (BrokerError on failure).
After that paho reconnects by itself with exponential backoff (``reconnect_min_s`` doubling up
to ``reconnect_max_s``); callers re-subscribe in ``on_connect`` because a broker that lost its
state (a restart without persistence, a kill) forgets sessions.

TLS always verifies the broker's certificate chain AND its host name (a wrong CA or a certificate
for another host fails with one line ``cannot reach broker ...: TLS ...``). Every client announces
a maximum packet size (MQTT 5 CONNECT property) near the block size, so the broker never forwards
it a packet bigger than that; `edgesdk broker config` caps the broker's side the same way.
"""

from __future__ import annotations

import socket
import random
import ssl
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgesdk.errors import BrokerError, ConfigError
from edgesdk.protocol import BLOCK_SIZE

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# One block response is the block plus a 13-byte header, the device's topic, correlation data and
# MQTT framing: well under 1 KiB. 16 KiB of headroom also covers every JSON message we send.
PACKET_HEADROOM = 16 * 1024
DEFAULT_MAX_PACKET_SIZE = BLOCK_SIZE + PACKET_HEADROOM
MIN_MAX_PACKET_SIZE = 4 * 1024  # below this even a state message or a small block would not fit
MQTT_MAX_PACKET_SIZE = 268_435_460  # 256 MiB payload limit + fixed header: the protocol's own cap
_SETTINGS = ("keepalive_s", "connect_timeout_s", "reconnect_min_s", "reconnect_max_s", "max_packet_size")


@dataclass(frozen=True)
class TlsConfig:
    """TLS files for mqtts://. No ``ca_file`` means the system's CA store; cert+key for client auth."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    tls: TlsConfig | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30  # the broker publishes our Will after ~1.5x this without a packet
    connect_timeout_s: float = 10.0  # TCP (+TLS) connect and CONNACK, each call
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    # Largest MQTT packet we accept: the broker drops (never sends us) anything bigger. A repository
    # serving bigger blocks than protocol.BLOCK_SIZE needs its devices configured with more.
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE

    @property
    def url(self) -> str:
        """The broker's URL without credentials (safe for messages and logs)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def with_timeouts(self, **changes: float) -> BrokerConfig:
        """A copy with other timing values, e.g. ``reconnect_min_s=0.1`` in tests."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Will:
    """Last Will the broker publishes when the connection drops without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def parse_broker_url(url: str, tls: TlsConfig | None = None, username: str | None = None,
                     password: str | None = None, **timeouts: float) -> BrokerConfig:
    """mqtt://[user[:pass]@]host[:port] (1883) or mqtts://... (8883, TLS). Explicit
    ``username``/``password`` override the URL's; ``timeouts`` sets BrokerConfig's timing fields
    and ``max_packet_size``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {_redact(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(f"broker URL {_redact(url)!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"broker URL {_redact(url)!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {_redact(url)!r}: unexpected path or query")
    if port == 0:
        raise ConfigError(f"broker URL {_redact(url)!r}: port must be 1..65535")
    if scheme == "mqtt" and tls is not None:
        raise ConfigError(f"broker URL {_redact(url)!r}: TLS files given for plain mqtt:// (use mqtts://)")
    if scheme == "mqtts":
        tls = tls or TlsConfig()
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ConfigError("broker TLS: give both a client certificate and its key, or neither")
        for path in (tls.ca_file, tls.cert_file, tls.key_file):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"broker TLS: {path}: no such file")
    user = username if username is not None else (unquote(parts.username) if parts.username else None)
    secret = password if password is not None else (unquote(parts.password) if parts.password else None)
    if secret is not None and user is None:
        raise ConfigError("broker: a password without a username")
    unknown = set(timeouts) - set(_SETTINGS)
    if unknown:
        raise ConfigError(f"broker: unknown setting(s) {', '.join(sorted(unknown))}")
    config = BrokerConfig(parts.hostname, port or DEFAULT_PORTS[scheme], tls, user, secret, **timeouts)  # type: ignore[arg-type]
    if config.connect_timeout_s <= 0 or config.keepalive_s <= 0 or config.reconnect_min_s <= 0:
        raise ConfigError("broker: keepalive, connect timeout and reconnect delay must be positive")
    if not MIN_MAX_PACKET_SIZE <= config.max_packet_size <= MQTT_MAX_PACKET_SIZE:
        raise ConfigError(f"broker: max packet size must be {MIN_MAX_PACKET_SIZE}..{MQTT_MAX_PACKET_SIZE} bytes, "
                          f"got {config.max_packet_size}")
    return config


def _redact(url: str) -> str:
    parts = urlsplit(url) if "://" in url else None
    if parts is not None and parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def make_client(client_id: str, config: BrokerConfig, clean_start: bool = False,
                session_expiry_s: int = 3600, will: Will | None = None,
                max_inflight: int = 32, max_queued: int = 0) -> mqtt.Client:
    """An MQTT 5 client set up from ``config`` (no network I/O yet; see `connect_blocking`).

    ``clean_start=False`` plus a session expiry lets the broker keep our subscriptions and queued
    QoS 1 messages across short outages (the agent's case); a stateless server passes True.
    ``max_queued`` > 0 bounds paho's outgoing queue (publish then fails with MQTT_ERR_QUEUE_SIZE).
    """
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if config.username is not None:
        client.username_pw_set(config.username, config.password)
    if config.tls is not None:
        tls = config.tls
        try:
            # CERT_REQUIRED with paho's default tls_insecure=False: the chain AND the host name are
            # checked (a certificate for another host is refused, as a wrong CA is).
            client.tls_set(ca_certs=str(tls.ca_file) if tls.ca_file else None,
                           certfile=str(tls.cert_file) if tls.cert_file else None,
                           keyfile=str(tls.key_file) if tls.key_file else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"broker TLS: cannot load certificates: {exc}") from None
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    # paho doubles the delay from min to max after each failed attempt and resets it on CONNACK.
    client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)  # type: ignore[arg-type]
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(max_queued)  # paho refuses both once connect_async ran
    client.connect_timeout = config.connect_timeout_s
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if clean_start else session_expiry_s
    props.MaximumPacketSize = config.max_packet_size
    # connect_async only records where and how to connect; connect_blocking does the I/O.
    client.connect_async(config.host, config.port, keepalive=config.keepalive_s,
                         clean_start=clean_start, properties=props)
    return client


def connect_blocking(client: mqtt.Client, config: BrokerConfig, timeout_s: float | None = None) -> None:
    """Connect, start paho's network thread, and wait for a successful CONNACK (≤ ``timeout_s``).

    The client's own ``on_connect`` (set before this call) runs as usual, also on reconnects.
    The TCP (+TLS) connect itself is bounded by ``config.connect_timeout_s`` (paho fixes it
    before the first connect), the CONNACK by what is left of ``timeout_s``.
    """
    timeout = config.connect_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout
    done = threading.Event()
    result: list[mqtt.ReasonCode] = []
    user_on_connect = client.on_connect

    def on_connect(c: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                   props: object) -> None:
        result.append(reason)
        done.set()
        if user_on_connect is not None:
            user_on_connect(c, userdata, flags, reason, props)

    client.on_connect = on_connect
    try:
        try:
            client.reconnect()
        except ConnectionRefusedError:
            raise BrokerError(f"cannot reach broker {config.url}: connection refused") from None
        except (socket.timeout, TimeoutError):
            raise BrokerError(f"cannot reach broker {config.url}: no answer within {timeout:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            # e.g. "Hostname mismatch, certificate is not valid for 'x'." or "unable to get local issuer
            # certificate" (a CA that did not sign the broker's certificate).
            why = (exc.verify_message or exc.reason or "").rstrip(".")
            raise BrokerError(f"cannot reach broker {config.url}: TLS certificate refused ({why})") from None
        except ssl.SSLError as exc:
            raise BrokerError(f"cannot reach broker {config.url}: TLS handshake failed ({exc.reason})") from None
        except OSError as exc:
            raise BrokerError(f"cannot reach broker {config.url}: {exc.strerror or exc}") from None
        client.loop_start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            _abandon(client)
            raise BrokerError(f"broker {config.url} did not answer CONNECT within {timeout:g} s")
        if result[0].is_failure:
            _abandon(client)
            raise BrokerError(f"broker {config.url} refused the connection: {result[0]}")
    finally:
        client.on_connect = user_on_connect


def _abandon(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def disconnect(client: mqtt.Client) -> None:
    """Clean DISCONNECT (no Will) and stop the network thread."""
    client.disconnect()
    client.loop_stop()


class JitteredBackoff:
    """Reconnect delays that grow exponentially with random jitter, so a fleet that lost its broker
    does not reconnect in lockstep. paho's own backoff doubles without jitter; this sets paho's
    next delay from the connection callbacks, which paho runs before each reconnect wait.

    Call `failed()` from ``on_disconnect`` / ``on_connect_fail`` and `connected()` from ``on_connect``.
    """

    def __init__(self, client: mqtt.Client, config: BrokerConfig, rng: random.Random | None = None) -> None:
        self.client, self.config = client, config
        self.rng = rng or random.Random()
        self.attempts = 0
        self.last_delay = config.reconnect_min_s

    def _apply(self, delay: float) -> None:
        self.last_delay = delay
        # min == next delay; paho doubles it only if no callback runs, and ours always does.
        self.client.reconnect_delay_set(delay, max(delay, self.config.reconnect_max_s))  # type: ignore[arg-type]

    def failed(self) -> float:
        cap = min(self.config.reconnect_max_s, self.config.reconnect_min_s * 2 ** self.attempts)
        self.attempts += 1
        delay = cap * self.rng.uniform(0.5, 1.0)  # "equal jitter": never less than half the cap
        self._apply(delay)
        return delay

    def connected(self) -> None:
        self.attempts = 0
        self._apply(self.config.reconnect_min_s * self.rng.uniform(0.5, 1.0))
