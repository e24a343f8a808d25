"""`edgesdk sim`: N simulated devices in one process, speaking the real protocol (docs/simulator.md)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer

from edgesdk.cli.broker_options import B, broker_config
from edgesdk.cli.common import console, handle_errors, print_json
from edgesdk.errors import BrokerError, ConfigError


@handle_errors
def sim(
    devices: int = typer.Option(..., "--devices", help="How many devices to simulate (ids PREFIX-00000, ...)."),
    fleet: str = typer.Option("default", "--fleet", help="Fleet name (topic root edgesdk/v1/FLEET/)."),
    behaviour_file: Path = typer.Option(None, "--behaviour", help="Behaviour file (YAML): latency, errors, install "
                                        "failures and drift per release and hardware class (docs/simulator.md). "
                                        "Default: every release ~10 ms (lognormal, sigma 0.25), 0.1 % errors."),
    duration: float = typer.Option(None, "--duration", help="Stop after this many seconds (default: on SIGINT or "
                                   "SIGTERM)."),
    prefix: str = typer.Option("sim", "--prefix", help="Device ids are PREFIX-NNNNN."),
    first: int = typer.Option(0, "--first", help="Number of the first device (several simulators split a fleet)."),
    start_with: list[str] = typer.Option([], "--start-with", help="NAME@VERSION every device runs from the start, "
                                         "without a transfer (repeatable). Package id from --repo, else sha256 of "
                                         "the text NAME@VERSION."),
    repo: Path = typer.Option(None, "--repo", help="Package repository to look --start-with releases up in."),
    target: str = typer.Option(None, "--target", help="The --start-with package's target, when --repo has several."),
    telemetry_interval: float = typer.Option(60.0, "--telemetry-interval", help="Seconds between a device's "
                                             "telemetry windows (simulated seconds under --speed)."),
    fleet_key_pub: list[Path] = typer.Option([], "--fleet-key-pub", help="Fleet public key the devices trust for "
                                             "deployment statements (repeatable)."),
    trust_root: Path = typer.Option(None, "--trust-root", help="The fleet's trust root (root.json): the devices "
                                    "trust its fleet keys (instead of --fleet-key-pub)."),
    label: list[str] = typer.Option([], "--label", "--labels", help="key=value label on every device (repeatable); "
                                    "the behaviour file can spread labels over the devices instead."),
    hardware_class: str = typer.Option(None, "--hardware-class", help="Every device's hardware class (default: "
                                       "the behaviour file's hardware.classes, else none)."),
    credentials: Path = typer.Option(None, "--credentials", help="YAML/JSON mapping device id -> broker password; "
                                     "each device then logs in as its own id (the generated ACL's %u). Without "
                                     "it every device uses --username/--password."),
    connect_rate: float = typer.Option(200.0, "--connect-rate", help="New broker connections per second."),
    speed: float = typer.Option(1.0, "--speed", help="Simulated time runs this many times faster than real time "
                                "(telemetry intervals, install steps and the times in messages)."),
    seed: int = typer.Option(0, "--seed", help="Seed for hardware classes, labels and every number drawn."),
    progress: float = typer.Option(10.0, "--progress", help="Seconds between progress lines on stderr (0: none)."),
    as_json: bool = typer.Option(False, "--json", help="Print the final counters as JSON on stdout."),
    broker: str = B["broker"], ca: Path = B["ca"], cert: Path = B["cert"], client_key: Path = B["client_key"],
    username: str = B["username"], password: str = B["password"], password_file: Path = B["password_file"],
) -> None:
    """Simulate DEVICES devices on one event loop: each a real MQTT client with its retained state,
    Last Will, signed-statement checks, install events and telemetry windows.

    The broker must let the devices in: an anonymous test broker, shared credentials
    (--username/--password, e.g. the fleet-service identity of `edgesdk broker config`), or one
    login per device (--credentials). Stops cleanly on SIGINT/SIGTERM or after --duration:
    offline states, then DISCONNECT.
    """
    from edgesdk.sim import ScaledClock, SimConfig, Simulator, WallClock, load_behaviour
    from edgesdk.sim.behaviour import DEFAULT_BEHAVIOUR

    config = SimConfig(
        broker=broker_config(broker, ca, cert, client_key, username, password, password_file),
        fleet=fleet, devices=devices, prefix=prefix, first_index=first,
        behaviour=load_behaviour(behaviour_file) if behaviour_file is not None else DEFAULT_BEHAVIOUR,
        telemetry_interval_s=telemetry_interval, start_with=_start_releases(start_with, repo, target),
        trust=_trust(fleet_key_pub, trust_root), labels=_labels(label), hardware_class=hardware_class,
        duration_s=duration, connect_rate=connect_rate,
        credentials=_credentials(credentials) if credentials is not None else None, seed=seed)
    if not speed > 0:
        raise ConfigError(f"--speed must be > 0, got {speed!r}")
    simulator = Simulator(config, clock=WallClock() if speed == 1.0 else ScaledClock(speed),
                          progress=(lambda c: console.print(c.line(), markup=False)) if progress > 0 else None,
                          progress_every_s=progress if progress > 0 else 10.0)
    console.print(f"simulating {devices} devices of fleet {fleet} on {config.broker.url} "
                  f"(telemetry every {telemetry_interval:g} s{'' if speed == 1.0 else f' at {speed:g}x'})",
                  markup=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        counters = simulator.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print(counters.line(), markup=False)
    if as_json:
        print_json(counters.to_dict())
    if counters.ever_connected == 0:
        raise BrokerError(f"no simulated device could connect to {config.broker.url}"
                          + (f": {counters.last_error}" if counters.last_error else ""))


def _start_releases(refs: list[str], repo: Path | None, target: str | None) -> tuple:
    from edgesdk.protocol import is_valid_id
    from edgesdk.sim import StartRelease, fake_package_id

    releases = []
    for ref in refs:
        name, at, version = ref.partition("@")
        if not at or not is_valid_id(name) or not version or not version.isprintable():
            raise ConfigError(f"--start-with {ref!r}: expected NAME@VERSION (NAME a model name)")
        if repo is not None:
            from edgesdk.cli.deploy_cmd import resolve_release

            package = resolve_release(repo, ref, target)
            releases.append(StartRelease(package.name, package.version, package.package_id))
        else:
            releases.append(StartRelease(name, version, fake_package_id(name, version)))
    return tuple(releases)


def _trust(keys: list[Path], root: Path | None):
    from edgesdk.sim import FleetTrust

    if keys and root is not None:
        raise ConfigError("give --fleet-key-pub or --trust-root, not both")
    if root is not None:
        from edgesdk.trustroot import TrustRoot

        try:
            raw = root.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--trust-root {root}: cannot read it ({exc.strerror or exc})") from None
        return FleetTrust(root=TrustRoot.from_bytes(raw, str(root)))
    from edgesdk.signing import load_public_key

    return FleetTrust(keys=tuple(load_public_key(path) for path in keys))


def _labels(items: list[str]) -> dict[str, str]:
    from edgesdk.fleet.provisioning import parse_labels

    return parse_labels(items)


def _credentials(path: Path) -> dict[str, str]:
    """device id -> password from a YAML (or JSON) mapping."""
    from edgesdk.yamlfile import load_yaml_file

    data = load_yaml_file(path, "credentials")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
        raise ConfigError(f"{path}: expected a mapping of device id -> password (both text)")
    return data


def register(app: typer.Typer) -> None:
    app.command("sim")(sim)

