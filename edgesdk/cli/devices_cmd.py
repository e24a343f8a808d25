"""`edgesdk devices`: `provision` (one device's broker credentials and its complete agent.yaml), and
the registry in the fleet store: `list`, `show`, `forget`."""

from __future__ import annotations

import sys

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgesdk.cli.broker_options import B, broker_config
from edgesdk.cli.common import console, escape, handle_errors, out, print_json

if TYPE_CHECKING:
    from edgesdk.broker import BrokerConfig

app = typer.Typer(help="Provision devices (broker credentials, agent config) and see or forget the ones the fleet "
                  "store knows.", no_args_is_help=True)


@app.command("provision")
@handle_errors
def provision(
    device_id: str = typer.Argument(..., help="Device id: its broker username, MQTT client id and topic level."),
    broker_dir: Path = typer.Option(..., "--broker-dir", help="Folder written by `edgesdk broker config`."),
    folder: Path = typer.Option(..., "--out", help="Folder for the device's agent.yaml, password, CA and keys "
                                "(copy it to the device, e.g. to /etc/edge-agent/)."),
    fleet: str = typer.Option("default", "--fleet", help="Fleet name."),
    label: list[str] = typer.Option([], "--label", help="key=value label for the device (repeatable)."),
    release_key: list[Path] = typer.Option([], "--release-key", help="Public key packages are signed with "
                                           "(repeatable; default: signing.pub in the default key folder)."),
    fleet_key: list[Path] = typer.Option([], "--fleet-key", help="Public key deployment statements are signed "
                                         "with (repeatable; default: fleet.pub in the default key folder)."),
    trust_root: Path = typer.Option(None, "--trust-root", help="The fleet's signed trust root (root.json)."),
    broker_url: str = typer.Option(None, "--broker-url", help="Broker URL the device connects to (default: the "
                                   "broker folder's first non-loopback --host)."),
    data_dir: str = typer.Option("/var/lib/edge-agent", "--data-dir", help="The agent's data folder on the device."),
    reload_pid: int = typer.Option(None, "--reload-pid", help="Send SIGHUP to this Mosquitto process so it "
                                   "reads the new password at once."),
    force: bool = typer.Option(False, "--force", help="Replace an existing agent.yaml and the device's password."),
) -> None:
    """Add DEVICE_ID to the broker's password file and write its agent config folder."""
    from edgesdk.fleet.provisioning import ProvisionRequest, parse_labels, provision_device, reload_broker

    request = ProvisionRequest(device_id, broker_dir, folder, fleet=fleet, labels=parse_labels(label),
                               release_keys=tuple(release_key), fleet_keys=tuple(fleet_key), trust_root=trust_root,
                               broker_url=broker_url, data_dir=data_dir, force=force)
    device = provision_device(request)
    verb = "replaced the credentials of" if device.replaced else "provisioned"
    out.print(f"{verb} {escape(device.device_id)}: {escape(str(device.config_path))} "
              f"(broker {escape(device.broker_url)})")
    if reload_pid is not None:
        reload_broker(reload_pid)
        console.print(f"sent SIGHUP to Mosquitto (pid {reload_pid}): it re-reads the password file")
    else:
        console.print("Mosquitto reads the new password when it reloads: kill -HUP <mosquitto pid> "
                      "(or pass --reload-pid)")


# -- the registry: list, show, forget ---------------------------------------------------------------
STORE_HELP = "Fleet store: a SQLite file or postgresql://... (default: the one under $EDGESDK_HOME)."
FORGET_WAIT_S = 10.0  # for the broker: SUBACK, the marker's round trip, each PUBACK


def store_option():
    return typer.Option(None, "--store", help=STORE_HELP)


def open_store(location: str | None):
    """The existing fleet store at ``location`` (None: the default one), as a context manager.

    Reading commands never create one: a mistyped --store would otherwise show an empty fleet.
    """
    from edgesdk.errors import ConfigError
    from edgesdk.fleet.store import FleetStore

    missing = missing_store(location)
    if missing is not None:
        raise ConfigError(missing)
    return FleetStore.open(location)


