"""The agent's configuration (agent.yaml), validated when it is loaded.

Every check is named and fails with one line naming the file and the key, e.g.
``/etc/edge-agent/agent.yaml: telemetry_interval_s: expected a number > 0, got 'abc'``.
Relative paths inside the file resolve against the file's own folder, so a config and the key
files beside it can be copied to another device as one folder. agent/data/agent.sample.yaml
documents every key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgesdk.errors import ConfigError, EdgeError
from edgesdk.profiles import TargetProfile, resolve_target
from edgesdk.protocol import ID_RULE, is_valid_id
from edgesdk.signing import load_public_key
from edgesdk.yamlfile import load_yaml_file

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_DATA_DIR = "/var/lib/edge-agent"

KEYS = ("device_id", "fleet", "broker", "tls", "username", "password", "password_file", "data_dir",
        "trusted_keys", "fleet_keys", "trust_root", "labels", "api", "telemetry_interval_s", "selection_budget_s", "target",
        "memory_budget_mb", "undeploy_grace_s", "spool_max_windows", "stall_timeout_s", "engine_cache_mb",
        "log_level")
TLS_KEYS = ("ca", "cert", "key")


@dataclass(frozen=True)
class TlsConfig:
    """Files for a TLS broker connection; ``ca`` None means the system's CA store."""

    ca: Path | None = None
    cert: Path | None = None  # client certificate (with ``key``), for brokers that require one
    key: Path | None = None


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    trusted_keys: tuple[Path, ...]  # release keys: packages must be signed by one of them
    fleet_keys: tuple[Path, ...] = ()  # fleet keys: deployment statements must be signed by one
    trust_root: Path | None = None  # a TUF root naming release and fleet keys (replaces both lists)
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    fleet: str = "default"
    broker: str = "mqtt://127.0.0.1:1883"
    tls: TlsConfig | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # from password_file when given
    password_file: Path | None = None
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    api: str = "127.0.0.1:8700"
    telemetry_interval_s: float = 60.0
    selection_budget_s: float = 30.0
    target: str | None = None  # built-in name or resolved profile path; None: detect from hardware
    # Resident memory all active models may take together (MB); None: the target profile's
    # budgets.max_memory_mb (no limit without a profile).
    memory_budget_mb: float | None = None
    undeploy_grace_s: float = 24 * 3600.0  # an undeployed model's files stay this long
    spool_max_windows: int = 10000
    stall_timeout_s: float = 60.0
    # Disk (MB) for compiled engines (OpenVINO blobs, TensorRT engines) under data_dir/engines, so
    # a restart or re-activation skips the compile; the least recently used versions' engines go
    # first, the active ones' never. 0: no engine cache (and the folder is emptied).
    engine_cache_mb: float = 2048.0
    log_level: str = "info"
    source: str = ""  # the file it was loaded from
    # Loaded once at load time so a bad key fails there; not part of equality or repr.
    public_keys: tuple[Ed25519PublicKey, ...] = field(default=(), compare=False, repr=False)
    fleet_public_keys: tuple[Ed25519PublicKey, ...] = field(default=(), compare=False, repr=False)
    trust_root_bytes: bytes | None = field(default=None, compare=False, repr=False)
    target_profile: TargetProfile | None = field(default=None, compare=False, repr=False)

    @property
    def broker_host(self) -> str:
        return urlsplit(self.broker).hostname or ""

    @property
    def broker_port(self) -> int:
        parts = urlsplit(self.broker)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def broker_tls(self) -> bool:
        return self.broker.startswith("mqtts://")

    @property
    def api_host(self) -> str:
        return _split_host_port(self.api)[0]

    @property
    def api_port(self) -> int:
        return _split_host_port(self.api)[1]


def load_config(path: str | Path) -> AgentConfig:
    """Read, validate and build the agent config; raise ConfigError with one line otherwise."""
    path = Path(path)
    data = load_yaml_file(path, "agent config")
    return parse_config(data, str(path), path.resolve().parent)


