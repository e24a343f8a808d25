"""`edgesdk devices provision`: one device's broker credentials and its complete agent.yaml."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesdk.cli.common import console, escape, handle_errors, out

app = typer.Typer(help="Provision devices: broker credentials and agent config.", no_args_is_help=True)


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
