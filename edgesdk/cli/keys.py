"""`edgesdk keys`: Ed25519 key pairs for the three signing roles (release, fleet, root)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesdk.cli.common import console, escape, handle_errors
from edgesdk.signing import KEY_ROLES, default_key_dir, generate_keys

app = typer.Typer(help="Create Ed25519 signing keys (packages, deployment statements, trust roots).",
                  no_args_is_help=True)


@app.command("generate")
@handle_errors
def generate(
    out: Path = typer.Option(None, "--out", help="Folder for the key pair; default: $EDGESDK_HOME/keys or "
                             "~/.config/edgesdk/keys (where `package`, `publish` and `devices provision` look)."),
    role: str = typer.Option("release", "--role", help="release: signing.key/.pub, signs packages; fleet: "
                             "fleet.key/.pub, signs deployment statements; root: root.key/.pub, signs trust roots."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key pair."),
) -> None:
    """Generate a key pair. Keep the private key (mode 0600) secret; give the .pub file to devices."""
    from edgesdk.errors import ConfigError
    from edgesdk.atomicfile import check_output_folder

    if role not in KEY_ROLES:
        raise ConfigError(f"--role {role!r}: use one of {', '.join(KEY_ROLES)}")
    folder = out if out is not None else default_key_dir()
    check_output_folder(folder, "--out")  # one line before any work, never a traceback
    pair = generate_keys(folder, overwrite=force, role=role)
    console.print(f"wrote {escape(str(pair.private_path))} (private, 0600) and {escape(str(pair.public_path))} "
                  f"— {role} key id {pair.key_id}")