def parse_config(data: Any, source: str, base_dir: Path) -> AgentConfig:
    """Validate parsed YAML; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the agent config must be a YAML mapping of keys")
    check = _Checker(source, base_dir)
    for key in data:
        if key not in KEYS:
            raise check.fail(str(key), f"unknown key (allowed: {', '.join(sorted(KEYS))})")

    if "device_id" not in data:
        raise check.fail("device_id", "missing required key")
    device_id = check.mqtt_id("device_id", data["device_id"])
    fleet = check.mqtt_id("fleet", data.get("fleet", "default"))

    broker = check.string("broker", data.get("broker", "mqtt://127.0.0.1:1883"))
    _check_broker(check, broker)
    tls = _parse_tls(check, data.get("tls"), broker)

    username = check.optional_string("username", data.get("username"))
    password = check.optional_string("password", data.get("password"))
    password_file = None
    if data.get("password_file") is not None:
        if password is not None:
            raise check.fail("password_file", "give either password or password_file, not both")
        password_file = check.existing_file("password_file", data["password_file"])
        try:
            password = password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise check.fail("password_file", f"cannot read {password_file}: {exc}") from None

    data_dir = check.path("data_dir", data.get("data_dir", DEFAULT_DATA_DIR))

    trust_root, root_bytes = None, None
    if data.get("trust_root") is not None:
        trust_root = check.existing_file("trust_root", data["trust_root"])
        root_bytes = _load_trust_root(check, trust_root)
    key_paths, public_keys = check.key_list("trusted_keys", data.get("trusted_keys"), required=root_bytes is None,
                                            why="every package is verified against these")
    fleet_paths, fleet_public = check.key_list("fleet_keys", data.get("fleet_keys"), required=root_bytes is None,
                                               why="every deployment statement is verified against these")
    labels = _parse_labels(check, data.get("labels"))

    api = check.string("api", data.get("api", "127.0.0.1:8700"))
    try:
        _split_host_port(api)
    except ValueError as exc:
        raise check.fail("api", f"{exc}, got {api!r}") from None

    target, profile = None, None
    if data.get("target") is not None:
        target = check.string("target", data["target"])
        if target.endswith((".yaml", ".yml")) or (base_dir / target).is_file():
            target = str(check.path("target", target))
        try:
            profile = resolve_target(target)
        except ConfigError as exc:
            raise check.fail("target", str(exc)) from None

    log_level = check.string("log_level", data.get("log_level", "info")).lower()
    if log_level not in LOG_LEVELS:
        raise check.fail("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {log_level!r}")

    return AgentConfig(
        device_id=device_id, fleet=fleet, broker=broker, tls=tls, username=username,
        password=password, password_file=password_file, data_dir=data_dir,
        trusted_keys=tuple(key_paths), fleet_keys=tuple(fleet_paths), trust_root=trust_root, labels=labels,
        api=api,
        telemetry_interval_s=check.positive("telemetry_interval_s", data.get("telemetry_interval_s", 60)),
        selection_budget_s=check.positive("selection_budget_s", data.get("selection_budget_s", 30)),
        target=target,
        memory_budget_mb=(None if data.get("memory_budget_mb") is None
                          else check.positive("memory_budget_mb", data["memory_budget_mb"])),
        undeploy_grace_s=check.non_negative("undeploy_grace_s", data.get("undeploy_grace_s", 24 * 3600)),
        spool_max_windows=check.count("spool_max_windows", data.get("spool_max_windows", 10000)),
        stall_timeout_s=check.positive("stall_timeout_s", data.get("stall_timeout_s", 60)),
        engine_cache_mb=check.non_negative("engine_cache_mb", data.get("engine_cache_mb", 2048)),
        log_level=log_level, source=source, public_keys=tuple(public_keys), target_profile=profile,
        fleet_public_keys=tuple(fleet_public), trust_root_bytes=root_bytes,
    )


def _load_trust_root(check: _Checker, path: Path) -> bytes:
    from edgesdk.trustroot import TrustRoot

    try:
        raw = path.read_bytes()
        TrustRoot.from_bytes(raw, str(path))
    except OSError as exc:
        raise check.fail("trust_root", f"cannot read {path}: {exc.strerror}") from None
    except EdgeError as exc:
        raise check.fail("trust_root", str(exc)) from None
    return raw


def _parse_labels(check: _Checker, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise check.fail("labels", f"expected a mapping of label to value, got {value!r}")
    labels = {}
    for key, item in value.items():
        if not is_valid_id(key):
            raise check.fail(f"labels.{key}", f"a label name is {ID_RULE}")
        if isinstance(item, bool) or not isinstance(item, (str, int, float)) or len(str(item)) > 128:
            raise check.fail(f"labels.{key}", f"expected a short text value, got {item!r}")
        labels[key] = str(item)
    return labels


def _check_broker(check: _Checker, broker: str) -> None:
    if not broker.startswith(("mqtt://", "mqtts://")):
        raise check.fail("broker", f"must start with mqtt:// or mqtts://, got {broker!r}")
    try:
        parts = urlsplit(broker)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise check.fail("broker", f"bad URL {broker!r} ({exc})") from None
    if not parts.hostname:
        raise check.fail("broker", f"no host in {broker!r}")
    if parts.path not in ("", "/") or parts.query or parts.username or port == 0:
        raise check.fail("broker", f"expected mqtt[s]://host[:port] only, got {broker!r}")


def _parse_tls(check: _Checker, value: Any, broker: str) -> TlsConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise check.fail("tls", f"expected a mapping with {', '.join(TLS_KEYS)}, got {value!r}")
    if not broker.startswith("mqtts://"):
        raise check.fail("tls", f"only allowed with an mqtts:// broker (broker is {broker!r})")
    for key in value:
        if key not in TLS_KEYS:
            raise check.fail(f"tls.{key}", f"unknown key (allowed: {', '.join(TLS_KEYS)})")
    files = {k: check.existing_file(f"tls.{k}", value[k]) if value.get(k) is not None else None
             for k in TLS_KEYS}
    if (files["cert"] is None) != (files["key"] is None):
        missing = "tls.key" if files["key"] is None else "tls.cert"
        raise check.fail(missing, "a client certificate needs both tls.cert and tls.key")
    return TlsConfig(**files)


def _split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:8700
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected host:port with a port 0-65535")
    return host, int(port)


@dataclass(frozen=True)
class _Checker:
    """Named checks of single values; each failure names the file and the key."""

    source: str
    base_dir: Path

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {why}")

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def optional_string(self, key: str, value: Any) -> str | None:
        return None if value is None else self.string(key, value)

    def mqtt_id(self, key: str, value: Any) -> str:
        if not is_valid_id(value):
            raise self.fail(key, f"expected {ID_RULE} (it is an MQTT client id, a broker user and a "
                                 f"topic level), got {value!r}")
        return value

    def key_list(self, key: str, value: Any, required: bool, why: str) -> tuple[list[Path], list[Ed25519PublicKey]]:
        """Public key files (paths, loaded keys); ``required`` refuses a missing or empty list."""
        if value is None:
            if required:
                raise self.fail(key, f"missing required key ({why}; or give trust_root)")
            return [], []
        if not isinstance(value, list) or (required and not value):
            raise self.fail(key, f"expected a non-empty list of public key files, got {value!r}")
        paths, keys = [], []
        for i, entry in enumerate(value):
            path = self.existing_file(f"{key}[{i}]", entry)
            try:
                keys.append(load_public_key(path))
            except EdgeError as exc:  # KeyFileError: "<file>: not an Ed25519 public key ..."
                raise self.fail(f"{key}[{i}]", str(exc)) from None
            paths.append(path)
        return paths, keys

    def _number(self, key: str, value: Any, test: Callable[[float], bool], what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise self.fail(key, f"expected {what}, got {value!r}")
        return value

    def positive(self, key: str, value: Any) -> float:
        return float(self._number(key, value, lambda v: v > 0 and v != float("inf"), "a number > 0"))

    def non_negative(self, key: str, value: Any) -> float:
        return float(self._number(key, value, lambda v: v >= 0 and v != float("inf"), "a number >= 0"))

    def count(self, key: str, value: Any) -> int:
        if isinstance(value, float) or isinstance(value, bool):
            raise self.fail(key, f"expected an integer >= 1, got {value!r}")
        return int(self._number(key, value, lambda v: v >= 1, "an integer >= 1"))

    def path(self, key: str, value: Any) -> Path:
        path = Path(self.string(key, value)).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def existing_file(self, key: str, value: Any) -> Path:
        path = self.path(key, value)
        if not path.is_file():
            raise self.fail(key, f"file not found: {path}")
        return path
