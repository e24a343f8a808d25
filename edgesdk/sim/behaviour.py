"""The behaviour file: how each release performs on each hardware class (docs/simulator.md).

One YAML file drives tests, demos and benchmarks alike::

    hardware:
      classes: {jetson-orin-nano: 0.5, jetson-orin-nx: 0.5}   # share of devices per class
    labels:
      site: {berlin: 0.7, munich: 0.3}                         # share of devices per label value
    default:                                                   # every release not listed below
      p50_ms: 10
      sigma: 0.25
      error_rate: 0.001
    releases:
      det@2.0:                                                 # name@version, or just a name
        p50_ms: 12
        p95_ms: 20                                             # sigma derived from p50 and p95
        output_drift: 0.3
        jitter: 0.15                                           # each window's latencies x U[0.85, 1.15]
        device_spread: 0.1                                     # each device's latencies x U[0.9, 1.1], fixed
        by_hardware:
          jetson-orin-nano: {p50_ms: 18}

An entry inherits what it does not say, most specific last: ``default`` < ``default.by_hardware[c]``
< ``releases[name]`` < its ``by_hardware[c]`` < ``releases[name@version]`` < its ``by_hardware[c]``.
Every error is one line naming the file and the key (``ConfigError``), raised when the file is
loaded, never in the middle of a run.

Two kinds of noise scale a release's latencies (edgesdk/sim/windows.py applies both, so p50, p95,
p99, max and the histogram move together): ``jitter`` j, one factor from U[1 - j, 1 + j] per
device and telemetry window (the load on a device changes), and ``device_spread`` s, one factor
from U[1 - s, 1 + s] per device, the same on every release it runs, fixed for the run and the same
in every run with the same ``--seed`` (devices of one class are not identical).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgesdk.errors import ConfigError
from edgesdk.protocol.ids import is_valid_id

Z95 = 1.6448536269514722  # standard normal quantile at 0.95: p95 = p50 * exp(Z95 * sigma) for a lognormal
TOP_KEYS = ("hardware", "labels", "default", "releases")


@dataclass(frozen=True)
class ReleaseBehaviour:
    """How one release behaves on one hardware class; every field has the default a release gets
    when no behaviour file says otherwise."""

    p50_ms: float = 10.0  # median latency of a successful call (lognormal: exp(mu))
    sigma: float = 0.25  # lognormal shape: p95 = p50 * exp(1.645 * sigma); 0.25 -> p95 ~ 1.5 x p50
    error_rate: float = 0.001  # share of calls where the runtime raised (window.errors)
    install_failure_rate: float = 0.0  # share of obeyed deploy statements whose install fails
    calls_per_window: float = 600.0  # mean calls per full telemetry window (Poisson)
    install_s: float = 3.0  # simulated seconds from accepting a statement to `activated`
    provider: str = "CPUExecutionProvider"
    variant: str = "fp32"
    runtime: str = "onnxruntime"
    output_drift: float = 0.0  # added to every output's mean (what the drift gate looks for)
    # Latency noise (0: none; at most 0.9 so that every factor stays >= 0.1): a window's latencies
    # x U[1 - jitter, 1 + jitter], drawn per device and window; a device's x U[1 - device_spread,
    # 1 + device_spread], fixed per device from (seed, device index): the same on every release.
    jitter: float = 0.0
    device_spread: float = 0.0
    outputs: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: {"output": (0.0, 1.0)})  # output name -> (mean, std) of its values

    @property
    def mu(self) -> float:
        return math.log(self.p50_ms)


_NUMBERS = {  # key -> (lowest, highest, lowest allowed?) checked at load
    "p50_ms": (0.0, 1e7, False), "sigma": (0.0, 5.0, True), "p95_ms": (0.0, 1e7, False),
    "error_rate": (0.0, 1.0, True), "install_failure_rate": (0.0, 1.0, True),
    "calls_per_window": (0.0, 1e7, True), "install_s": (0.0, 86400.0, True),
    "output_drift": (-1e9, 1e9, True), "jitter": (0.0, 0.9, True), "device_spread": (0.0, 0.9, True),
}
_TEXTS = ("provider", "variant", "runtime")
ENTRY_KEYS = (*_NUMBERS, *_TEXTS, "outputs", "by_hardware")


@dataclass(frozen=True)
class Behaviour:
    """The parsed file: entries (plain dicts of checked values) and the device mix."""

    default: Mapping[str, Any] = field(default_factory=dict)
    default_by_hardware: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    releases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # "name" or "name@version"
    releases_by_hardware: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    hardware_classes: Mapping[str, float] = field(default_factory=dict)  # class -> weight
    labels: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # key -> value -> weight
    source: str = "built-in default"

    def for_release(self, name: str, version: str, hardware_class: str | None = None) -> ReleaseBehaviour:
        """The behaviour of ``name@version`` on ``hardware_class`` (None: the class-free entries)."""
        merged: dict[str, Any] = {}
        for key in ("", name, f"{name}@{version}"):
            entry = self.default if key == "" else self.releases.get(key)
            by_hw = self.default_by_hardware if key == "" else self.releases_by_hardware.get(key, {})
            if entry is not None:
                _overlay(merged, entry)
            if hardware_class is not None and hardware_class in by_hw:
                _overlay(merged, by_hw[hardware_class])
        return _build(merged)


def _overlay(merged: dict[str, Any], entry: Mapping[str, Any]) -> None:
    # p95_ms given at a more specific level replaces an inherited sigma, and the other way round.
    if "sigma" in entry:
        merged.pop("p95_ms", None)
    if "p95_ms" in entry:
        merged.pop("sigma", None)
    merged.update(entry)


def _build(values: Mapping[str, Any]) -> ReleaseBehaviour:
    values = dict(values)
    p95 = values.pop("p95_ms", None)
    result = replace(ReleaseBehaviour(), **values)
    if p95 is not None:
        if p95 <= result.p50_ms:
            raise ConfigError(f"behaviour: p95_ms {p95:g} must be above p50_ms {result.p50_ms:g}")
        result = replace(result, sigma=math.log(p95 / result.p50_ms) / Z95)
    return result


DEFAULT_BEHAVIOUR = Behaviour()


def load_behaviour(path: str | Path) -> Behaviour:
    """Read and check a behaviour file; ConfigError names the file and the key that is wrong."""
    from edgesdk.yamlfile import load_yaml_file

    data = load_yaml_file(path, "behaviour")
    return parse_behaviour(data if data is not None else {}, str(path))


def parse_behaviour(data: Any, where: str = "behaviour") -> Behaviour:
    """Check the parsed YAML of a behaviour file (see the module docstring for its shape)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    _no_unknown(data, TOP_KEYS, where, "")
    hardware: dict[str, float] = {}
    if data.get("hardware") is not None:
        hw = _mapping(data["hardware"], where, "hardware")
        _no_unknown(hw, ("classes",), where, "hardware.")
        hardware = _weights(hw.get("classes", {}), where, "hardware.classes")
    labels: dict[str, dict[str, float]] = {}
    for key, spread in _mapping(data.get("labels") or {}, where, "labels").items():
        if not is_valid_id(str(key)):
            raise ConfigError(f"{where}: labels.{key}: a label key must be 1-64 letters, digits, '.', '_', '-'")
        labels[str(key)] = _weights(spread, where, f"labels.{key}")
    default, default_hw = _entry(data.get("default") or {}, where, "default")
    releases: dict[str, dict[str, Any]] = {}
    releases_hw: dict[str, dict[str, dict[str, Any]]] = {}
    for ref, entry in _mapping(data.get("releases") or {}, where, "releases").items():
        ref = str(ref)
        name, _, version = ref.partition("@")
        if not is_valid_id(name) or ("@" in ref and (not version or not version.isprintable())):
            raise ConfigError(f"{where}: releases.{ref}: expected NAME or NAME@VERSION (NAME a model name)")
        releases[ref], releases_hw[ref] = _entry(entry if entry is not None else {}, where, f"releases.{ref}")
    behaviour = Behaviour(default, default_hw, releases, releases_hw, hardware, labels, where)
    # Resolve every combination once now, so a bad mix (p95 below an inherited p50) fails at load.
    classes = [None, *hardware, *default_hw, *(c for by in releases_hw.values() for c in by)]
    for ref in ["x@0", *releases]:
        name, _, version = ref.partition("@")
        for cls in classes:
            try:
                behaviour.for_release(name, version or "0", cls)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {'default' if ref == 'x@0' else 'releases.' + ref}"
                                  f"{'' if cls is None else '.by_hardware.' + cls}: {str(exc).split(': ', 1)[1]}")
    return behaviour


