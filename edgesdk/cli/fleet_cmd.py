"""Fleet commands: `edgesdk serve`, `publish`, and `telemetry watch` (`deploy` is in deploy_cmd)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import typer

from edgesdk.cli.broker_options import B, broker_config as _broker
from edgesdk.cli.common import console, handle_errors, out, print_json
from edgesdk.errors import ConfigError

_B = B


STATS_EVERY_S = 60.0  # the `collector` line; --verbose: every VERBOSE_STATS_EVERY_S
VERBOSE_STATS_EVERY_S = 5.0


@handle_errors
def serve(
    fleet: str = typer.Option("default", "--fleet", help="Fleet name (topic root edgesdk/v1/FLEET/)."),
    repo: Path = typer.Option(..., "--repo", help="Package repository folder (filled by `edgesdk publish`)."),
    share_group: str = typer.Option("edgesdk-repo", "--share-group", envvar="EDGESDK_SHARE_GROUP",
                                    help="MQTT 5 shared-subscription group of the repository processes "
                                    "(`edgesdk broker config` writes a secret one into fleet-service.env); the "
                                    "collectors share telemetry in GROUP-collector."),
    fleet_key: Path = typer.Option(None, "--fleet-key", envvar="EDGESDK_FLEET_KEY",
                                   help="Fleet key: with it, serve re-issues live deployment statements before "
                                   "they expire (without it, statements lapse after their lifetime)."),
    renew_every: float = typer.Option(3600.0, "--renew-every", help="Seconds between statement renewal checks."),
    store: str = typer.Option(None, "--store", help="Fleet store the collector writes: a SQLite file or "
                              "postgresql://... (default: the one under $EDGESDK_HOME)."),
    no_collector: bool = typer.Option(False, "--no-collector", help="Run the repository (and renewal) alone: "
                                      "collect no telemetry, events or device state."),
    collector_id: str = typer.Option(None, "--collector-id", help="The collector's MQTT client id: keep it across "
                                     "restarts (the broker queues what devices send meanwhile) and give each serve "
                                     "its own (default: from the host name, the lowest one no other serve on this "
                                     "host holds)."),
    collector_shared: bool = typer.Option(True, "--collector-shared/--collector-unshared",
                                          help="Split telemetry and events among the serve processes (shared "
                                          "subscription), or have each store everything (stored once anyway)."),
    rollouts: bool = typer.Option(True, "--rollouts/--no-rollouts", help="Run the rollout controller (needs "
                                  "--fleet-key and the collector): it drives the rollouts `edgesdk rollout start` "
                                  "stores, one serve holding each rollout's lease."),
    rollout_lease: float = typer.Option(30.0, "--rollout-lease", min=3.0, help="Seconds a serve holds a rollout "
                                        "without renewing before another serve may take it over."),
    verbose: bool = typer.Option(False, "--verbose", help=f"Print the collector line every "
                                 f"{VERBOSE_STATS_EVERY_S:g} s instead of every {STATS_EVERY_S:g} s."),
    broker: str = _B["broker"], ca: Path = _B["ca"], cert: Path = _B["cert"], client_key: Path = _B["client_key"],
    username: str = _B["username"], password: str = _B["password"], password_file: Path = _B["password_file"],
) -> None:
    """Run the fleet service until SIGTERM/SIGINT: the package repository, the collector, the
    rollout controller and statement renewal.

    Answers devices' block requests from the files in --repo, and stores what devices report
    (state, desired statements, install events, telemetry windows) in the fleet store. Several
    `serve` processes can run at once: they share the block requests and the telemetry through
    MQTT 5 shared subscriptions. With --fleet-key it also re-signs each live deployment statement
    when a third of its lifetime is left, and runs the staged rollouts stored in the fleet store
    (docs/rollouts.md).
    """
    from edgesdk.fleet.repository import RepositoryServer, list_packages
    from edgesdk.signing import load_private_key

    config = _broker(broker, ca, cert, client_key, username, password, password_file)
    if not repo.is_dir():
        raise ConfigError(f"--repo {repo}: no such folder (publish a package into it first)")
    key = load_private_key(fleet_key) if fleet_key is not None else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fleet_store = collector = renewer = server = claimed = controller = None
    try:
        if not no_collector:
            from edgesdk.fleet.collector import Collector, claim_client_id
            from edgesdk.fleet.store import FleetStore, default_store_path

            fleet_store = FleetStore.open(store)
            if collector_id is None:  # the host's lowest free id: a restart resumes its session
                claimed = claim_client_id(fleet, share_group, default_store_path().parent / "collectors")
                collector_id = claimed.client_id
            collector = Collector(config, fleet, fleet_store, client_id=collector_id, share_group=share_group,
                                  shared=collector_shared)
        server = RepositoryServer(config, fleet, repo, share_group=share_group)
        server.start()
        if collector is not None:
            collector.start()
        if key is not None:
            from edgesdk.fleet.renewal import StatementRenewer

            renewer = StatementRenewer(config, fleet, key, check_every_s=renew_every)
            renewer.start()
        if key is not None and fleet_store is not None and rollouts:
            from edgesdk.fleet.rollout_controller import RolloutController

            controller = RolloutController(config, fleet, fleet_store, repo, key, owner=collector_id,
                                           lease_s=rollout_lease)
            controller.start()
        collecting = (f"collector {collector.client_id} into {fleet_store.url}" if collector is not None
                      else "collector off (--no-collector)")
        steering = "rollouts on" if controller else ("rollouts off" if key is None or fleet_store is None
                                                     else "rollouts off (--no-rollouts)")
        console.print(f"serving {len(list_packages(repo))} package(s) from {repo} on {config.url} (fleet {fleet}); "
                      f"{collecting}; statement renewal {'on' if renewer else 'off (no --fleet-key)'}; {steering}",
                      markup=False)
        _run_until(stop, collector, VERBOSE_STATS_EVERY_S if verbose else STATS_EVERY_S)
    finally:
        # Collector first: it commits and acknowledges what it received before it disconnects.
        for part in (controller, collector, renewer, server):
            if part is not None:
                part.stop()
        if fleet_store is not None:
            fleet_store.close()
        if claimed is not None:
            claimed.release()
    console.print("repository stopped" + ("" if collector is None else ", collector stopped, store closed"),
                  markup=False)


def _run_until(stop: threading.Event, collector, every_s: float) -> None:  # noqa: ANN001 - a Collector
    """Wait for SIGTERM/SIGINT, printing the collector line every ``every_s``; FleetError when the
    collector gave up (its session taken over by another serve with the same --collector-id)."""
    from edgesdk.errors import FleetError

    next_line = time.monotonic() + every_s
    while not stop.wait(min(1.0, max(0.0, next_line - time.monotonic()))):
        if collector is None:
            continue
        if collector.failure:
            raise FleetError(collector.failure)
        if time.monotonic() >= next_line:
            console.print(collector.stats.line(time.time()), markup=False)
            next_line += every_s


@handle_errors
def publish(
    package: Path = typer.Argument(..., help="The .edgepkg to add."),
    repo: Path = typer.Option(..., "--repo", help="Package repository folder."),
    public_key: list[Path] = typer.Option([], "--public-key", help="Trusted key to verify the signature with "
                                          "(repeatable); default: the default signing key's signing.pub."),
    store: str = typer.Option(None, "--store", help="Fleet store that records the release (name@version, "
                              "target, the manifest's metrics): a SQLite file or postgresql://... (default: the "
                              "one under $EDGESDK_HOME)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Verify a package (signature and every file's hash), add it to the repository by sha256, and
    record the release in the fleet store."""
    from edgesdk.atomicfile import check_output_folder
    from edgesdk.fleet.repository import publish_package
    from edgesdk.fleet.store import FleetStore
    from edgesdk.signing import PUBLIC_NAME, default_key_dir, load_public_key

    if not package.is_file():
        raise ConfigError(f"{package}: no such package file")
    check_output_folder(repo, "--repo")  # one line before any work, never a traceback

    paths = list(public_key) or [default_key_dir() / PUBLIC_NAME]
    if not public_key and not paths[0].exists():
        raise ConfigError("no --public-key given and no default key: pass the key the package was signed with")
    keys = [load_public_key(p) for p in paths]
    fleet_store = FleetStore.open(store)  # before publishing: an unreachable store publishes nothing
    try:
        published = publish_package(package, repo, keys)
        record_release(published, fleet_store)
    finally:
        fleet_store.close()
    if as_json:
        print_json({"package_id": published.package_id, "name": published.name, "version": published.version,
                    "target": published.target, "size": published.size, "signer": published.signer,
                    "path": str(published.path)})
        return
    out.print(f"published {published.name} {published.version} ({published.target}) as "
              f"{published.package_id} — {published.size / 1e6:.2f} MB, signed by {published.signer}")


