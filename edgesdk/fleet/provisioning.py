"""Device provisioning: one device's broker credentials and a complete agent.yaml beside them.

`provision_device` adds the device to the password file of a folder made by `edgesdk broker
config` (edgesdk.fleet.broker_policy) and writes, into the device's own folder, everything its
agent needs: agent.yaml, its password (mode 0600), the broker's CA, the release and fleet public
keys and, when given, the fleet's trust root. Paths in agent.yaml are relative to its folder, so
the folder can be copied to the device as one piece (e.g. to /etc/edge-agent/).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgesdk.atomicfile import check_output_folder, write_text_atomic
from edgesdk.errors import ConfigError, EdgeError, map_os_errors
from edgesdk.fleet.broker_policy import broker_paths, check_device_username, load_broker_settings
from edgesdk.fleet.mosquitto_passwd import new_password, read_password_file, set_password
from edgesdk.protocol import check_id
from edgesdk.signing import default_key_dir, key_file_names, load_public_key

DEFAULT_DATA_DIR = "/var/lib/edge-agent"
CONFIG_NAME = "agent.yaml"
PASSWORD_NAME = "password"
CA_NAME = "ca.crt"
TRUST_ROOT_NAME = "root.json"


@dataclass(frozen=True)
class ProvisionRequest:
    """What to provision; `check()` validates it before anything is written."""

    device_id: str
    broker_dir: Path
    out: Path
    fleet: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    release_keys: tuple[Path, ...] = ()  # () = default_key_dir()/signing.pub
    fleet_keys: tuple[Path, ...] = ()  # () = default_key_dir()/fleet.pub
    trust_root: Path | None = None
    broker_url: str | None = None  # None = the broker folder's URL for devices (first non-loopback host)
    data_dir: str = DEFAULT_DATA_DIR
    force: bool = False  # replace an existing agent.yaml and the device's password


@dataclass(frozen=True)
class ProvisionedDevice:
    device_id: str
    broker_url: str
    config_path: Path
    password_path: Path
    password: str = field(repr=False)
    replaced: bool  # the device already had credentials (now replaced)


def _keys(given: tuple[Path, ...], role: str, option: str) -> tuple[Path, ...]:
    if given:
        paths = tuple(Path(p) for p in given)
    else:
        default = default_key_dir() / key_file_names(role)[1]
        if not default.is_file():
            raise ConfigError(f"no {option} given and no default {role} key {default} "
                              f"(make one with `edgesdk keys generate --role {role}` or pass {option})")
        paths = (default,)
    for path in paths:
        load_public_key(path)  # KeyFileError: "<path>: not an Ed25519 public key"
    return paths


def _copy_names(paths: tuple[Path, ...], stem: str) -> list[str]:
    return [f"{stem}.pub" if len(paths) == 1 else f"{stem}-{i}.pub" for i in range(1, len(paths) + 1)]


def provision_device(req: ProvisionRequest) -> ProvisionedDevice:
    """Write OUT/agent.yaml (+ password, CA, keys, trust root), then add the device to the password
    file: a failure on the way leaves no credential behind that no agent config knows about."""
    device_id = check_device_username(req.device_id)
    try:
        fleet = check_id(req.fleet, "fleet")
    except EdgeError as exc:
        raise ConfigError(str(exc)) from None
    labels = _check_labels(req.labels)
    settings = load_broker_settings(req.broker_dir)
    paths = broker_paths(req.broker_dir)
    broker_url = req.broker_url or settings["device_url"]
    if not broker_url.startswith(("mqtt://", "mqtts://")):
        raise ConfigError(f"--broker-url {broker_url!r}: must start with mqtt:// or mqtts://")
    tls = broker_url.startswith("mqtts://")
    if tls and not paths["ca_cert"].is_file():
        raise ConfigError(f"--broker-dir {req.broker_dir}: no {CA_NAME} for an mqtts:// broker")
    release = _keys(req.release_keys, "release", "--release-key")
    fleet_keys = _keys(req.fleet_keys, "fleet", "--fleet-key")
    if req.trust_root is not None:
        _check_trust_root(Path(req.trust_root))
    out = Path(req.out)
    check_output_folder(out, "--out")
    config_path, password_path = out / CONFIG_NAME, out / PASSWORD_NAME
    existing = read_password_file(paths["passwd"])
    if not req.force and config_path.exists():
        raise ConfigError(f"{config_path} already exists (pass --force to replace it and the device's password)")
    if not req.force and device_id in existing:
        raise ConfigError(f"device {device_id!r} already has broker credentials (pass --force to replace them)")

    password = new_password()
    release_names, fleet_names = _copy_names(release, "release"), _copy_names(fleet_keys, "fleet")
    config: dict = {"device_id": device_id, "fleet": fleet, "broker": broker_url}
    if tls:
        config["tls"] = {"ca": CA_NAME}
    config.update({"username": device_id, "password_file": PASSWORD_NAME,
                   "trusted_keys": release_names, "fleet_keys": fleet_names})
    if req.trust_root is not None:
        config["trust_root"] = TRUST_ROOT_NAME
    config["labels"] = labels
    config["data_dir"] = req.data_dir
    header = (f"# edge-agent config for device {device_id}, written by `edgesdk devices provision`.\n"
              f"# Copy this whole folder to the device (e.g. /etc/edge-agent/); paths are relative to it.\n")
    with map_os_errors(f"write {out}"):
        out.mkdir(parents=True, exist_ok=True)
        if tls:
            shutil.copyfile(paths["ca_cert"], out / CA_NAME)
        for src, name in zip(release + fleet_keys, release_names + fleet_names):
            shutil.copyfile(src, out / name)
        if req.trust_root is not None:
            shutil.copyfile(req.trust_root, out / TRUST_ROOT_NAME)
        write_text_atomic(password_path, password + "\n", 0o600)
        write_text_atomic(config_path, header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False),
                          0o644)
    set_password(paths["passwd"], device_id, password)
    return ProvisionedDevice(device_id, broker_url, config_path, password_path, password,
                             replaced=device_id in existing)


def _check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"label {key!r}={value!r}: keys and values must be text")
        try:
            check_id(key, "label key")
        except EdgeError as exc:
            raise ConfigError(str(exc)) from None
        if any(c in value for c in "\r\n\0") or len(value) > 256:
            raise ConfigError(f"label {key}: the value must be one line of at most 256 characters")
        checked[key] = value
    return checked


def parse_labels(items: list[str]) -> dict[str, str]:
    """``["site=berlin", "line=3"]`` -> mapping; ConfigError for an item without '='."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label {item!r}: expected key=value")
        labels[key] = value
    return _check_labels(labels)


def _check_trust_root(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"--trust-root {path}: no such file")
    try:
        with map_os_errors(f"read {path}"):
            data = json.loads(path.read_bytes())
    except ValueError:
        raise ConfigError(f"--trust-root {path}: not JSON (expected a signed root.json)") from None
    if not isinstance(data, dict) or "signed" not in data or "signatures" not in data:
        raise ConfigError(f"--trust-root {path}: not a signed trust root (no 'signed'/'signatures')")


def reload_broker(pid: int) -> None:
    """SIGHUP: Mosquitto re-reads its password file and ACL (new devices can connect)."""
    if pid <= 0:
        raise ConfigError(f"--reload-pid {pid}: not a process id")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ConfigError(f"--reload-pid {pid}: no such process") from None
    except PermissionError:
        raise ConfigError(f"--reload-pid {pid}: not allowed to signal it (run as its user or root)") from None
