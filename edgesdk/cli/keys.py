"""`edgesdk keys`: signing keys for packages."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesdk.cli.common import console, handle_errors
from edgesdk.signing import generate_keys

app = typer.Typer(help="Create Ed25519 signing keys for packages.", no_args_is_help=True)


@app.command("generate")
@handle_errors
def generate(
    out: Path = typer.Option(..., "--out", help="Folder for signing.key (private, mode 0600) and signing.pub."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key pair."),
) -> None:
    """Generate a signing key pair. Keep signing.key secret; give signing.pub to the devices."""
    pair = generate_keys(out, overwrite=force)
    console.print(f"wrote {pair.private_path} (private, 0600) and {pair.public_path} — key id {pair.key_id}")
