"""The `edgesdk` command: package, inspect and verify models; run the fleet service."""

from __future__ import annotations

import typer

from edgesdk import __version__
from edgesdk.cli import (broker_cmd, deploy_cmd, devices_cmd, fleet_cmd, inspect_cmd, keys, package_cmd, releases_cmd,
                         report_cmd, rollout_cmd, sim_cmd, targets, trust_cmd)

app = typer.Typer(
    name="edgesdk",
    help="Package a trained model for edge devices, sign it, and deploy it to a fleet over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(keys.app, name="keys")
app.add_typer(targets.app, name="targets")
app.add_typer(broker_cmd.app, name="broker")
app.add_typer(devices_cmd.app, name="devices")
app.add_typer(trust_cmd.app, name="trust")
app.add_typer(releases_cmd.app, name="releases")
report_cmd.register(fleet_cmd.telemetry_app)  # `telemetry report`, beside fleet_cmd's `telemetry watch`
app.command("inspect")(inspect_cmd.inspect)
app.command("verify")(inspect_cmd.verify)
app.command("package")(package_cmd.package)
fleet_cmd.register(app)
deploy_cmd.register(app)
sim_cmd.register(app)
rollout_cmd.register(app)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"edgesdk {__version__}")
        raise typer.Exit(0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
