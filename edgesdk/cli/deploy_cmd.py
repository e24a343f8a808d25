"""`edgesdk deploy` and `edgesdk undeploy` (and `rollback --immediate`): signed deployment statements
to devices, one retained statement per device and model name."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesdk.cli.broker_options import B, broker_config
from edgesdk.cli.common import handle_errors, out
from edgesdk.cli.fleet_cmd import safe_text
from edgesdk.errors import ConfigError, PackageError

UNCONFIRMED_EXIT = 3  # `undeploy`: some devices did not confirm within --wait (their statement stays retained)

FLEET_KEY_HELP = ("Fleet key that signs the deployment statements (or $EDGESDK_FLEET_KEY; default: fleet.key "
                  "in the default key folder). Devices obey only statements signed by their fleet keys.")


def fleet_key_option():
    return typer.Option(None, "--fleet-key", help=FLEET_KEY_HELP, envvar="EDGESDK_FLEET_KEY")


# The options `deploy` and `rollback` share (use as defaults, like broker_options.B).
S = dict(
    device=typer.Option(..., "--device", help="Device id (repeatable)."),
    fleet=typer.Option("default", "--fleet", help="Fleet name."),
    repo=typer.Option(..., "--repo", help="Package repository folder the package was published to."),
    target=typer.Option(None, "--target", help="The target, when several are published for that version."),
    rollout_id=typer.Option(None, "--rollout-id", help="Id carried into the devices' install events."),
    release_key_as_fleet_key=typer.Option(False, "--release-key-as-fleet-key",
                                          help="Allow the key that signed the package to sign the statement."),
    allow_unknown=typer.Option(False, "--allow-unknown", help="Send statements to devices (and a fleet) the fleet "
                               "store does not know yet (e.g. before `edgesdk serve` has heard from them)."),
    store=typer.Option(None, "--store", help="Fleet store the device ids are checked against: a SQLite file or "
                       "postgresql://... (default: the one under $EDGESDK_HOME)."),
)


def check_known_devices(location: str | None, fleet: str, devices: list[str], verb: str) -> None:
    """Refuse, in one line naming what is known, a fleet with no device in the store and device ids
    the store does not know: a typo must not leave a retained statement for a device that never
    comes (`--allow-unknown` skips this)."""
    from edgesdk.cli.devices_cmd import join_limited, missing_store, open_store

    hint = f"pass --allow-unknown to {verb} anyway"
    missing = missing_store(location)
    if missing is not None:
        raise ConfigError(f"{missing}; without it the device ids cannot be checked: {hint}")
    with open_store(location) as fleet_store:
        known = [d.device_id for d in fleet_store.devices(fleet)]
        fleets = sorted({d.fleet for d in fleet_store.devices()}) if not known else []
        where = fleet_store.url
    if not known:
        what = f"known fleets: {join_limited(fleets)}" if fleets else f"the store at {where} knows no device yet"
        raise ConfigError(f"unknown fleet {fleet} ({what}; {hint})")
    unknown = [d for d in dict.fromkeys(devices) if d not in set(known)]
    if unknown:
        noun = "device" if len(unknown) == 1 else "devices"
        raise ConfigError(f"unknown {noun} {', '.join(unknown)} in fleet {fleet} "
                          f"(known: {join_limited(known)}; {hint})")


def load_fleet_key(path: Path | None):
    """The fleet signing key from --fleet-key, $EDGESDK_FLEET_KEY or the default key folder."""
    from edgesdk.signing import default_key_dir, load_private_key

    if path is None:
        path = default_key_dir() / "fleet.key"
        if not path.exists():
            raise ConfigError("no --fleet-key given and no default fleet key: create one with "
                              "`edgesdk keys generate --role fleet` or set $EDGESDK_FLEET_KEY")
    return load_private_key(path)


def resolve_release(repo: Path, ref: str, target: str | None = None):
    """A published package from NAME@VERSION, a package id (or unique prefix) or an .edgepkg file."""
    from edgesdk.fleet.repository import find_package, list_packages

    if not repo.is_dir():
        raise ConfigError(f"--repo {repo}: no such folder (publish a package into it first)")
    if "@" not in ref:
        return find_package(repo, ref)
    name, _, version = ref.partition("@")
    return _one_release(list_packages(repo), name, version, target, repo)


def _one_release(packages: list, name: str, version: str, target: str | None, repo: Path):
    matches = [p for p in packages if p.name == name and p.version == version and target in (None, p.target)]
    if not matches:
        known = sorted({f"{p.name}@{p.version}" for p in packages if p.name == name})
        hint = f" (published: {', '.join(known)})" if known else f" (no package named {name!r} in {repo})"
        raise PackageError(f"{name}@{version}{'' if target is None else f' for {target}'} is not published{hint}")
    if len(matches) > 1:
        raise PackageError(f"{name}@{version} is published for several targets "
                           f"({', '.join(sorted(p.target for p in matches))}): pass --target")
    return matches[0]


@handle_errors
def deploy(
    package: str = typer.Argument(..., help="NAME@VERSION, a published package id (or unique prefix), "
                                  "or its .edgepkg file."),
    device: list[str] = S["device"], fleet: str = S["fleet"], repo: Path = S["repo"], target: str = S["target"],
    rollout_id: str = S["rollout_id"], fleet_key: Path = fleet_key_option(),
    release_key_as_fleet_key: bool = S["release_key_as_fleet_key"],
    allow_unknown: bool = S["allow_unknown"], store: str = S["store"],
    broker: str = B["broker"], ca: Path = B["ca"], cert: Path = B["cert"], client_key: Path = B["client_key"],
    username: str = B["username"], password: str = B["password"], password_file: Path = B["password_file"],
) -> None:
    """Tell devices to run a published package: one signed statement per device (retained).

    Each model name has its own statement: deploying one model leaves the device's other models
    alone. A device refuses a lower version of a package it runs: use `edgesdk rollback` for that.
    Device ids the fleet store does not know are refused (--allow-unknown sends anyway).
    """
    send_statements(package, device, fleet, repo, target, rollout_id, fleet_key, release_key_as_fleet_key,
                    broker_config(broker, ca, cert, client_key, username, password, password_file), rollback=False,
                    store=store, allow_unknown=allow_unknown)


def send_statements(ref: str, devices: list[str], fleet: str, repo: Path, target: str | None,
                    rollout_id: str | None, fleet_key_path: Path | None, allow_release_key: bool, config,
                    rollback: bool, store: str | None, allow_unknown: bool) -> None:
    """Sign and publish a deploy (or rollback) statement for each device at once (no rollout)."""
    from edgesdk import protocol
    from edgesdk.fleet.deploy import check_fleet_key, deploy as deploy_to

    for d in devices:
        protocol.check_id(d, "device id")
    protocol.check_id(fleet, "fleet")
    if not allow_unknown:
        check_known_devices(store, fleet, devices, "roll back" if rollback else "deploy")
    published = resolve_release(repo, ref, target)
    key = load_fleet_key(fleet_key_path)
    check_fleet_key(key, published, allow_release_key)
    signed = deploy_to(config, fleet, devices, published, key, rollout_id=rollout_id, rollback=rollback)
    first = next(iter(signed.values())).statement
    out.print(f"{'rollback to' if rollback else 'desired'} {published.name}@{published.version} "
              f"({published.package_id[:12]}) for {', '.join(devices)} in fleet {fleet} — signed statements "
              f"on desired/{published.name}, valid until {_utc(first.expires)}")


@handle_errors
def undeploy(
    name: str = typer.Argument(..., help="The model name to remove from the devices."),
    device: list[str] = S["device"], fleet: str = S["fleet"],
    wait: float = typer.Option(30.0, "--wait", min=0, help="Seconds to wait for each device's `undeployed` "
                               "event before clearing its statement (0: publish and do not wait)."),
    rollout_id: str = S["rollout_id"], fleet_key: Path = fleet_key_option(),
    allow_unknown: bool = S["allow_unknown"], store: str = S["store"],
    broker: str = B["broker"], ca: Path = B["ca"], cert: Path = B["cert"], client_key: Path = B["client_key"],
    username: str = B["username"], password: str = B["password"], password_file: Path = B["password_file"],
) -> None:
    """Tell devices to stop running model NAME: a signed undeploy statement per device (retained).

    Waits for each device to confirm (its `undeployed` event), then clears that device's retained
    statement. A device that does not confirm within --wait keeps the undeploy statement retained
    and obeys it when it reconnects; the command then exits with code 3.
    """
    from edgesdk import protocol
    from edgesdk.fleet.deploy import check_model_name, undeploy as undeploy_from

    check_model_name(name)
    for d in device:
        protocol.check_id(d, "device id")
    protocol.check_id(fleet, "fleet")
    if not allow_unknown:
        check_known_devices(store, fleet, device, "undeploy")
    config = broker_config(broker, ca, cert, client_key, username, password, password_file)
    key = load_fleet_key(fleet_key)
    result = undeploy_from(config, fleet, device, name, key, wait_s=wait, rollout_id=rollout_id)
    for d in result.statements:
        if not result.waited:
            out.print(f"{d}: undeploy statement for {name} published (retained; not waiting for the device)")
        elif d in result.confirmed:
            how = "undeployed it" if result.confirmed[d] == "undeployed" else "was not running it"
            out.print(f"{d}: {how} — confirmed; retained statement on desired/{name} cleared")
        else:
            why = f" (it refused the statement: {safe_text(result.refused[d])})" if d in result.refused else ""
            out.print(f"{d}: not confirmed within {wait:g} s: its undeploy statement stays retained{why}",
                      markup=False)
    if result.waited and result.unconfirmed:
        raise typer.Exit(UNCONFIRMED_EXIT)


def _utc(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)
    app.command("undeploy")(undeploy)
