"""Fleet commands: `edgesdk serve`, `publish`, `deploy`, and `telemetry watch`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import typer

from edgesdk.cli.common import console, handle_errors, out, print_json
from edgesdk.errors import ConfigError

BROKER_HELP = "Broker URL: mqtt://host[:1883] or mqtts://host[:8883] (TLS)."


def _broker(url: str, ca: Path | None, cert: Path | None, client_key: Path | None, username: str | None,
            password: str | None):
    from edgesdk.broker import TlsConfig, parse_broker_url

    tls = None
    if url.startswith("mqtts://"):
        tls = TlsConfig(ca_file=ca, cert_file=cert, key_file=client_key)
    elif ca or cert or client_key:
        raise ConfigError("--ca/--cert/--client-key need an mqtts:// broker URL")
    password = password or os.environ.get("EDGESDK_BROKER_PASSWORD")
    return parse_broker_url(url, tls=tls, username=username, password=password)


def _broker_options():
    return dict(
        broker=typer.Option("mqtt://127.0.0.1:1883", "--broker", help=BROKER_HELP),
        ca=typer.Option(None, "--ca", help="CA certificate file for mqtts:// (default: system CAs)."),
        cert=typer.Option(None, "--cert", help="Client certificate for mqtts:// (with --client-key)."),
        client_key=typer.Option(None, "--client-key", help="Client certificate's private key."),
        username=typer.Option(None, "--username", help="Broker username."),
        password=typer.Option(None, "--password", help="Broker password (or $EDGESDK_BROKER_PASSWORD)."),
    )


_B = _broker_options()


@handle_errors
def serve(
    fleet: str = typer.Option("default", "--fleet", help="Fleet name (topic root edgesdk/v1/FLEET/)."),
    repo: Path = typer.Option(..., "--repo", help="Package repository folder (filled by `edgesdk publish`)."),
    broker: str = _B["broker"], ca: Path = _B["ca"], cert: Path = _B["cert"], client_key: Path = _B["client_key"],
    username: str = _B["username"], password: str = _B["password"],
) -> None:
    """Serve the package repository over MQTT until SIGTERM/SIGINT.

    Answers devices' block requests from the files in --repo. Several `serve` processes can run
    at once: they share the requests through an MQTT 5 shared subscription.
    """
    from edgesdk.fleet.repository import RepositoryServer, list_packages

    config = _broker(broker, ca, cert, client_key, username, password)
    if not repo.is_dir():
        raise ConfigError(f"--repo {repo}: no such folder (publish a package into it first)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = RepositoryServer(config, fleet, repo)
    server.start()
    console.print(f"serving {len(list_packages(repo))} package(s) from {repo} on {config.url} (fleet {fleet})")
    try:
        stop.wait()
    finally:
        server.stop()
    console.print("repository stopped")


@handle_errors
def publish(
    package: Path = typer.Argument(..., help="The .edgepkg to add."),
    repo: Path = typer.Option(..., "--repo", help="Package repository folder."),
    public_key: list[Path] = typer.Option([], "--public-key", help="Trusted key to verify the signature with "
                                          "(repeatable); default: the default signing key's signing.pub."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Verify a package (signature and every file's hash) and add it to the repository by sha256."""
    from edgesdk.fleet.repository import publish_package
    from edgesdk.signing import PUBLIC_NAME, default_key_dir, load_public_key

    paths = list(public_key) or [default_key_dir() / PUBLIC_NAME]
    if not public_key and not paths[0].exists():
        raise ConfigError("no --public-key given and no default key: pass the key the package was signed with")
    published = publish_package(package, repo, [load_public_key(p) for p in paths])
    if as_json:
        print_json({"package_id": published.package_id, "name": published.name, "version": published.version,
                    "target": published.target, "size": published.size, "signer": published.signer,
                    "path": str(published.path)})
        return
    out.print(f"published {published.name} {published.version} ({published.target}) as "
              f"{published.package_id} — {published.size / 1e6:.2f} MB, signed by {published.signer}")