def missing_store(location: str | None) -> str | None:
    """Why there is no fleet store to read at ``location`` (a SQLite file that does not exist), else None."""
    from edgesdk.fleet.store import default_store_path

    if location is None:
        path = default_store_path()
        return None if path.exists() else (f"no fleet store at {path} yet: `edgesdk serve` and `edgesdk publish` "
                                           "create it (or pass --store)")
    if location.startswith("sqlite://"):
        path = Path(location[len("sqlite://"):])
    elif "://" in location:
        return None  # PostgreSQL: the server answers for itself
    else:
        path = Path(location)
    return None if path.expanduser().exists() else (f"--store {location}: no such fleet store (`edgesdk serve` "
                                                    "and `edgesdk publish` with this --store create it)")


@app.command("list")
@handle_errors
def list_devices(
    fleet: str = typer.Option(None, "--fleet", help="Only this fleet (default: every fleet)."),
    select: list[str] = typer.Option([], "--select", help="key=value: only devices with this label (repeatable; "
                                     "all must match)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (docs/cli-json.md)."),
    store: str = store_option(),
) -> None:
    """The devices the fleet store knows: status, last seen, hardware, what they run and labels."""
    from edgesdk.fleet.report import parse_select

    wanted = parse_select(select)
    with open_store(store) as fleet_store:
        now = time.time()
        devices = fleet_store.devices(fleet, wanted or None, now=now)
    if as_json:
        print_json({"devices": [d.to_json() for d in devices]})
        return
    if not devices:
        where = f"fleet {fleet}" if fleet else "any fleet"
        console.print(f"no devices in {where}{' matching ' + ', '.join(select) if select else ''} "
                      f"(the store at {fleet_store.url} fills as `edgesdk serve` hears from devices)", markup=False)
        return
    sys.stdout.write(devices_table(devices, now) + "\n")


def devices_table(devices, now: float) -> str:  # noqa: ANN001 - DeviceRecords
    """The registry as aligned text: a device's models one per line, device-sent text escaped."""
    from edgesdk.cli.common import plain_table
    from edgesdk.fleet.report import fmt_ago

    many_fleets = len({d.fleet for d in devices}) > 1
    headers = (["FLEET"] if many_fleets else []) + ["DEVICE", "STATUS", "LAST SEEN", "HARDWARE", "TARGET",
                                                    "MODELS", "LABELS"]
    rows = []
    for d in devices:
        cells = [plain(d.device_id), d.status, fmt_ago(d.last_seen, now), plain(d.hardware_class), plain(d.target),
                 "\n".join(plain(line) for line in models_cell(d).split("\n")),
                 plain(" ".join(f"{k}={v}" for k, v in sorted(d.labels.items())))]
        rows.append(([plain(d.fleet)] if many_fleets else []) + cells)
    return plain_table(headers, rows, {"HARDWARE": 18, "TARGET": 18, "MODELS": 36, "LABELS": 30})


def models_cell(d) -> str:  # noqa: ANN001 - a DeviceRecord
    """'det@2.0' and 'ocr@1.0 (wants ocr@1.1)', one per line: what it runs, and what it was told
    when that differs."""
    parts = []
    wishes = {w.model: w for w in d.desired}
    reached = d.reached()
    for name in sorted({m.name for m in d.models} | set(wishes)):
        running = d.model(name)
        text = running.release if running is not None else f"{name}: none"
        wish = wishes.get(name)
        if wish is not None and not reached.get(name, True):
            text += f" (wants {wish.release or ('none' if wish.package_id is None else wish.package_id[:12])})"
        parts.append(text)
    return "\n".join(parts)


def plain(value: object) -> str:
    """Device-sent text for a table: control characters escaped, "—" for not known."""
    from edgesdk.cli.fleet_cmd import safe_text
    from edgesdk.fleet.records import NO_VALUE

    return NO_VALUE if value is None or value == "" else safe_text(value)


