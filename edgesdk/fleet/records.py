"""What the fleet store holds and answers, as plain records (DESIGN §8).

The store (`edgesdk.fleet.store`) writes and reads these; the collector fills it from the devices'
messages, the registry and report commands and the simulator read it. Every record names a
release as ``name@version`` (`release`), never a bare package id, and uses None only for "not
known", which tables print as "—".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DeviceStatus = Literal["online", "offline", "unknown"]
# A device silent for more than this many of its telemetry windows is `unknown` (DESIGN §8).
SILENT_WINDOWS = 3
GROUP_KEYS = ("release", "device", "target", "provider", "model", "hardware")  # and "label:KEY"
# The group key of telemetry whose grouping value is not known (no such label, no provider...).
NO_VALUE = "—"


def release_name(name: str | None, version: str | None) -> str | None:
    """``name@version``, the one way users see a release (None when either is unknown)."""
    return f"{name}@{version}" if name and version else None


@dataclass(frozen=True)
class ModelRecord:
    """One model a device runs: its name, release and how it runs."""

    name: str
    version: str
    package_id: str
    variant: str | None = None
    provider: str | None = None
    runtime: str | None = None

    @property
    def release(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class DesiredRecord:
    """What the fleet told a device to run for one model name (from the retained statements)."""

    model: str
    package_id: str | None  # None: an undeploy statement
    release: str | None  # name@version when the package is known to the store
    serial: int
    at: float  # when it was issued (the statement's issued_at)
    rollout_id: str | None = None


@dataclass(frozen=True)
class DeviceRecord:
    """A device as the registry knows it."""

    fleet: str
    device_id: str
    status: DeviceStatus
    last_seen: float | None  # the last message of any kind from it
    first_seen: float | None
    hardware_class: str | None  # the board, else the CPU model (what latencies are compared within)
    arch: str | None
    target: str | None
    agent_version: str | None
    labels: dict[str, str] = field(default_factory=dict)
    models: tuple[ModelRecord, ...] = ()  # what it runs now, by name
    desired: tuple[DesiredRecord, ...] = ()  # what it was told to run, by name
    telemetry_interval_s: float | None = None
    hardware: dict[str, Any] = field(default_factory=dict)  # what the device's state said (arch, cpu, ...)
    runtimes: dict[str, Any] = field(default_factory=dict)  # runtime -> {"version", "providers"}

    def model(self, name: str) -> ModelRecord | None:
        return next((m for m in self.models if m.name == name), None)

    def reached(self) -> dict[str, bool]:
        """Per desired model name: whether the device runs what it was told (an undeploy: runs nothing)."""
        out = {}
        for wish in self.desired:
            running = self.model(wish.model)
            out[wish.model] = (running is None) if wish.package_id is None else (
                running is not None and running.package_id == wish.package_id)
        return out

    def to_json(self) -> dict[str, Any]:
        """The `devices list --json` entry (docs/cli-json.md)."""
        reached = self.reached()
        return {
            "id": self.device_id, "fleet": self.fleet, "status": self.status, "last_seen": self.last_seen,
            "first_seen": self.first_seen, "hardware_class": self.hardware_class, "arch": self.arch,
            "target": self.target, "agent_version": self.agent_version, "labels": dict(self.labels),
            "models": [{"name": m.name, "release": m.release, "package_id": m.package_id, "variant": m.variant,
                        "provider": m.provider, "runtime": m.runtime} for m in self.models],
            "desired": [{"model": d.model, "release": d.release, "package_id": d.package_id, "undeploy":
                         d.package_id is None, "serial": d.serial, "at": d.at, "rollout_id": d.rollout_id,
                         "reached": reached.get(d.model, False)} for d in self.desired],
        }


@dataclass(frozen=True)
class ReleaseRecord:
    """A published package: ``name@version`` for one target, with the manifest's metrics."""

    package_id: str
    name: str
    version: str
    target: str
    size: int
    published_at: float
    signer: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # per variant: the manifest's metrics

    @property
    def release(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class EventRecord:
    """One install event a device sent."""

    fleet: str
    device_id: str
    at: float
    kind: str
    model: str | None
    package_id: str
    release: str | None  # name@version when the package is known
    rollout_id: str | None
    reason: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    progress: float | None = None  # 0..1, for downloading
    table: list[dict[str, Any]] | None = None  # for selected: the benchmark rows


@dataclass(frozen=True)
class GroupStats:
    """Telemetry merged over a group of windows (exact: the histograms are merged, not averaged)."""

    key: str  # the group's value: a release, a device id, a target, a provider, a label value
    count: int  # inference calls (ok + errors)
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    devices: int  # distinct devices in the group
    windows: int

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.count if self.count else None

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "count": self.count, "errors": self.errors, "error_rate": self.error_rate,
                "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms, "devices": self.devices,
                "windows": self.windows}
