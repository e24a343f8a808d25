"""The broker policy that ships with edgesdk: Mosquitto config, ACL, password file and TLS files.

`write_broker_config(BrokerSetup(...))` fills one folder with everything `mosquitto -c
DIR/mosquitto.conf` needs (DESIGN §7): a listener with TLS (a CA and a server certificate made
here), ``allow_anonymous false``, a password file in Mosquitto's own ``$7$`` format, and the ACL
below, plus one ``NAME.env`` file per service identity so host tools need nothing else.
`edgesdk devices provision` (edgesdk.fleet.provisioning) adds devices to the same password file.

The ACL is data (`DEVICE_RULES`, `SERVICE_RULES`): `render_acl` writes it and docs/protocol.md
quotes it, so the rules a reader sees are the rules the broker enforces.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
import pwd
import re
import secrets
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgesdk.atomicfile import check_output_folder, write_bytes_atomic, write_text_atomic
from edgesdk.broker import DEFAULT_MAX_PACKET_SIZE, MIN_MAX_PACKET_SIZE, MQTT_MAX_PACKET_SIZE
from edgesdk.errors import ConfigError, EdgeError, map_os_errors
from edgesdk.fleet.certificates import (cert_hosts, cert_pem, create_ca, issue_server_cert, issued_by, key_pem,
                                       load_cert, load_key, parse_ip)
from edgesdk.fleet.mosquitto_passwd import (check_password, hash_password, new_password, read_password_file,
                                            write_password_file)
from edgesdk.protocol import ROOT, SHARE_GROUP, check_id

FLEET_SERVICE = "fleet-service"  # repository, rollout controller, deploys, telemetry collector
OPERATOR = "operator"  # a person's host tools: watch telemetry, deploy, roll back, publish trust roots
SERVICE_IDENTITIES = (FLEET_SERVICE, OPERATOR)
SHARE_GROUP_VAR = "EDGESDK_SHARE_GROUP"  # the repository's secret shared-subscription group (see below)

DEFAULT_TLS_PORT = 8883
DEFAULT_PLAIN_PORT = 1883
CONFIG_NAME = "mosquitto.conf"
PASSWORD_NAME = "passwd"
ACL_NAME = "acl"
SETTINGS_NAME = "broker.json"  # what provisioning needs to know: URL for devices, TLS or not
CA_CERT_NAME, CA_KEY_NAME = "ca.crt", "ca.key"
SERVER_CERT_NAME, SERVER_KEY_NAME = "server.crt", "server.key"
DATA_NAME = "data"
RENEW_BEFORE_DAYS = 30  # a re-run re-issues a server certificate that expires sooner than this

_DNS_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


# -- the ACL, as data -------------------------------------------------------------------------
class Access(enum.Enum):
    """Mosquitto ACL access words. Mosquitto checks `read` both at SUBSCRIBE and per delivered message."""

    READ = "read"
    WRITE = "write"
    READWRITE = "readwrite"


@dataclass(frozen=True)
class AclRule:
    access: Access
    topic: str
    why: str


def fleet_topic(*levels: str) -> str:
    """An ACL topic under every fleet's root: ``edgesdk/v1/+/<levels>``."""
    return "/".join((ROOT, "+", *levels))


# `pattern` lines apply to every client. %u is the client's *username* (its authenticated device
# id), not %c (its client id): the client id is whatever the client sends, so with %c a device
# authenticated as A could connect with client id B and read B's desired statements and blocks
# and write B's state. Devices connect with username = client id = device id, and provisioning
# refuses the service identities' names as device ids.
DEVICE_USER = "%u"
DEVICE_RULES: tuple[AclRule, ...] = (
    AclRule(Access.WRITE, fleet_topic("devices", DEVICE_USER, "state"), "its retained state and Last Will"),
    AclRule(Access.WRITE, fleet_topic("devices", DEVICE_USER, "events"), "its install events"),
    AclRule(Access.WRITE, fleet_topic("devices", DEVICE_USER, "telemetry"), "its telemetry windows"),
    AclRule(Access.WRITE, fleet_topic("packages", "+", "get"),
            "block requests (write only: reading them is the repository's job)"),
    AclRule(Access.READ, fleet_topic("devices", DEVICE_USER, "desired"), "its signed deployment statement"),
    AclRule(Access.READ, fleet_topic("devices", DEVICE_USER, "desired", "#"), "one statement per model name"),
    AclRule(Access.READ, fleet_topic("devices", DEVICE_USER, "blocks"), "block responses for its own requests"),
    AclRule(Access.READ, fleet_topic("trust", "#"), "signed trust-root updates (read only)"),
)