def cell_text(value: object):  # noqa: ANN201
    """Device-sent text as a rich Text (no markup): `plain` in a Text."""
    from rich.text import Text

    return Text(plain(value))


@app.command("show")
@handle_errors
def show(
    device_id: str = typer.Argument(..., help="Device id."),
    fleet: str = typer.Option(None, "--fleet", help="Its fleet (needed only when the id is in several)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (the `devices list --json` entry)."),
    store: str = store_option(),
) -> None:
    """Everything the store knows about one device: hardware, runtimes, models, desired vs actual."""
    with open_store(store) as fleet_store:
        now = time.time()
        device = find_device(fleet_store, device_id, fleet, now)
    if as_json:
        print_json(device.to_json() | {"hardware": device.hardware, "runtimes": device.runtimes,
                                       "telemetry_interval_s": device.telemetry_interval_s})
        return
    out.print(device_details(device, now))


def find_device(fleet_store, device_id: str, fleet: str | None, now: float):  # noqa: ANN001, ANN201
    """The device ``device_id`` (in ``fleet``, or the one fleet that has it); FleetError naming
    what is known otherwise."""
    from edgesdk.errors import FleetError

    if fleet is not None:
        found = fleet_store.device(fleet, device_id, now=now)
        if found is None:
            raise FleetError(f"unknown device {device_id} in fleet {fleet}{known_hint(fleet_store, fleet)}")
        return found
    matches = [d for d in fleet_store.devices(None, now=now) if d.device_id == device_id]
    if not matches:
        raise FleetError(f"unknown device {device_id}{known_hint(fleet_store, None)}")
    if len(matches) > 1:
        raise FleetError(f"device {device_id} is in several fleets ({', '.join(d.fleet for d in matches)}): "
                         "pass --fleet")
    return matches[0]


def known_hint(fleet_store, fleet: str | None, limit: int = 10) -> str:  # noqa: ANN001
    """' (known: a, b, c and 4 more)' for one line."""
    ids = [d.device_id if fleet else f"{d.fleet}/{d.device_id}" for d in fleet_store.devices(fleet)]
    if not ids:
        return f" (the store at {fleet_store.url} knows no device{' in fleet ' + fleet if fleet else ''})"
    return f" (known: {join_limited(ids, limit)})"