def record_release(published, fleet_store) -> None:  # noqa: ANN001 - a PublishedPackage, a FleetStore
    """Record a published package in the fleet store, with each variant's metrics from its manifest."""
    from edgesdk.errors import FleetError
    from edgesdk.fleet.records import ReleaseRecord
    from edgesdk.package import open_package

    with open_package(published.path) as opened:  # the bytes publish just verified
        manifest = opened.manifest
    release = ReleaseRecord(package_id=published.package_id, name=published.name, version=published.version,
                            target=published.target, size=published.size, published_at=time.time(),
                            signer=published.signer, metrics={v.id: v.metrics for v in manifest.variants})
    try:
        fleet_store.record_release(release)
    except FleetError as exc:
        raise FleetError(f"published {published.name} {published.version} as {published.package_id[:12]}, but "
                         f"the fleet store did not record the release: {exc}") from None


telemetry_app = typer.Typer(help="Watch what devices report, and review it from the fleet store.", no_args_is_help=True)


@telemetry_app.command("watch")
@handle_errors
def watch(
    fleet: str = typer.Option("default", "--fleet", help="Fleet name."),
    device: str = typer.Option("+", "--device", help="One device id (default: all)."),
    count: int = typer.Option(0, "--count", help="Exit after this many telemetry windows (0: never)."),
    timeout: float = typer.Option(0, "--timeout", help="Exit after this many seconds (0: never)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    broker: str = _B["broker"], ca: Path = _B["ca"], cert: Path = _B["cert"], client_key: Path = _B["client_key"],
    username: str = _B["username"], password: str = _B["password"], password_file: Path = _B["password_file"],
) -> None:
    """Print devices' state, install events and telemetry windows as they arrive.

    Everything a device sends is untrusted: it is printed literally (no markup, control characters
    escaped), and a malformed message is one "malformed" line, never the end of the watch.
    """
    import uuid

    from edgesdk import protocol
    from edgesdk.broker import connect_blocking, disconnect, make_client

    config = _broker(broker, ca, cert, client_key, username, password, password_file)
    if device != "+":
        protocol.check_id(device, "--device")
    root = protocol.fleet_root(fleet)
    done = threading.Event()
    seen = {"telemetry": 0}
    lock = threading.Lock()  # paho runs callbacks on its one network thread; the lock keeps that true

    def on_message(client, userdata, message) -> None:  # noqa: ANN001 - paho callback
        try:
            with lock:
                if _show(message.topic, message.payload, as_json):
                    seen["telemetry"] += 1
                    if count and seen["telemetry"] >= count:
                        done.set()
        except Exception as exc:  # noqa: BLE001 - a device must never be able to end the watch
            _line(f"malformed message on {message.topic}: {type(exc).__name__}")

    client = make_client(f"edgesdk-watch-{uuid.uuid4().hex[:8]}", config, clean_start=True)
    client.on_message = on_message

    def on_connect(c, userdata, flags, reason, props) -> None:  # noqa: ANN001
        # One SUBSCRIBE for all three: a retained state printed means every filter is in place.
        c.subscribe([(f"{root}/devices/{device}/{leaf}", 1) for leaf in ("state", "events", "telemetry")])

    client.on_connect = on_connect
    connect_blocking(client, config)
    try:
        done.wait(timeout if timeout > 0 else None)
    except KeyboardInterrupt:
        pass
    finally:
        disconnect(client)
    if count and seen["telemetry"] < count:
        raise typer.Exit(1)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def safe_text(value: object, limit: int = 200) -> str:
    """Device-supplied text for one terminal line: control characters (ANSI escapes, newlines)
    escaped, length bounded. Rich markup is switched off where it is printed (`_line`)."""
    text = str(value).translate(_CONTROL)
    return text if len(text) <= limit else text[:limit] + "…"


def _line(text: str) -> None:
    # markup=False: a device id or reason like "[bold red]" or "[link=…]" prints as typed.
    out.print(text, markup=False, emoji=False, highlight=False)


def _num(value: object) -> str:
    return "—" if value is None else f"{value:.3f}"


def _show(topic: str, payload: bytes, as_json: bool) -> bool:
    """Print one message; True when it was a valid telemetry window (what --count counts)."""
    from edgesdk import protocol
    from edgesdk.errors import ProtocolError

    parts = topic.split("/")
    kind, dev = parts[-1], parts[-2] if len(parts) >= 2 else "?"
    classes = {"telemetry": protocol.TelemetryWindow, "events": protocol.InstallEvent, "state": protocol.DeviceState}
    if kind not in classes:
        return False
    if not payload and kind == "state":  # a cleared retained state
        return False
    try:
        data = protocol.parse_json(payload, topic)
        message = classes[kind].from_dict(data, topic)
    except ProtocolError as exc:
        if as_json:
            print(json.dumps({"device": dev, "kind": kind, "malformed": str(exc)}), flush=True)
        else:
            _line(f"{safe_text(dev)} {kind}: malformed message ignored ({safe_text(exc)})")
        return False
    if as_json:
        print(json.dumps({"device": dev, "kind": kind, "data": data}), flush=True)
    elif kind == "telemetry":
        w = message
        model = f" {safe_text(w.model, 64)}" if w.model else ""  # older agents send no model name
        _line(f"{safe_text(dev)} telemetry #{w.seq}{model}: {w.count} calls, {w.errors} errors, "
              f"p50 {_num(w.p50_ms)} p95 {_num(w.p95_ms)} p99 {_num(w.p99_ms)} max {_num(w.max_ms)} ms — "
              f"{safe_text(w.variant)} on {safe_text(w.provider)}")
    elif kind == "events":
        e = message
        extra = e.reason or (f"{e.progress:.0%}" if e.progress is not None else "")
        parts = [safe_text(dev), "event", e.kind.value, safe_text(e.model or ""), safe_text(e.package_id[:12]),
                 safe_text(extra)]
        _line(" ".join(p for p in parts if p))
    else:
        _line(f"{safe_text(dev)} state: {'online' if message.online else 'offline'}, {_active_models(message)}")
    return kind == "telemetry"


MAX_MODELS_SHOWN = 32  # a state is device-supplied: bound the line


def _active_models(st) -> str:  # noqa: ANN001 - a DeviceState
    """'active det@1.0 (onnx-fp32 on CPUExecutionProvider), ocr@2.1 (...)' from `models`, or an
    older agent's single active_package when it sends no `models`."""
    if st.models:
        shown = [_model_entry(m) for m in st.models[:MAX_MODELS_SHOWN]]
        more = len(st.models) - MAX_MODELS_SHOWN
        return "active " + ", ".join(shown) + (f", and {more} more" if more > 0 else "")
    if st.active_package is None:
        return "no active model"
    return (f"active {safe_text(str(st.active_package)[:12])} {safe_text(st.active_variant)} on "
            f"{safe_text(st.provider)}")


def _model_entry(entry: object) -> str:
    if not isinstance(entry, dict):
        return f"(malformed entry {safe_text(entry, 64)})"
    text = {k: safe_text(entry.get(k), 64) for k in ("name", "version", "variant", "provider")}
    return f"{text['name']}@{text['version']} ({text['variant']} on {text['provider']})"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("publish")(publish)
    app.add_typer(telemetry_app, name="telemetry")
