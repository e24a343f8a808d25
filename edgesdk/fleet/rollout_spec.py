"""What a staged rollout is asked to do (DESIGN §8, docs/rollouts.md): its waves, its timings and
its gates' limits, parsed from the command line and stored with the rollout as JSON.

    waves        "1,10%,50%,100%"  each entry is the cumulative size after that wave: a device count
                                    or a share of the selected devices (rounded up, at least one)
    durations    "10m", "90s", "1h"
    limits       "5%", "0.05", or "off" (the gate is not evaluated)

Defaults are for a small fleet: a first wave of one device, a 10-minute bake, 500 calls before a
latency or error verdict, and up to three bakes of waiting for that data before the rollout halts
as inconclusive.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgesdk.errors import ConfigError

DEFAULT_WAVES = "1,10%,50%,100%"
DEFAULT_BAKE_S = 600.0
DEFAULT_ACTIVATION_TIMEOUT_S = 900.0
DEFAULT_MIN_SAMPLES = 500
MIN_LOOKBACK_S = 600.0  # the old release on the same devices: at least this long before the switch
MAX_WAVES = 20

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class GateLimits:
    """Each gate's threshold; None switches that gate off. Rates and regressions are fractions
    (0.05 = 5 %); drift is a population stability index."""

    max_failure_rate: float | None = 0.05  # failed installs / health checks among the wave's devices
    max_p95_regression: float | None = 0.20  # new p95 / baseline p95 - 1, per hardware class
    max_p99_regression: float | None = 0.30
    max_error_rate_rise: float | None = 0.01  # new error rate - baseline error rate (absolute)
    max_drift: float | None = 0.20  # PSI of the outputs, new vs old on the same devices
    provider_fallback: bool = True  # halt when a device runs the new release on a slower provider
    min_samples: int = DEFAULT_MIN_SAMPLES  # calls per side (and class) before a verdict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateLimits:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RolloutSpec:
    """Everything `rollout start` was asked, stored with the rollout (the controller reads only this)."""

    fleet: str
    name: str  # the model name
    version: str
    kind: str = "deploy"  # "deploy" | "rollback" (rollback statements: a lower version is allowed)
    select: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ()  # explicit device ids (empty: every device --select matches)
    waves: tuple[str, ...] = tuple(DEFAULT_WAVES.split(","))
    bake_s: float = DEFAULT_BAKE_S
    activation_timeout_s: float = DEFAULT_ACTIVATION_TIMEOUT_S
    max_wait_s: float | None = None  # waiting for enough data after the bake; None: 2 x bake (at least 60 s)
    lookback_s: float | None = None  # None: twice the bake, at least MIN_LOOKBACK_S (recent: comparable load)
    limits: GateLimits = GateLimits()

    @property
    def release(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def old_window_s(self) -> float:
        """How far before the switch the same devices' old release is read."""
        return self.lookback_s if self.lookback_s is not None else max(MIN_LOOKBACK_S, 2 * self.bake_s)

    @property
    def data_wait_s(self) -> float:
        return self.max_wait_s if self.max_wait_s is not None else max(60.0, 2 * self.bake_s)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["devices"] = list(self.devices)
        data["waves"] = list(self.waves)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutSpec:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["limits"] = GateLimits.from_dict(data.get("limits") or {})
        values["devices"] = tuple(data.get("devices") or ())
        values["waves"] = tuple(data.get("waves") or ())
        values["select"] = dict(data.get("select") or {})
        return cls(**values)


def parse_waves(text: str, option: str = "--waves") -> tuple[str, ...]:
    """``1,10%,50%,100%`` checked: counts or percentages, growing, the last one 100 % (a rollout
    that stops short would leave part of the selection behind without saying so)."""
    items = tuple(p.strip() for p in text.split(",") if p.strip())
    if not items:
        raise ConfigError(f"{option} {text!r}: name at least one wave, e.g. 1,10%,100%")
    if len(items) > MAX_WAVES:
        raise ConfigError(f"{option}: at most {MAX_WAVES} waves")
    previous: dict[bool, float] = {}
    for item in items:
        share, value = _wave_value(item, option)
        if share in previous and value <= previous[share]:
            raise ConfigError(f"{option} {text!r}: waves are cumulative sizes and must grow "
                              f"({item} after {previous[share]:g}{'%' if share else ''})")
        previous[share] = value
    if items[-1] != "100%":
        raise ConfigError(f"{option} {text!r}: the last wave must be 100% (every selected device)")
    return items


def _wave_value(item: str, option: str) -> tuple[bool, float]:
    """(is a share, value) of one wave entry."""
    share = item.endswith("%")
    number = item[:-1] if share else item
    try:
        value = float(number) if share else int(number)
    except ValueError:
        raise ConfigError(f"{option}: wave {item!r} is neither a device count (5) nor a share (10%)") from None
    if share and not 0 < value <= 100:
        raise ConfigError(f"{option}: wave {item!r} must be a share within 0%..100%")
    if not share and value < 1:
        raise ConfigError(f"{option}: wave {item!r} must be at least one device")
    return share, float(value)


def wave_sizes(waves: tuple[str, ...], total: int) -> list[int]:
    """How many devices each wave adds, for ``total`` selected devices: cumulative targets, never
    shrinking, at least one device per wave while any remain; empty waves are dropped."""
    sizes, reached = [], 0
    for item in waves:
        share, value = _wave_value(item, "--waves")
        target = math.ceil(total * value / 100 - 1e-9) if share else int(value)
        target = min(total, max(target, reached + 1))
        if target > reached:
            sizes.append(target - reached)
            reached = target
    if reached < total:  # only when the last entry was not 100 % (a stored spec from elsewhere)
        sizes.append(total - reached)
    return sizes


def parse_duration(text: str, option: str) -> float:
    """Seconds from ``90s``, ``10m``, ``1h``, ``1d`` or a bare number of seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise ConfigError(f"{option} {text!r}: use a duration like 90s, 10m or 1h")
    value = float(match.group(1)) * _UNIT_S[match.group(2) or "s"]
    if not math.isfinite(value) or value > 365 * 86400:
        raise ConfigError(f"{option} {text!r}: at most a year")
    return value


def parse_limit(text: str | None, option: str, default: float | None, *, fraction: bool = True) -> float | None:
    """A gate threshold: ``5%`` or ``0.05`` (fractions), a plain number (``fraction=False``: drift),
    or ``off``. None: the default."""
    if text is None:
        return default
    value = str(text).strip().lower()
    if value in ("off", "none", "no"):
        return None
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise ConfigError(f"{option} {text!r}: use a percentage (20%), a fraction (0.2) or off") from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{option} {text!r}: must be a number >= 0 (or off)")
    if fraction and value.endswith("%") is False and number > 10:
        raise ConfigError(f"{option} {text!r}: looks like a percentage: write {value}%")
    return number


def describe_limit(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "off"
    return f"{value * 100:g}%" if percent else f"{value:g}"
