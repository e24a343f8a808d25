"""What the simulator is told (SimConfig), what it counts (SimCounters), and how it builds clients.

`SimConfig` checks its values when it is built (ConfigError names the option), never in the
middle of a run. `default_client_factory` builds each device's paho client the way
`edgesdk.broker.make_client` does, sharing one TLS context between all of them.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import paho.mqtt.client as mqtt

from edgesdk.broker import BrokerConfig, TlsConfig, Will, make_client
from edgesdk.errors import ConfigError
from edgesdk.protocol import ID_RULE, is_valid_id
from edgesdk.sim.behaviour import DEFAULT_BEHAVIOUR, Behaviour
from edgesdk.sim.device import FleetTrust

ClientFactory = Callable[[str, Will], mqtt.Client]  # (device id, Last Will) -> client, no I/O yet


@dataclass(frozen=True)
class StartRelease:
    """A release every device runs from the start (``--start-with NAME@VERSION``), no transfer."""

    name: str
    version: str
    package_id: str


@dataclass(frozen=True)
class SimConfig:
    """What to simulate; checked when built (ConfigError names the bad value)."""

    broker: BrokerConfig
    fleet: str
    devices: int
    prefix: str = "sim"  # device ids are f"{prefix}-{n:05d}"
    first_index: int = 0  # n of the first device (several simulator processes split a fleet)
    behaviour: Behaviour = DEFAULT_BEHAVIOUR
    telemetry_interval_s: float = 60.0  # simulated seconds between a device's windows
    start_with: tuple[StartRelease, ...] = ()
    trust: FleetTrust = FleetTrust()
    labels: Mapping[str, str] = field(default_factory=dict)  # on every device (over the file's spread)
    hardware_class: str | None = None  # every device's class (over the file's hardware.classes)
    duration_s: float | None = None  # real seconds; None: until the stop event
    connect_rate: float = 200.0  # new connections per real second (Mosquitto takes ~thousands/s)
    credentials: Mapping[str, str] | None = None  # device id -> password, username = device id
    seed: int = 0  # classes, labels, phases and every number drawn
    stop_timeout_s: float = 10.0  # for the offline states' PUBACKs and the DISCONNECTs at the end

    def __post_init__(self) -> None:
        if not is_valid_id(self.fleet):
            raise ConfigError(f"--fleet {self.fleet!r}: use {ID_RULE}")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or not 1 <= self.devices <= 1_000_000:
            raise ConfigError(f"--devices must be 1..1000000, got {self.devices!r}")
        if isinstance(self.first_index, bool) or not isinstance(self.first_index, int) or self.first_index < 0:
            raise ConfigError(f"--first must be an integer >= 0, got {self.first_index!r}")
        for n in (self.first_index, self.first_index + self.devices - 1):
            if not is_valid_id(device_id(self.prefix, n)):
                raise ConfigError(f"--prefix {self.prefix!r}: device id {device_id(self.prefix, n)!r} is not "
                                  f"valid: use {ID_RULE}")
        if not self.telemetry_interval_s > 0:
            raise ConfigError(f"--telemetry-interval must be > 0, got {self.telemetry_interval_s!r}")
        if not self.connect_rate > 0:
            raise ConfigError(f"--connect-rate must be > 0, got {self.connect_rate!r}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError(f"--duration must be > 0, got {self.duration_s!r}")
        if self.hardware_class is not None and (not self.hardware_class or not self.hardware_class.isprintable()):
            raise ConfigError(f"--hardware-class must be printable text, got {self.hardware_class!r}")
        names = [r.name for r in self.start_with]
        if len(set(names)) != len(names):
            raise ConfigError("--start-with names one release per model name")
        if self.credentials is not None:
            missing = [d for d in self.device_ids() if d not in self.credentials]
            if missing:
                raise ConfigError(f"--credentials: no password for {missing[0]}"
                                  f"{f' (and {len(missing) - 1} more devices)' if len(missing) > 1 else ''}")

    def device_ids(self) -> list[str]:
        return [device_id(self.prefix, n) for n in range(self.first_index, self.first_index + self.devices)]


def device_id(prefix: str, n: int) -> str:
    return f"{prefix}-{n:05d}"


@dataclass
class SimCounters:
    """What the simulator did so far (read from other threads: plain ints, updated on the loop)."""

    devices: int = 0
    connected: int = 0  # now
    ever_connected: int = 0  # devices that got a CONNACK at least once
    connects: int = 0  # successful CONNACKs, reconnects included
    connect_failures: int = 0  # TCP/TLS connects that failed, and CONNACKs that refused
    disconnects: int = 0
    windows_sent: int = 0
    windows_dropped: int = 0  # rolled while the device was offline (counted in dropped_windows)
    events_sent: int = 0
    states_sent: int = 0
    publishes_acked: int = 0  # PUBACKs of every QoS 1 publish
    statements_obeyed: int = 0
    statements_refused: int = 0
    statements_redelivered: int = 0  # the same statement again (a retained message at reconnect)
    activations: int = 0
    installs_failed: int = 0
    undeploys: int = 0
    internal_errors: int = 0  # exceptions caught in a callback (the loop goes on)
    last_error: str = ""
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        rate = self.windows_sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return (f"sim: {self.ever_connected}/{self.devices} devices connected ({self.connected} now), "
                f"{self.windows_sent} windows ({rate:.1f}/s), {self.events_sent} events sent, "
                f"statements {self.statements_obeyed} obeyed / {self.statements_refused} refused "
                f"in {self.elapsed_s:.1f} s" + (f"; last error: {self.last_error}" if self.last_error else ""))


def default_client_factory(broker: BrokerConfig, credentials: Mapping[str, str] | None = None) -> ClientFactory:
    """paho clients as `edgesdk.broker.make_client` builds them (MQTT 5, max packet size), with a
    clean start (the `desired` statements are retained, nothing else needs a session) and one TLS
    context shared by all: loading the CA once per client would cost 5,000 copies."""
    context = _tls_context(broker.tls) if broker.tls is not None else None
    plain = replace(broker, tls=None)

    def factory(device: str, will: Will) -> mqtt.Client:
        config = plain if credentials is None else replace(plain, username=device, password=credentials[device])
        client = make_client(device, config, clean_start=True, session_expiry_s=0, will=will)
        if context is not None:
            client.tls_set_context(context)  # after make_client: it set up everything but TLS
        return client

    return factory


def _tls_context(tls: TlsConfig) -> ssl.SSLContext:
    try:
        # What make_client asks of paho: the chain and the host name are verified.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=str(tls.ca_file))
        else:
            context.load_default_certs()
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"broker TLS: cannot load certificates: {exc}") from None
    return context
