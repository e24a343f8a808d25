"""The MQTT protocol v1 shared by the fleet service and the agent: topics, messages, block framing.

Light on purpose (stdlib only): the device agent imports it. docs/protocol.md is the reference;
every message here validates what it reads, so a malformed message fails with one
`ProtocolError` line naming the topic and the field, never a KeyError deep in a handler.
Unknown JSON fields are ignored (a newer peer may add fields); missing ones are errors unless
the field has a default.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import struct
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgesdk.errors import ProtocolError

ROOT = "edgesdk/v1"
SHARE_GROUP = "edgesdk-repo"
# 256 KiB blocks. Measured on loopback Mosquitto (docs/protocol.md): speed follows the bytes in
# flight (window x block) more than the block size; 256 KiB x 8 = 2 MiB per downloading device
# in the broker's queues ran at ~49 MiB/s, far above device links, and a lost or corrupt block
# costs 4x less to re-fetch than with 1 MiB blocks.
BLOCK_SIZE = 256 * 1024
MIN_BLOCK_SIZE = 4 * 1024
MAX_BLOCK_SIZE = 16 * 1024 * 1024
MAX_BLOCKS_PER_REQUEST = 64  # protocol cap; a repository may serve fewer (it answers BAD_REQUEST)
MAX_JSON_BYTES = 1024 * 1024
MAX_CORRELATION_BYTES = 64
DIGEST_SIZE = 32

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_name(value: str, what: str) -> str:
    """A fleet or device id is one topic level: letters, digits, '.', '_', '-', ':' (no '/', '+', '#')."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ProtocolError(f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_', '-', ':'")
    return value


def is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def check_package_id(value: str) -> str:
    if not is_sha256_hex(value):
        raise ProtocolError(f"invalid package id {value!r}: expected 64 lowercase hex (sha256)")
    return value


# -- topics ------------------------------------------------------------------------------------
def fleet_root(fleet: str) -> str:
    return f"{ROOT}/{check_name(fleet, 'fleet')}"


def _device(fleet: str, device_id: str, leaf: str) -> str:
    return f"{fleet_root(fleet)}/devices/{check_name(device_id, 'device id')}/{leaf}"


def device_state(fleet: str, device_id: str) -> str:
    """Retained; DeviceState, with an 'offline' Last Will."""
    return _device(fleet, device_id, "state")


def device_desired(fleet: str, device_id: str) -> str:
    """Retained, QoS 1; DesiredDeployment, written only by the fleet service."""
    return _device(fleet, device_id, "desired")


def device_events(fleet: str, device_id: str) -> str:
    """QoS 1; InstallEvent."""
    return _device(fleet, device_id, "events")


def device_telemetry(fleet: str, device_id: str) -> str:
    """QoS 1; TelemetryWindow."""
    return _device(fleet, device_id, "telemetry")


def device_blocks(fleet: str, device_id: str) -> str:
    """The device's response topic for block requests (inside its own subtree, for `%c` ACLs)."""
    return _device(fleet, device_id, "blocks")


def devices_filter(fleet: str, leaf: str) -> str:
    """Subscription filter over every device, e.g. devices_filter(f, 'telemetry')."""
    return f"{fleet_root(fleet)}/devices/+/{leaf}"


def package_get(fleet: str, package_id: str) -> str:
    """Where a device publishes its BlockRequest for one package."""
    return f"{fleet_root(fleet)}/packages/{check_package_id(package_id)}/get"


def package_get_shared(fleet: str, group: str = SHARE_GROUP) -> str:
    """The repository's MQTT 5 shared subscription: each request goes to one of the servers."""
    return f"$share/{check_name(group, 'share group')}/{fleet_root(fleet)}/packages/+/get"


def parse_package_get(fleet: str, topic: str) -> str | None:
    """The package id in a `packages/{id}/get` topic of this fleet, or None (id not validated)."""
    prefix, suffix = f"{fleet_root(fleet)}/packages/", "/get"
    if topic.startswith(prefix) and topic.endswith(suffix):
        middle = topic[len(prefix):-len(suffix)]
        return middle if "/" not in middle else None
    return None


def parse_device_topic(fleet: str, topic: str) -> tuple[str, str] | None:
    """(device id, leaf) for `devices/{id}/{leaf}` topics of this fleet, else None."""
    prefix = f"{fleet_root(fleet)}/devices/"
    if not topic.startswith(prefix):
        return None
    parts = topic[len(prefix):].split("/")
    if len(parts) != 2 or not _NAME.fullmatch(parts[0]):
        return None
    return parts[0], parts[1]