@handle_errors
def deploy(
    package: str = typer.Argument(..., help="A published package: its id (or a unique prefix) or its .edgepkg file."),
    device: list[str] = typer.Option(..., "--device", help="Device id (repeatable)."),
    fleet: str = typer.Option("default", "--fleet", help="Fleet name."),
    repo: Path = typer.Option(..., "--repo", help="Package repository folder the package was published to."),
    rollout_id: str = typer.Option(None, "--rollout-id", help="Id carried into the devices' install events."),
    broker: str = _B["broker"], ca: Path = _B["ca"], cert: Path = _B["cert"], client_key: Path = _B["client_key"],
    username: str = _B["username"], password: str = _B["password"],
) -> None:
    """Set the desired deployment (retained) of each device to a published package."""
    from edgesdk.fleet.deploy import deploy as deploy_to
    from edgesdk.fleet.repository import find_package

    config = _broker(broker, ca, cert, client_key, username, password)
    published = find_package(repo, package)
    deploy_to(config, fleet, device, published, rollout_id=rollout_id)
    out.print(f"desired {published.name} {published.version} ({published.package_id[:12]}) for "
              f"{', '.join(device)} in fleet {fleet}")


telemetry_app = typer.Typer(help="Watch what devices report.", no_args_is_help=True)


@telemetry_app.command("watch")
@handle_errors
def watch(
    fleet: str = typer.Option("default", "--fleet", help="Fleet name."),
    device: str = typer.Option("+", "--device", help="One device id (default: all)."),
    count: int = typer.Option(0, "--count", help="Exit after this many telemetry windows (0: never)."),
    timeout: float = typer.Option(0, "--timeout", help="Exit after this many seconds (0: never)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    broker: str = _B["broker"], ca: Path = _B["ca"], cert: Path = _B["cert"], client_key: Path = _B["client_key"],
    username: str = _B["username"], password: str = _B["password"],
) -> None:
    """Print devices' state, install events and telemetry windows as they arrive."""
    import uuid

    from edgesdk import protocol
    from edgesdk.broker import connect_blocking, disconnect, make_client

    config = _broker(broker, ca, cert, client_key, username, password)
    root = protocol.fleet_root(fleet)
    done = threading.Event()
    seen = {"telemetry": 0}

    def on_message(client, userdata, message) -> None:  # noqa: ANN001 - paho callback
        parts = message.topic.split("/")
        kind, dev = parts[-1], parts[-2]
        try:
            data = json.loads(message.payload) if message.payload else {}
        except ValueError:
            data = {"raw": message.payload[:80].decode(errors="replace")}
        if as_json:
            print(json.dumps({"device": dev, "kind": kind, "data": data}), flush=True)
        elif kind == "telemetry":
            p = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
            out.print(f"{dev} telemetry #{data.get('seq')}: {data.get('count')} calls, {data.get('errors')} errors, "
                      f"p50 {p(data.get('p50_ms'))} p95 {p(data.get('p95_ms'))} p99 {p(data.get('p99_ms'))} "
                      f"max {p(data.get('max_ms'))} ms — {data.get('variant')} on {data.get('provider')}")
        elif kind == "events":
            extra = data.get("reason") or (f"{data['progress']:.0%}" if data.get("progress") is not None else "")
            out.print(f"{dev} event {data.get('kind')} {str(data.get('package_id'))[:12]} {extra}")
        elif kind == "state":
            out.print(f"{dev} state: {'online' if data.get('online') else 'offline'}, active "
                      f"{str(data.get('active_package'))[:12]} {data.get('active_variant')} on {data.get('provider')}")
        if kind == "telemetry":
            seen["telemetry"] += 1
            if count and seen["telemetry"] >= count:
                done.set()

    client = make_client(f"edgesdk-watch-{uuid.uuid4().hex[:8]}", config, clean_start=True)
    client.on_message = on_message

    def on_connect(c, userdata, flags, reason, props) -> None:  # noqa: ANN001
        for leaf in ("state", "events", "telemetry"):
            c.subscribe(f"{root}/devices/{device}/{leaf}", qos=1)

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


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("publish")(publish)
    app.command("deploy")(deploy)
    app.add_typer(telemetry_app, name="telemetry")
