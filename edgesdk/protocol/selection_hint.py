"""The fleet's selection ranking for one package on one hardware class, carried in a statement.

Devices report the table of every selection they run (the `selected` install event). The fleet
service ranks a package's candidates per hardware class and runtime versions from those tables
(`edgesdk.fleet.selection_hints`) and puts the ranking in the signed deployment statements of the
next devices of that class. Such a device confirms the top candidates within a short budget
instead of timing every variant × provider (agent/selection.py), and so ends on the same variant
as its peers unless it measures clearly differently.

The ranking travels inside the statement, so it is covered by the fleet key's signature: a broker
client cannot forge one. It is built from what devices reported, which a compromised device could
skew; the median over the class's devices and the device's own confirmation bound what that can
do (docs/security.md): the device still times the hinted candidates and applies every gate.

On the wire (the statement's ``selection_hint`` field):

    {"hardware_class": "Intel Xeon ...", "runtimes": {"onnxruntime": "1.32.0", "openvino": "2026.4.1"},
     "devices": 3, "ranking": [{"variant": "openvino-bf16", "provider": "CPU", "p50_ms": 4.1}, ...]}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from edgesdk.errors import ProtocolError

# Two candidates whose medians differ by less than this are equally fast: the preference order
# (the profile's, or the fleet's ranking) decides between them, so identical devices (and one
# device re-installing) agree. Interleaved timing on a quiet device repeats within ±2-3 %; a
# loaded 2-core device ±10-15 % per ratio (docs/benchmarks.md), hence not less.
SELECTION_NOISE = 0.05
MAX_RANKED = 32  # candidates in a ranking (a package has a handful of variants × providers)
MAX_RUNTIMES = 8
MAX_TEXT = 128


T = TypeVar("T")


def order_within_noise(items: Sequence[T], p50: Callable[[T], float], preference: Callable[[T], Any],
                       noise: float = SELECTION_NOISE) -> tuple[list[T], list[T]]:
    """The items within ``noise`` of the fastest median, by ``preference``; then the rest by median.
    Returns (the tied band, the rest). The one ranking rule of the agent and the fleet."""
    if not items:
        return [], []
    fastest = min(p50(i) for i in items)
    band = sorted((i for i in items if p50(i) <= fastest * (1 + noise)), key=preference)
    rest = sorted((i for i in items if p50(i) > fastest * (1 + noise)), key=lambda i: (p50(i), preference(i)))
    return band, rest


@dataclass(frozen=True)
class RankedCandidate:
    variant: str
    provider: str
    p50_ms: float  # median over the class's devices of their measured p50

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "provider": self.provider, "p50_ms": self.p50_ms}


@dataclass(frozen=True)
class SelectionHint:
    hardware_class: str
    runtimes: dict[str, str]  # runtime → version the ranking was measured with
    ranking: tuple[RankedCandidate, ...]  # best first
    devices: int  # how many devices' selections it was built from

    def to_dict(self) -> dict[str, Any]:
        return {"hardware_class": self.hardware_class, "runtimes": dict(sorted(self.runtimes.items())),
                "devices": self.devices, "ranking": [r.to_dict() for r in self.ranking]}

    def applies_to(self, hardware_class: str | None, runtimes: dict[str, str]) -> bool:
        """Whether a device of ``hardware_class`` with these runtime versions may start from it."""
        return hardware_class == self.hardware_class and dict(runtimes) == self.runtimes

    @classmethod
    def from_dict(cls, data: Any, where: str = "selection_hint") -> SelectionHint:
        """Parse untrusted data: anything malformed is one ProtocolError naming the field."""
        if not isinstance(data, dict):
            raise ProtocolError(f"{where}: expected an object")
        unknown = sorted(set(data) - {"hardware_class", "runtimes", "ranking", "devices"})
        if unknown:
            raise ProtocolError(f"{where}: unknown field {unknown[0][:40]!r}")
        hardware_class = _text(data.get("hardware_class"), f"{where}.hardware_class")
        runtimes = data.get("runtimes")
        if not isinstance(runtimes, dict) or len(runtimes) > MAX_RUNTIMES:
            raise ProtocolError(f"{where}.runtimes: expected an object of at most {MAX_RUNTIMES} runtime versions")
        checked = {_text(k, f"{where}.runtimes"): _text(v, f"{where}.runtimes.{str(k)[:40]}")
                   for k, v in runtimes.items()}
        devices = data.get("devices")
        if type(devices) is not int or not 1 <= devices <= 1 << 40:
            raise ProtocolError(f"{where}.devices: expected a positive integer")
        ranking = data.get("ranking")
        if not isinstance(ranking, list) or not 1 <= len(ranking) <= MAX_RANKED:
            raise ProtocolError(f"{where}.ranking: expected 1-{MAX_RANKED} candidates")
        ranked = []
        for i, item in enumerate(ranking):
            at = f"{where}.ranking[{i}]"
            if not isinstance(item, dict) or set(item) != {"variant", "provider", "p50_ms"}:
                raise ProtocolError(f"{at}: expected {{variant, provider, p50_ms}}")
            p50 = _finite_ms(item["p50_ms"], f"{at}.p50_ms")
            ranked.append(RankedCandidate(_text(item["variant"], f"{at}.variant"),
                                          _text(item["provider"], f"{at}.provider"), p50))
        if len({(r.variant, r.provider) for r in ranked}) != len(ranked):
            raise ProtocolError(f"{where}.ranking: a candidate is listed twice")
        return cls(hardware_class, checked, tuple(ranked), devices)


def _finite_ms(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{where}: expected a finite number ≥ 0")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer of 400 digits
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise ProtocolError(f"{where}: expected a finite number ≥ 0")
    return number


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or not value.isprintable():
        raise ProtocolError(f"{where}: expected 1-{MAX_TEXT} printable characters")
    return value