# -- JSON messages -----------------------------------------------------------------------------
class InstallEventKind(enum.Enum):
    """Install lifecycle steps an agent reports on `devices/{id}/events` (docs/protocol.md §events)."""

    DOWNLOADING = "downloading"  #: transfer started or progressed (``progress`` 0..1)
    DOWNLOADED = "downloaded"  #: all blocks verified, whole-file sha256 matches
    VERIFIED = "verified"  #: package signature checked against the device's trusted keys
    EXTRACTED = "extracted"  #: safely extracted into versions/{package_id}/
    SELECTED = "selected"  #: variant x provider chosen; ``table`` holds the benchmark rows
    HEALTH_CHECKED = "health_checked"  #: the winner passed the health check on reference inputs
    ACTIVATED = "activated"  #: the new version is the active one and serving
    FAILED = "failed"  #: install stopped; ``reason`` says why, the previous version stays active
    ROLLED_BACK = "rolled_back"  #: the device went back to the previous version (``reason``)


_M = TypeVar("_M", bound="_Message")


class _Message:
    """JSON (de)serialisation driven by the dataclass fields' type hints."""

    def to_json(self) -> bytes:
        return json.dumps(_plain(dataclasses.asdict(self)), sort_keys=True,  # type: ignore[call-overload]
                          separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls: type[_M], raw: bytes | str, topic: str = "") -> _M:
        where = topic or cls.__name__
        if len(raw) > MAX_JSON_BYTES:
            raise ProtocolError(f"{where}: message of {len(raw)} bytes exceeds {MAX_JSON_BYTES}")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls: type[_M], data: Any, where: str = "") -> _M:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected a JSON object")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ProtocolError(f"{where}: missing field '{f.name}'")
                continue
            values[f.name] = _coerce(data[f.name], hints[f.name], f"{where}: field '{f.name}'")
        message = cls(**values)
        message._check(where)
        return message

    def _check(self, where: str) -> None:
        """Cross-field checks beyond types; raise ProtocolError."""


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in hint)
            raise ProtocolError(f"{where}: {value!r} is not one of {allowed}") from None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin in (dict, list, tuple):
        if not isinstance(value, dict if origin is dict else list):
            raise ProtocolError(f"{where}: expected {'object' if origin is dict else 'array'}")
        if origin is tuple:
            return tuple(_coerce(v, args[0], where) for v in value)
        if origin is list:
            return [_coerce(v, args[0], where) for v in value]
        return {str(k): _coerce(v, args[1], where) for k, v in value.items()}
    if hint in (str, int, bool) and type(value) is hint:
        return value
    raise ProtocolError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")


