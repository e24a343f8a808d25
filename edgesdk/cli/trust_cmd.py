"""`edgesdk trust`: the fleet's trust root (which keys sign packages and statements; rotation)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesdk.cli.broker_options import B, broker_config
from edgesdk.cli.common import console, handle_errors, out, print_json

app = typer.Typer(help="The fleet's trust root: create it, rotate keys, publish new roots to devices.",
                  no_args_is_help=True)


def _private(paths: list[Path]):
    from edgesdk.signing import load_private_key

    return [load_private_key(p) for p in paths]


def _public(paths: list[Path]):
    from edgesdk.signing import load_public_key

    return [load_public_key(p) for p in paths]


def _check_out(path: Path, force: bool) -> None:
    from edgesdk.errors import ConfigError

    if path.exists() and (path.is_dir() or not force):
        raise ConfigError(f"--out {path}: {'is a folder' if path.is_dir() else 'exists (pass --force to replace it)'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: folder {path.parent} does not exist")


@app.command("init")
@handle_errors
def init(
    root_key: list[Path] = typer.Option(..., "--root-key", help="Root private key (repeatable; keep them offline)."),
    release_key: list[Path] = typer.Option(..., "--release-key", help="Release public key: signs packages (repeatable)."),
    fleet_key: list[Path] = typer.Option(..., "--fleet-key", help="Fleet public key: signs deployment statements."),
    threshold: int = typer.Option(1, "--threshold", help="Root keys needed to sign the next root."),
    expires_days: float = typer.Option(365, "--expires-days", help="Days until this root expires."),
    out_path: Path = typer.Option(..., "--out", help="Where to write root.json (version 1): provision devices with it."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Create the first trust root of a fleet (TUF root metadata, version 1)."""
    from edgesdk.atomicfile import write_bytes_atomic
    from edgesdk.trustroot import TrustRoot, create_root

    _check_out(out_path, force)
    raw = create_root(_private(root_key), _public(release_key), _public(fleet_key), threshold=threshold,
                      expires_days=expires_days)
    write_bytes_atomic(out_path, raw)
    root = TrustRoot.from_bytes(raw)
    console.print(f"wrote {out_path}: trust root version {root.version}, expires {root.expires:%Y-%m-%d}")


@app.command("rotate")
@handle_errors
def rotate(
    current: Path = typer.Option(..., "--root", help="The current root.json."),
    signer: list[Path] = typer.Option(..., "--sign-with", help="Current root private key authorising the change "
                                      "(repeatable, up to the threshold)."),
    new_root_key: list[Path] = typer.Option([], "--new-root-key", help="New root private keys, replacing the root "
                                            "role (default: keep the current root keys and threshold)."),
    release_key: list[Path] = typer.Option([], "--release-key", help="New release public keys (default: unchanged)."),
    fleet_key: list[Path] = typer.Option([], "--fleet-key", help="New fleet public keys (default: unchanged)."),
    threshold: int = typer.Option(None, "--threshold", help="New root threshold (default: unchanged)."),
    expires_days: float = typer.Option(365, "--expires-days", help="Days until the new root expires."),
    out_path: Path = typer.Option(..., "--out", help="Where to write the new root (version + 1)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write the next root: new keys (a revoked key is one left out), signed by the current root's
    threshold and the new one's, as devices will check it."""
    from edgesdk.atomicfile import write_bytes_atomic
    from edgesdk.errors import ConfigError
    from edgesdk.trustroot import TrustRoot, rotate_root

    _check_out(out_path, force)
    try:
        old = TrustRoot.from_bytes(current.read_bytes(), str(current))
    except OSError as exc:
        raise ConfigError(f"--root {current}: cannot read ({exc.strerror})") from None
    raw = rotate_root(old, _private(signer), root_keys=_private(new_root_key) or None,
                      release_keys=_public(release_key) or None, fleet_keys=_public(fleet_key) or None,
                      threshold=threshold, expires_days=expires_days)
    write_bytes_atomic(out_path, raw)
    console.print(f"wrote {out_path}: trust root version {old.version + 1} (publish it with `edgesdk trust publish`)")


@app.command("publish")
@handle_errors
def publish(
    roots: list[Path] = typer.Argument(..., help="Every root after version 1, oldest first (devices follow the chain)."),
    fleet: str = typer.Option("default", "--fleet", help="Fleet name."),
    broker: str = B["broker"], ca: Path = B["ca"], cert: Path = B["cert"], client_key: Path = B["client_key"],
    username: str = B["username"], password: str = B["password"], password_file: Path = B["password_file"],
) -> None:
    """Publish the root chain (retained) on the fleet's trust topic; agents follow it."""
    from edgesdk import protocol
    from edgesdk.errors import ConfigError
    from edgesdk.fleet.deploy import publish_retained
    from edgesdk.trustroot import TrustRoot, root_chain_message

    raws = []
    for path in roots:
        try:
            raws.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    parsed = sorted((TrustRoot.from_bytes(r, "root") for r in raws), key=lambda r: r.version)
    for before, after in zip(parsed, parsed[1:]):  # refuse to publish a chain devices would refuse
        before.next(after.raw)
    parsed[-1].check_not_expired()  # devices refuse a chain whose newest root has expired
    config = broker_config(broker, ca, cert, client_key, username, password, password_file)
    publish_retained(config, protocol.trust_root_topic(fleet), root_chain_message(r.raw for r in parsed))
    out.print(f"published trust roots {', '.join(str(r.version) for r in parsed)} for fleet {fleet}")


@app.command("show")
@handle_errors
def show(root: Path = typer.Argument(..., help="A root.json."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Version, expiry, thresholds and key ids of a trust root."""
    from edgesdk.errors import ConfigError
    from edgesdk.signing import key_id
    from edgesdk.trustroot import TrustRoot

    try:
        parsed = TrustRoot.from_bytes(root.read_bytes(), str(root))
    except OSError as exc:
        raise ConfigError(f"{root}: cannot read ({exc.strerror})") from None
    info = {"version": parsed.version, "expires": parsed.expires.isoformat(), "roles": {
        role: {"threshold": parsed.threshold(role), "keys": [key_id(k) for k in parsed.keys_for(role)]}
        for role in ("root", "release", "fleet")}}
    if as_json:
        print_json(info)
        return
    out.print(f"trust root version {info['version']}, expires {info['expires']}")
    for role, data in info["roles"].items():
        out.print(f"  {role}: threshold {data['threshold']}, keys {', '.join(data['keys'])}")