# `user` sections. Only fleet-service may read block requests (so no device can join the
# repository's shared subscription and answer other devices) and write block responses.
# Mosquitto 2.0's acl_file grants every SUBSCRIBE (SUBACK 0x01) and checks `read` on each message
# it delivers. A device that joins the repository's share group therefore reads nothing, but the
# requests the broker hands to its member are dropped: with the well-known group name a device
# could silently swallow half of all block requests. So `write_broker_config` gives the fleet
# service a random group name (EDGESDK_SHARE_GROUP in fleet-service.env) that devices never see.
SERVICE_RULES: Mapping[str, tuple[AclRule, ...]] = {
    FLEET_SERVICE: (
        AclRule(Access.READWRITE, f"{ROOT}/#",
                "repository (block requests in, blocks out), deployments, trust roots, collector"),
    ),
    OPERATOR: tuple(
        [AclRule(Access.READ, fleet_topic("devices", "+", leaf), f"every device's {leaf}")
         for leaf in ("state", "events", "telemetry")]
        + [AclRule(Access.READWRITE, fleet_topic("devices", "+", "desired"), "deploy and roll back"),
           AclRule(Access.READWRITE, fleet_topic("devices", "+", "desired", "#"), "deploy one model by name"),
           AclRule(Access.READWRITE, fleet_topic("trust", "#"), "publish signed trust-root updates")]
    ),
}


def render_acl() -> str:
    """The ACL file's text (Mosquitto `acl_file` syntax)."""
    lines = ["# edgesdk broker ACL, written by `edgesdk broker config` from edgesdk.fleet.broker_policy.",
             "# Regenerate rather than edit. Nothing is allowed that is not listed here.",
             "#",
             "# Every client (devices): %u is the authenticated username = device id. Not %c: a client",
             "# chooses its own client id, so a device logged in as A could take B's id and B's topics.",
             ""]
    for rule in DEVICE_RULES:
        lines.append(f"# {rule.why}")
        lines.append(f"pattern {rule.access.value} {rule.topic}")
    for user, rules in SERVICE_RULES.items():
        lines += ["", f"user {user}"]
        for rule in rules:
            lines.append(f"# {rule.why}")
            lines.append(f"topic {rule.access.value} {rule.topic}")
    return "\n".join(lines) + "\n"


# -- env files ----------------------------------------------------------------------------------
def write_env_file(path: Path, values: Mapping[str, str]) -> None:
    """``KEY=value`` lines (shell-quoted) for ``set -a; . FILE``; mode 0600: it holds a password."""
    text = "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())
    with map_os_errors(f"write {path}"):
        write_text_atomic(path, text, 0o600)


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an env file written by `write_env_file`; {} when it does not exist."""
    if not path.exists():
        return {}
    with map_os_errors(f"read {path}"):
        text = path.read_text(encoding="utf-8")
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            parts = shlex.split(raw)
            values[key.strip()] = parts[0] if parts else ""
    return values


def default_hosts() -> tuple[str, ...]:
    """localhost, 127.0.0.1 and this machine's host name (when it is a valid DNS name)."""
    hosts = ["localhost", "127.0.0.1"]
    name = socket.gethostname()
    if name and _DNS_NAME.fullmatch(name) and name.lower() not in hosts:
        hosts.append(name)
    return tuple(hosts)