@dataclass(frozen=True)
class DesiredDeployment(_Message):
    """`devices/{id}/desired` (retained): the package a device should run and how to fetch it."""

    package_id: str  # sha256 hex of the .edgepkg; the repository addresses packages by it
    name: str
    version: str
    target: str
    sha256: str  # whole-file sha256, checked after the last block
    size: int  # bytes of the .edgepkg; the agent never accepts more
    block_size: int
    blocks_digest: str  # sha256 of the concatenated raw per-block sha256 digests (the block index)
    rollout_id: str | None = None
    issued_at: float = 0.0  # unix time the fleet service wrote it

    @property
    def block_count(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    def _check(self, where: str) -> None:
        for name in ("package_id", "sha256", "blocks_digest"):
            if not is_sha256_hex(getattr(self, name)):
                raise ProtocolError(f"{where}: field '{name}' must be 64 lowercase hex")
        if self.size <= 0:
            raise ProtocolError(f"{where}: field 'size' must be positive")
        if not MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE:
            raise ProtocolError(f"{where}: field 'block_size' must be {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}")


@dataclass(frozen=True)
class DeviceState(_Message):
    """`devices/{id}/state` (retained; the Last Will publishes online=False)."""

    device_id: str
    online: bool
    agent_version: str = ""
    target: str | None = None  # profile name the device was configured with
    hardware: dict[str, Any] = field(default_factory=dict)  # arch, cpu, memory, accelerators found
    runtimes: dict[str, Any] = field(default_factory=dict)  # runtime -> {"version", "providers"}
    active_package: str | None = None
    active_variant: str | None = None
    provider: str | None = None
    updated_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InstallEvent(_Message):
    """`devices/{id}/events` (QoS 1): one step of an install."""

    kind: InstallEventKind
    package_id: str
    at: float  # unix time on the device
    rollout_id: str | None = None
    progress: float | None = None  # 0..1, for downloading
    reason: str | None = None  # for failed / rolled_back: one line
    table: list[dict[str, Any]] | None = None  # for selected: variant x provider benchmark rows
    extra: dict[str, Any] = field(default_factory=dict)

    def _check(self, where: str) -> None:
        if self.progress is not None and not 0.0 <= self.progress <= 1.0:
            raise ProtocolError(f"{where}: field 'progress' must be within 0..1")


@dataclass(frozen=True)
class TelemetryWindow(_Message):
    """`devices/{id}/telemetry` (QoS 1): latency and load over one window; ``seq`` orders them."""

    seq: int
    window_start: float  # unix time
    window_end: float
    count: int  # inference calls completed in the window
    errors: int
    p50_ms: float | None = None  # None when count == 0
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    histogram: dict[str, int] = field(default_factory=dict)  # bucket upper bound (ms, as text) -> count
    variant: str | None = None
    provider: str | None = None
    package_id: str | None = None
    cpu_percent: float | None = None
    rss_mb: float | None = None
    dropped_windows: int = 0  # windows lost to a full on-disk buffer before this one
    extra: dict[str, Any] = field(default_factory=dict)

    def _check(self, where: str) -> None:
        if self.count < 0 or self.errors < 0 or self.dropped_windows < 0:
            raise ProtocolError(f"{where}: counts must not be negative")
        if self.window_end < self.window_start:
            raise ProtocolError(f"{where}: window_end is before window_start")


@dataclass(frozen=True)
class BlockRequest(_Message):
    """Payload of `packages/{id}/get`: {"blocks": [...]} or {"index": true}, with MQTT 5
    ResponseTopic (the device's blocks topic) and CorrelationData (echoed)."""

    blocks: tuple[int, ...] = ()
    index: bool = False
    block_size: int | None = None  # the block size the device expects; a mismatch is BAD_REQUEST

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"index": True} if self.index else {"blocks": list(self.blocks)}
        if self.block_size is not None:
            data["block_size"] = self.block_size
        return json.dumps(data, separators=(",", ":")).encode()

    def _check(self, where: str) -> None:
        if self.index == bool(self.blocks):
            raise ProtocolError(f"{where}: ask for either 'blocks' or 'index', not both or neither")
        if len(self.blocks) > MAX_BLOCKS_PER_REQUEST:
            raise ProtocolError(f"{where}: more than {MAX_BLOCKS_PER_REQUEST} blocks in one request")
        if any(b < 0 or b >= INDEX_BLOCK for b in self.blocks):
            raise ProtocolError(f"{where}: block numbers must be within 0..{INDEX_BLOCK - 1}")
        if len(set(self.blocks)) != len(self.blocks):
            raise ProtocolError(f"{where}: a block is asked for twice")


# -- binary block responses ----------------------------------------------------------------------
class BlockStatus(enum.IntEnum):
    """Status byte of a BlockResponse."""

    OK = 0  #: payload is the block (or, for INDEX_BLOCK, the index)
    NOT_FOUND = 1  #: the repository has no such package
    BAD_REQUEST = 2  #: the request was malformed or asked for too much; payload is a reason (UTF-8)
    OUT_OF_RANGE = 3  #: the block number is past the end of the package


MAGIC = b"EB1"
_HEADER = struct.Struct(">3sBII")  # magic, status, block number, payload length (big-endian)
HEADER_SIZE = _HEADER.size
INDEX_BLOCK = 0xFFFFFFFF  # block number that carries the index (and request-wide errors)


@dataclass(frozen=True)
class BlockResponse:
    """One block (or the index, or an error) on the device's blocks topic: 12-byte header + payload."""

    status: BlockStatus
    block: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return _HEADER.pack(MAGIC, self.status, self.block, len(self.payload)) + self.payload

    @classmethod
    def decode(cls, raw: bytes, topic: str = "") -> BlockResponse:
        where = topic or "block response"
        if len(raw) < HEADER_SIZE:
            raise ProtocolError(f"{where}: {len(raw)} bytes is shorter than the block header")
        magic, status, block, length = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ProtocolError(f"{where}: bad magic {magic!r} (expected {MAGIC!r})")
        try:
            code = BlockStatus(status)
        except ValueError:
            raise ProtocolError(f"{where}: unknown status {status}") from None
        if length != len(raw) - HEADER_SIZE:
            raise ProtocolError(f"{where}: header says {length} payload bytes, got {len(raw) - HEADER_SIZE}")
        return cls(code, block, bytes(memoryview(raw)[HEADER_SIZE:]))


def block_digests(path: str | Path, block_size: int = BLOCK_SIZE) -> list[bytes]:
    """The block index of a file: raw sha256 of each ``block_size`` slice (the last may be short)."""
    digests = []
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digests.append(hashlib.sha256(block).digest())
    return digests


def index_digest(digests: list[bytes] | bytes) -> str:
    """``blocks_digest``: sha256 hex over the concatenated raw block digests."""
    raw = digests if isinstance(digests, bytes) else b"".join(digests)
    return hashlib.sha256(raw).hexdigest()
