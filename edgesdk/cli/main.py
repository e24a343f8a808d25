"""The `edgesdk` command: package, inspect and verify models; run the fleet service."""

from __future__ import annotations

import typer

from edgesdk import __version__
from edgesdk.cli import inspect_cmd, keys, targets

app = typer.Typer(
    name="edgesdk",
    help="Package a trained model for edge devices, sign it, and deploy it to a fleet over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(keys.app, name="keys")
app.add_typer(targets.app, name="targets")
app.command("inspect")(inspect_cmd.inspect)
app.command("verify")(inspect_cmd.verify)


def _register_optional() -> None:
    # Commands whose modules need the host extra or the fleet modules register themselves here.
    from edgesdk.cli import package_cmd

    app.command("package")(package_cmd.package)
    try:
        from edgesdk.cli import fleet_cmd
    except ImportError:  # the fleet commands are not there yet in this build
        return
    fleet_cmd.register(app)


_register_optional()


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"edgesdk {__version__}")
        raise typer.Exit(0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