def _entry(raw: Any, where: str, key: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    entry = _mapping(raw, where, key)
    _no_unknown(entry, ENTRY_KEYS, where, f"{key}.")
    values = _values(entry, where, key)
    by_hw: dict[str, dict[str, Any]] = {}
    for cls, sub in _mapping(entry.get("by_hardware") or {}, where, f"{key}.by_hardware").items():
        sub_key = f"{key}.by_hardware.{cls}"
        sub = _mapping(sub if sub is not None else {}, where, sub_key)
        _no_unknown(sub, [k for k in ENTRY_KEYS if k != "by_hardware"], where, f"{sub_key}.")
        by_hw[str(cls)] = _values(sub, where, sub_key)
    return values, by_hw


def _values(entry: Mapping[str, Any], where: str, key: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, (low, high, low_ok) in _NUMBERS.items():
        if name in entry:
            number = entry[name]
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                    or not (low <= number <= high if low_ok else low < number <= high):
                bound = f"{'>=' if low_ok else '>'} {low:g} and <= {high:g}"
                raise ConfigError(f"{where}: {key}.{name}: expected a number {bound}, got {number!r}")
            values[name] = float(number)
    if "sigma" in values and "p95_ms" in values:
        raise ConfigError(f"{where}: {key}: give sigma or p95_ms, not both")
    for name in _TEXTS:
        if name in entry:
            text = entry[name]
            if not isinstance(text, str) or not text or len(text) > 128 or not text.isprintable():
                raise ConfigError(f"{where}: {key}.{name}: expected 1-128 printable characters, got {text!r}")
            values[name] = text
    if "outputs" in entry:
        outputs: dict[str, tuple[float, float]] = {}
        for out_name, spec in _mapping(entry["outputs"], where, f"{key}.outputs").items():
            spec = _mapping(spec, where, f"{key}.outputs.{out_name}")
            _no_unknown(spec, ("mean", "std"), where, f"{key}.outputs.{out_name}.")
            mean, std = spec.get("mean", 0.0), spec.get("std", 1.0)
            for label, number in (("mean", mean), ("std", std)):
                if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                        or (label == "std" and number < 0):
                    raise ConfigError(f"{where}: {key}.outputs.{out_name}.{label}: expected a "
                                      f"{'number >= 0' if label == 'std' else 'number'}, got {number!r}")
            outputs[str(out_name)] = (float(mean), float(std))
        if not outputs:
            raise ConfigError(f"{where}: {key}.outputs: name at least one output")
        values["outputs"] = outputs
    return values


def _weights(raw: Any, where: str, key: str) -> dict[str, float]:
    spread = _mapping(raw, where, key)
    weights: dict[str, float] = {}
    for name, weight in spread.items():
        if not isinstance(name, str) or not name or len(name) > 128 or not name.isprintable():
            raise ConfigError(f"{where}: {key}: {name!r} is not a name (1-128 printable characters)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise ConfigError(f"{where}: {key}.{name}: expected a weight >= 0, got {weight!r}")
        weights[name] = float(weight)
    if spread and sum(weights.values()) <= 0:
        raise ConfigError(f"{where}: {key}: the weights add up to 0")
    return weights


def _mapping(raw: Any, where: str, key: str) -> Mapping[Any, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: {key}: expected a mapping, got {type(raw).__name__}")
    return raw


def _no_unknown(entry: Mapping[Any, Any], allowed: Any, where: str, prefix: str) -> None:
    for key in entry:
        if key not in allowed:
            raise ConfigError(f"{where}: {prefix}{key}: unknown key (expected one of {', '.join(allowed)})")


def spread(weights: Mapping[str, float], count: int, rng: Any) -> list[str]:
    """``count`` names in the proportions of ``weights`` (largest remainder, so 0.5/0.5 of 5 is
    3/2), shuffled by ``rng`` (a numpy Generator) so that device 0..k are not all of one class."""
    total = sum(weights.values())
    shares = {name: count * w / total for name, w in weights.items()}
    counts = {name: int(share) for name, share in shares.items()}
    left = count - sum(counts.values())
    for name in sorted(shares, key=lambda n: shares[n] - counts[n], reverse=True)[:left]:
        counts[name] += 1
    names = [name for name, n in counts.items() for _ in range(n)]
    order = rng.permutation(len(names))
    return [names[i] for i in order]
