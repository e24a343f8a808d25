"""JSON control messages: every message validates what it reads.

A malformed message fails with one `ProtocolError` line naming the topic and the field, never a
KeyError deep in a handler, and never anything else: bad UTF-8, deep nesting (RecursionError in
the json module), 5000-digit integers (ValueError), NaN and infinities all end as ProtocolError.
Unknown JSON fields are ignored (a newer peer may add fields); missing ones are errors unless the
field has a default.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edgesdk.errors import ProtocolError, first_line
from edgesdk.protocol.blocks import INDEX_BLOCK, MAX_BLOCKS_PER_REQUEST

# Every control message fits well under the broker's packet cap (a block plus headroom).
MAX_JSON_BYTES = 256 * 1024
MAX_DEPTH = 32  # nesting deeper than this is refused before any field is read


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
    REFUSED = "refused"  #: a desired statement was not obeyed (``reason``: unsigned, untrusted key,
    #: replayed, expired, downgrade, mix-and-match, malformed); the active model is unchanged
    UNDEPLOYED = "undeployed"  #: the model was unloaded after an undeploy statement (its disk is
    #: freed after the agent's grace period)


_M = TypeVar("_M", bound="_Message")


class _Message:
    """JSON (de)serialisation driven by the dataclass fields' type hints."""

    def to_json(self) -> bytes:
        return json.dumps(_plain(dataclasses.asdict(self)), sort_keys=True,  # type: ignore[call-overload]
                          separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls: type[_M], raw: bytes | str, topic: str = "") -> _M:
        where = topic or cls.__name__
        return cls.from_dict(parse_json(raw, where), where)

    @classmethod
    def from_dict(cls: type[_M], data: Any, where: str = "") -> _M:
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected a JSON object")
        hints = _type_hints(cls)
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


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_json(raw: bytes | str, where: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse untrusted JSON: any malformed input is a ProtocolError naming ``where``, nothing else."""
    if not isinstance(raw, (bytes, bytearray, str)):
        raise ProtocolError(f"{where}: expected bytes, got {type(raw).__name__}")
    if len(raw) > limit:
        raise ProtocolError(f"{where}: message of {len(raw)} bytes exceeds {limit}")
    try:
        # Strict UTF-8 (RFC 8259 §8.1): json.loads would otherwise guess UTF-16/32 from NUL bytes,
        # so the bytes a statement's signature covers could be read two ways.
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ProtocolError(f"{where}: JSON nested too deeply") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise ProtocolError(f"{where}: not valid JSON ({first_line(exc, 200)})") from None
    _check_depth(data, where)
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # "1e999" parses to inf, which no message may hold (to_json would then fail, allow_nan=False).
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is out of the range of a JSON number")
    return number




def _check_depth(data: Any, where: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH (iteratively: no recursion on hostile input)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ProtocolError(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    return _coercer(hint)(value, where)


@functools.cache
def _coercer(hint: Any) -> Callable[[Any, str], Any]:
    """The checking converter for one type hint, built once per hint (a collector parses thousands
    of windows a second: inspecting the hint per value cost more than the JSON parse)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        inner = _coercer([a for a in args if a is not type(None)][0])
        optional = type(None) in args

        def union(value: Any, where: str) -> Any:
            return None if value is None and optional else inner(value, where)
        return union
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        def member(value: Any, where: str) -> Any:
            try:
                return hint(value)
            except ValueError:
                allowed = ", ".join(str(m.value) for m in hint)
                raise ProtocolError(f"{where}: {value!r} is not one of {allowed}") from None
        return member
    if hint is float:
        def number(value: Any, where: str) -> float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ProtocolError(f"{where}: expected float, got {type(value).__name__}")
            try:
                result = float(value)
            except OverflowError:
                result = math.inf
            if not math.isfinite(result):
                raise ProtocolError(f"{where}: expected a finite number")
            return result
        return number
    if origin in (dict, list, tuple):
        container = dict if origin is dict else list
        item = _coercer(args[1] if origin is dict else args[0])
        plain = (args[1] if origin is dict else args[0]) in (str, int, bool)
        wanted = args[1] if origin is dict else args[0]

        def collection(value: Any, where: str) -> Any:
            if not isinstance(value, container):
                raise ProtocolError(f"{where}: expected {'object' if origin is dict else 'array'}")
            values = value.values() if origin is dict else value
            if plain and all(type(v) is wanted for v in values):  # the common case, checked in one pass
                return dict(value) if origin is dict else (tuple(value) if origin is tuple else list(value))
            if origin is dict:
                return {str(k): item(v, where) for k, v in value.items()}
            converted = [item(v, where) for v in value]
            return tuple(converted) if origin is tuple else converted
        return collection
    if hint in (str, int, bool):
        def exact(value: Any, where: str) -> Any:
            if type(value) is hint:
                return value
            raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return exact

    def unknown(value: Any, where: str) -> Any:
        raise ProtocolError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
    return unknown


@dataclass(frozen=True)
class DeviceState(_Message):
    """`devices/{id}/state` (retained; the Last Will publishes online=False)."""

    device_id: str
    online: bool
    agent_version: str = ""
    target: str | None = None  # profile name the device was configured with
    hardware: dict[str, Any] = field(default_factory=dict)  # arch, cpu, memory, accelerators found
    runtimes: dict[str, Any] = field(default_factory=dict)  # runtime -> {"version", "providers"}
    labels: dict[str, str] = field(default_factory=dict)  # from the agent's config (`labels: {site: berlin}`)
    hardware_class: str | None = None  # the board, else the CPU model: what latencies are compared within
    telemetry_interval_s: float | None = None  # a device silent for three of these is `unknown`
    # Every active model: [{"name", "version", "package_id", "variant", "provider", "runtime"}], by name.
    models: list[dict[str, Any]] = field(default_factory=list)
    # The only active model's, when exactly one is active (readers older than `models`); else None.
    active_package: str | None = None
    active_variant: str | None = None
    provider: str | None = None
    updated_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def model(self, name: str) -> dict[str, Any] | None:
        """The entry of active model ``name``, or None."""
        return next((m for m in self.models if isinstance(m, dict) and m.get("name") == name), None)


@dataclass(frozen=True)
class InstallEvent(_Message):
    """`devices/{id}/events` (QoS 1): one step of an install."""

    kind: InstallEventKind
    package_id: str
    at: float  # unix time on the device
    model: str | None = None  # the model name the event is about (None: the device as a whole)
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
    model: str | None = None  # the model name the numbers are for (None: no model was active)
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