def join_limited(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def device_details(d, now: float):  # noqa: ANN001, ANN201 - a DeviceRecord -> rich renderable
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from edgesdk.cli.fleet_cmd import safe_text
    from edgesdk.fleet.records import NO_VALUE
    from edgesdk.fleet.report import fmt_ago, fmt_time

    facts = Table(box=None, show_header=False, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column()
    runtimes = []
    for name, info in sorted(d.runtimes.items()):
        info = info if isinstance(info, dict) else {}
        providers = info.get("providers") if isinstance(info.get("providers"), list) else []
        runtimes.append(f"{name} {info.get('version') or ''} ({', '.join(map(str, providers)) or 'no providers'})")
    interval = f"{d.telemetry_interval_s:g} s" if d.telemetry_interval_s else None
    for key, value in (("device", d.device_id), ("fleet", d.fleet), ("status", d.status),
                       ("last seen", f"{fmt_time(d.last_seen)} ({fmt_ago(d.last_seen, now)})"),
                       ("first seen", fmt_time(d.first_seen)), ("hardware", d.hardware_class), ("arch", d.arch),
                       ("target", d.target), ("agent", d.agent_version), ("telemetry every", interval),
                       ("labels", " ".join(f"{k}={v}" for k, v in sorted(d.labels.items()))),
                       ("runtimes", "; ".join(runtimes))):
        facts.add_row(key, cell_text(value))
    parts = [facts]
    reached = d.reached()
    wishes = {w.model: w for w in d.desired}
    models = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
    for column in ("MODEL", "RUNS", "VARIANT", "PROVIDER", "PACKAGE", "DESIRED", "SINCE", "ROLLOUT"):
        models.add_column(column)
    for name in sorted({m.name for m in d.models} | set(wishes)):
        m, w = d.model(name), wishes.get(name)
        if w is None:
            desired = NO_VALUE
        else:
            target = "none (undeploy)" if w.package_id is None else (w.release or w.package_id[:12])
            desired = f"{target} {'✓' if reached.get(name) else '… pending'}"
        models.add_row(cell_text(name), cell_text(m.release if m else "none"), cell_text(m.variant if m else None),
                       cell_text(m.provider if m else None),
                       cell_text(m.package_id[:12] if m and m.package_id else None),
                       Text(safe_text(desired)), Text(fmt_time(w.at) if w else NO_VALUE),
                       cell_text(w.rollout_id if w else None))
    parts += [Text(""), models if (d.models or d.desired) else Text("runs no model and was told none")]
    return Group(*parts)


@app.command("forget")
@handle_errors
def forget(
    device_id: str = typer.Argument(..., help="Device id."),
    fleet: str = typer.Option("default", "--fleet", help="Fleet name."),
    store: str = store_option(),
    store_only: bool = typer.Option(False, "--store-only", help="Only remove it from the store; leave its retained "
                                    "messages on the broker."),
    broker: str = B["broker"], ca: Path = B["ca"], cert: Path = B["cert"], client_key: Path = B["client_key"],
    username: str = B["username"], password: str = B["password"], password_file: Path = B["password_file"],
) -> None:
    """Remove a retired device from the broker's retained messages and from the fleet store.

    Clears its retained state and every desired statement on the broker, then its registry entry
    and deployments in the store (its events and telemetry stay, as history).

    Clearing retained messages needs a login that may write the device's state topic (the
    fleet-service one). A device still running re-registers with its next state message: stop its
    agent or remove its broker login first.
    """
    from edgesdk import protocol
    from edgesdk.errors import FleetError

    protocol.check_id(device_id, "device id")
    protocol.check_id(fleet, "fleet")
    cleared: list[str] = []
    with open_store(store) as fleet_store:
        known = fleet_store.device(fleet, device_id, now=time.time())
        if not store_only:
            config = broker_config(broker, ca, cert, client_key, username, password, password_file)
            cleared = clear_device_retained(config, fleet, device_id)
        if known is None and not cleared:
            raise FleetError(f"unknown device {device_id} in fleet {fleet}{known_hint(fleet_store, fleet)}"
                             f"{'' if store_only else ' and nothing retained for it on the broker'}")
        removed = fleet_store.forget_device(fleet, device_id)
        where = fleet_store.url
    root = f"{protocol.fleet_root(fleet)}/devices/{device_id}/"
    leaves = ", ".join(t.removeprefix(root) for t in cleared)
    broker_part = ("broker left as it was (--store-only)" if store_only else
                   f"cleared {len(cleared)} retained message(s) ({leaves})" if cleared else
                   "nothing retained on the broker")
    store_part = f"removed from the store at {where}" if removed else "the store did not know it"
    out.print(f"forgot {device_id} in fleet {fleet}: {broker_part}; {store_part}", markup=False)
    if known is not None and known.status == "online":
        console.print(f"{device_id} was online: it registers again with its next state message unless its agent "
                      "is stopped or its broker login removed", markup=False)


def clear_device_retained(config: BrokerConfig, fleet: str, device_id: str,
                          timeout_s: float = FORGET_WAIT_S) -> list[str]:
    """Empty every retained message under ``devices/{device_id}/`` (state, each desired/{name}) and
    return their topics (`edgesdk.fleet.retained.read_retained` finds them all)."""
    import uuid

    from edgesdk import protocol
    from edgesdk.fleet.retained import read_retained

    subtree = f"{protocol.fleet_root(fleet)}/devices/{protocol.check_id(device_id, 'device id')}/"
    cleared = read_retained(config, subtree + "#", f"{protocol.fleet_root(fleet)}/forget/{uuid.uuid4().hex}",
                            timeout_s=timeout_s, clear=True,
                            why="forgetting a device needs a login that may write its topics (the fleet-service one)")
    return sorted(cleared)