def _default_run_as() -> str | None:
    """Root starts Mosquitto, which then drops to the `mosquitto` user (its own default); anyone else
    runs it as themselves (the `user` setting has no effect then)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return "mosquitto"


@dataclass(frozen=True)
class BrokerSetup:
    """What `edgesdk broker config` was asked for; checked by `check()` before anything is written."""

    out: Path
    port: int | None = None  # None: 8883 with TLS, 1883 without
    hosts: tuple[str, ...] = field(default_factory=default_hosts)  # SANs; the first one goes into env files
    tls: bool = True
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    bind: str | None = None  # listener address; None: every interface
    run_as: str | None = field(default_factory=_default_run_as)  # Mosquitto's `user` setting
    log_file: Path | None = None  # None: Mosquitto logs to stderr
    force: bool = False  # new CA, server certificate and service passwords (device passwords stay)

    @property
    def listen_port(self) -> int:
        return self.port if self.port is not None else (DEFAULT_TLS_PORT if self.tls else DEFAULT_PLAIN_PORT)

    @property
    def scheme(self) -> str:
        return "mqtts" if self.tls else "mqtt"

    def url(self, host: str) -> str:
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{self.listen_port}"

    def check(self) -> None:
        """ConfigError naming the first bad value (nothing is written before this passes)."""
        if not 1 <= self.listen_port <= 65535:
            raise ConfigError(f"--port {self.listen_port}: must be 1..65535")
        if not self.hosts:
            raise ConfigError("--host: give at least one host name or IP address")
        for host in self.hosts:
            if parse_ip(host) is None and not _DNS_NAME.fullmatch(host):
                raise ConfigError(f"--host {host!r}: not a host name or IP address")
        if self.bind is not None and parse_ip(self.bind) is None and not _DNS_NAME.fullmatch(self.bind):
            raise ConfigError(f"--bind {self.bind!r}: not a host name or IP address")
        if not MIN_MAX_PACKET_SIZE <= self.max_packet_size <= MQTT_MAX_PACKET_SIZE:
            raise ConfigError(f"--max-packet-size {self.max_packet_size}: must be "
                              f"{MIN_MAX_PACKET_SIZE}..{MQTT_MAX_PACKET_SIZE} bytes")
        if self.run_as is not None:
            try:
                pwd.getpwnam(self.run_as)
            except KeyError:
                raise ConfigError(f"--run-as {self.run_as!r}: no such user on this machine") from None
        # Mosquitto splits config lines on spaces: a path with one would be cut short.
        for what, path in (("--out", self.out), ("--log-file", self.log_file)):
            if path is not None and any(c.isspace() for c in str(Path(path).absolute())):
                raise ConfigError(f"{what} {path}: Mosquitto cannot read a path with spaces in its config")


@dataclass(frozen=True)
class Identity:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class BrokerFiles:
    """Where `write_broker_config` put everything, and what it kept from an earlier run."""

    folder: Path
    config: Path
    password_file: Path
    acl_file: Path
    ca_cert: Path | None
    server_cert: Path | None
    env_files: Mapping[str, Path]
    identities: Mapping[str, Identity]
    url: str  # for host tools (first --host)
    device_url: str  # for devices (first host that is not a loopback name)
    kept: tuple[str, ...] = ()  # e.g. ("CA", "fleet-service")

    @property
    def start_command(self) -> str:
        return f"mosquitto -c {shlex.quote(str(self.config))}"


def broker_paths(folder: Path) -> dict[str, Path]:
    folder = Path(folder).absolute()
    return {"config": folder / CONFIG_NAME, "passwd": folder / PASSWORD_NAME, "acl": folder / ACL_NAME,
            "settings": folder / SETTINGS_NAME, "ca_cert": folder / CA_CERT_NAME, "ca_key": folder / CA_KEY_NAME,
            "server_cert": folder / SERVER_CERT_NAME, "server_key": folder / SERVER_KEY_NAME,
            "data": folder / DATA_NAME}


def render_mosquitto_conf(setup: BrokerSetup, folder: Path) -> str:
    """The mosquitto.conf text for ``setup`` with every file inside ``folder``."""
    p = broker_paths(folder)
    lines = ["# Mosquitto 2.0 config written by `edgesdk broker config`. Regenerate rather than edit:",
             "# a re-run keeps the CA, the server certificate (same hosts) and every identity.",
             "per_listener_settings false"]
    if setup.run_as is not None:
        lines.append(f"user {setup.run_as}  # started as root, Mosquitto drops to this user")
    lines += [f"listener {setup.listen_port}" + (f" {setup.bind}" if setup.bind else ""),
              "allow_anonymous false",
              f"password_file {p['passwd']}",
              f"acl_file {p['acl']}"]
    if setup.tls:
        lines += [f"cafile {p['ca_cert']}", f"certfile {p['server_cert']}", f"keyfile {p['server_key']}",
                  "tls_version tlsv1.2  # the minimum; TLS 1.3 is used when the client has it"]
    lines += [
        "persistence true  # retained desired/state and device sessions survive restarts",
        f"persistence_location {p['data']}/",
        "max_queued_messages 100000  # the default 1000 silently drops QoS 1 messages to slow subscribers",
        "max_inflight_messages 0  # no limit; each device's fetch window bounds it",
        f"max_packet_size {setup.max_packet_size}  # one block + headroom; bigger packets disconnect the client",
        "set_tcp_nodelay true  # small request/reply round trips: Nagle + delayed ACK add ~40 ms per block request",
    ]
    if setup.log_file is not None:
        lines.append(f"log_dest file {Path(setup.log_file).absolute()}")
    else:
        lines.append("log_dest stderr")
    lines += ["log_type error", "log_type warning", "log_type notice", "log_type information"]
    # Mosquitto's parser takes a trailing comment as part of a value: keep comments on their own lines.
    out: list[str] = []
    for line in lines:
        value, sep, comment = line.partition("  # ")
        if sep:
            out.append(f"# {comment}")
        out.append(value)
    return "\n".join(out) + "\n"


def write_broker_config(setup: BrokerSetup) -> BrokerFiles:
    """Fill ``setup.out`` with a Mosquitto config, ACL, password file, TLS files and env files.

    Re-running keeps the CA, a server certificate that still names the same hosts, every service
    identity whose env file still matches the password file, and every device (unless
    ``setup.force``, which makes a new CA and new service passwords; devices are always kept).
    """
    setup.check()
    check_output_folder(setup.out, "--out")
    folder = Path(setup.out).absolute()
    p = broker_paths(folder)
    kept: list[str] = []
    with map_os_errors(f"create {folder}"):
        folder.mkdir(parents=True, exist_ok=True)
        p["data"].mkdir(exist_ok=True)
    ca_cert_path = server_cert_path = None
    if setup.tls:
        kept += _write_tls_files(setup, p)
        ca_cert_path, server_cert_path = p["ca_cert"], p["server_cert"]

    entries = read_password_file(p["passwd"])
    host_url = setup.url(setup.hosts[0])
    loopback = {"localhost", "127.0.0.1", "::1"}
    device_url = setup.url(next((h for h in setup.hosts if h.lower() not in loopback), setup.hosts[0]))
    identities: dict[str, Identity] = {}
    env_files: dict[str, Path] = {}
    for name in SERVICE_IDENTITIES:
        env_path = folder / f"{name}.env"
        old = read_env_file(env_path).get("EDGESDK_BROKER_PASSWORD")
        if not setup.force and old and name in entries and check_password(entries[name], old):
            password = old
            kept.append(name)
        else:
            password = new_password()
            entries[name] = hash_password(password)
        identities[name] = Identity(name, password)
        env = {"EDGESDK_BROKER": host_url, "EDGESDK_BROKER_USERNAME": name, "EDGESDK_BROKER_PASSWORD": password}
        if setup.tls:
            env["EDGESDK_BROKER_CA"] = str(p["ca_cert"])
        if name == FLEET_SERVICE:
            env[SHARE_GROUP_VAR] = _share_group(read_env_file(env_path).get(SHARE_GROUP_VAR), setup.force)
        write_env_file(env_path, env)
        env_files[name] = env_path

    write_password_file(p["passwd"], entries)
    with map_os_errors(f"write {folder}"):
        write_text_atomic(p["acl"], render_acl(), 0o644)
        write_text_atomic(p["config"], render_mosquitto_conf(setup, folder), 0o644)
        write_text_atomic(p["settings"], json.dumps({
            "url": host_url, "device_url": device_url, "tls": setup.tls, "port": setup.listen_port,
            "hosts": list(setup.hosts), "max_packet_size": setup.max_packet_size}, indent=1) + "\n", 0o644)
    _hand_over(setup, folder, p)
    return BrokerFiles(folder, p["config"], p["passwd"], p["acl"], ca_cert_path, server_cert_path, env_files,
                       identities, host_url, device_url, tuple(kept))


def _write_tls_files(setup: BrokerSetup, p: Mapping[str, Path]) -> list[str]:
    kept: list[str] = []
    if not setup.force and p["ca_key"].exists() and p["ca_cert"].exists():
        ca_key, ca_cert = load_key(p["ca_key"]), load_cert(p["ca_cert"])
        kept.append("CA")
    else:
        ca_key, ca_cert = create_ca(f"edgesdk broker CA ({setup.hosts[0]})")
        with map_os_errors(f"write {p['ca_key']}"):
            write_bytes_atomic(p["ca_key"], key_pem(ca_key), 0o600)
            write_bytes_atomic(p["ca_cert"], cert_pem(ca_cert), 0o644)
    wanted = {h.lower() for h in setup.hosts}
    if p["server_cert"].exists() and p["server_key"].exists() and "CA" in kept:
        cert = load_cert(p["server_cert"])
        fresh = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=RENEW_BEFORE_DAYS)
        if cert_hosts(cert) == wanted and issued_by(cert, ca_cert) and fresh:
            return kept + ["server certificate"]
    key, cert = issue_server_cert(ca_key, ca_cert, setup.hosts)
    with map_os_errors(f"write {p['server_key']}"):
        write_bytes_atomic(p["server_key"], key_pem(key), 0o600)
        write_bytes_atomic(p["server_cert"], cert_pem(cert), 0o644)
    return kept


def _hand_over(setup: BrokerSetup, folder: Path, p: Mapping[str, Path]) -> None:
    """When root writes for another `run_as` user: that user must read the password file, ACL and
    server key (also after SIGHUP, when Mosquitto has already dropped privileges) and write ``data/``."""
    if setup.run_as is None or os.geteuid() != 0:
        return
    user = pwd.getpwnam(setup.run_as)
    if user.pw_uid == 0:
        return
    with map_os_errors(f"hand {folder} over to {setup.run_as}"):
        os.chown(folder, 0, user.pw_gid)
        os.chmod(folder, 0o750)
        for key in ("passwd", "acl", "server_key", "server_cert", "ca_cert", "data"):
            if p[key].exists():
                os.chown(p[key], user.pw_uid, user.pw_gid)


def _share_group(old: str | None, force: bool) -> str:
    if old and not force:
        try:
            return check_id(old, "share group")
        except EdgeError:
            pass
    return f"{SHARE_GROUP}-{secrets.token_hex(8)}"


def load_broker_settings(folder: Path) -> dict:
    """broker.json of a folder written by `write_broker_config` (ConfigError when it is not one)."""
    path = broker_paths(folder)["settings"]
    if not path.is_file():
        raise ConfigError(f"--broker-dir {folder}: no {SETTINGS_NAME} (make it with `edgesdk broker config --out`)")
    try:
        with map_os_errors(f"read {path}"):
            data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ConfigError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("device_url"), str):
        raise ConfigError(f"{path}: missing 'device_url'")
    return data


def check_device_username(device_id: str) -> str:
    """A device id that may become a broker username: the protocol's id rule, and not a service name."""
    try:
        check_id(device_id, "device id")
    except EdgeError as exc:
        raise ConfigError(str(exc)) from None
    if device_id in SERVICE_IDENTITIES:
        raise ConfigError(f"device id {device_id!r} is reserved for the fleet service's own identity")
    return device_id
