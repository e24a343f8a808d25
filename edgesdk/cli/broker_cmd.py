"""`edgesdk broker config`: the Mosquitto config, ACL, password file and TLS files edgesdk ships."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesdk.cli.common import console, escape, handle_errors, out

app = typer.Typer(help="Set up the MQTT broker (Mosquitto) with TLS, passwords and the edgesdk ACL.",
                  no_args_is_help=True)


@app.command("config")
@handle_errors
def config(
    folder: Path = typer.Option(..., "--out", help="Folder for mosquitto.conf, passwd, acl, TLS files, "
                                "persistence and the identities' .env files."),
    port: int = typer.Option(None, "--port", help="Listener port (default: 8883 with TLS, 1883 without)."),
    host: list[str] = typer.Option([], "--host", help="Host name or IP address clients use to reach the broker "
                                   "(repeatable; all go into the server certificate; the first goes into the .env "
                                   "files, the first non-loopback one into device configs). Default: localhost, "
                                   "127.0.0.1 and this machine's host name."),
    tls: bool = typer.Option(True, "--tls/--no-tls", help="TLS listener with a CA and server certificate made "
                             "here. --no-tls sends passwords in clear text: only for a closed test network."),
    max_packet_size: int = typer.Option(None, "--max-packet-size", help="Largest MQTT packet in bytes; a client "
                                        "sending a bigger one is disconnected (default: one 256 KiB block + 16 KiB)."),
    bind: str = typer.Option(None, "--bind", help="Listen on this address only (default: every interface)."),
    run_as: str = typer.Option(None, "--run-as", help="User Mosquitto drops to when started as root (default: "
                               "'mosquitto' when run by root, else you); it gets read access to the files it needs."),
    force: bool = typer.Option(False, "--force", help="Make a new CA, server certificate and service passwords "
                               "(device passwords are kept, but devices need the new CA)."),
) -> None:
    """Write a Mosquitto setup: TLS, no anonymous clients, a password file and the edgesdk ACL.

    Creates the identities fleet-service (for `edgesdk serve` and deploys) and operator (for
    `telemetry watch`, deploys, rollbacks), each with an .env file: `set -a; . DIR/operator.env`
    is all a host command needs. Re-running keeps the CA and every identity unless --force.
    """
    from edgesdk.broker import DEFAULT_MAX_PACKET_SIZE
    from edgesdk.fleet.broker_policy import BrokerSetup, default_hosts, write_broker_config

    setup = BrokerSetup(folder, port=port, hosts=tuple(host) or default_hosts(), tls=tls,
                        max_packet_size=max_packet_size if max_packet_size is not None else DEFAULT_MAX_PACKET_SIZE,
                        bind=bind, **({"run_as": run_as} if run_as else {}), force=force)
    files = write_broker_config(setup)
    if files.kept:
        console.print(f"kept {escape(', '.join(files.kept))} from {escape(str(files.folder))} (--force replaces them)")
    console.print(f"wrote {escape(str(files.config))} for {escape(files.url)}; devices will use "
                  f"{escape(files.device_url)}")
    for name, path in files.env_files.items():
        console.print(f"  {name}: {escape(str(path))} (mode 0600; `set -a; . {escape(str(path))}`)")
    console.print("start the broker with:")
    out.print(escape(files.start_command))
