"""The gates a rollout's wave must pass (DESIGN §8, docs/rollouts.md), as plain functions of the
numbers the controller gathered (`WaveData`): each returns a `Decision` whose evidence holds the
numbers, the sample counts and the cohorts compared, so `rollout status` can show why.

Verdicts: ``pass``; ``fail`` (the rollout halts and rolls back); ``wait`` (too little data: the
controller waits, up to the spec's limit, then halts as ``inconclusive``: no gate passes on no
data); ``n/a`` (nothing to compare: a first install has no old release, or the gate is off).

Latency and error rate are judged per hardware class (a release fine on one board and slow on
another is caught on the slow one) against two baselines: the *same devices* on the old release
before the switch, and the *untouched* devices of the class (still on the old release) over the
same span. A regression fails the gate only when every baseline with at least ``min_samples``
calls shows it (the first cancels device differences, the second load changes over time); with
no usable baseline the gate waits. Output drift is the population stability index (PSI) between the old and the new
release's outputs on the same devices: over the argmax classes for classifier-like outputs,
otherwise over ten equal-probability bins of the old output's distribution (from its mean and
std; a normal approximation). PSI < 0.1 is commonly read as no shift, > 0.25 as a major one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from edgesdk.fleet.rollout_spec import GateLimits, describe_limit
from edgesdk.fleet.rollouts import ACTIVE, FAILED, UNKNOWN, Decision, RolloutDevice
from edgesdk.protocol.histogram import LatencyHistogram
from edgesdk.protocol.outputs import OutputSummary

PASS, FAIL, WAIT, NA, INCONCLUSIVE = "pass", "fail", "wait", "n/a", "inconclusive"
MAX_LISTED = 20  # devices named in one piece of evidence
PSI_BINS = 10
PSI_FLOOR = 1e-4  # a bin's share is never taken as 0 (log of 0)

# Execution providers by speed class: a device whose new release runs in a slower class than its
# old one fell back (e.g. TensorRT -> CPU when an engine would not build). ORT names, OpenVINO
# devices and LiteRT delegates; a name not listed is not judged.
PROVIDER_TIERS: dict[str, int] = {
    "TensorrtExecutionProvider": 0,
    "CUDAExecutionProvider": 1, "ROCMExecutionProvider": 1, "MIGraphXExecutionProvider": 1,
    "DmlExecutionProvider": 1, "CoreMLExecutionProvider": 1, "QNNExecutionProvider": 1, "GPU": 1, "NPU": 1,
    "OpenVINOExecutionProvider": 2, "XnnpackExecutionProvider": 2, "XNNPACK": 2,
    "CPUExecutionProvider": 3, "CPU": 3,
}


@dataclass
class Cohort:
    """Merged telemetry of some devices on one side of a comparison."""

    hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    calls: int = 0  # calls completed or failed (the windows' count)
    errors: int = 0
    devices: set[str] = field(default_factory=set)
    outputs: dict[str, OutputSummary] = field(default_factory=dict)
    capped: list[str] = field(default_factory=list)  # devices counted at the cap (rollout_data.MAX_DEVICE_WEIGHT)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None

    def describe(self) -> dict[str, Any]:
        h = self.hist
        return {"calls": self.calls, "errors": self.errors, "devices": len(self.devices),
                "capped_devices": self.capped[:MAX_LISTED],
                "p50_ms": _round(h.percentile(50)), "p95_ms": _round(h.percentile(95)),
                "p99_ms": _round(h.percentile(99)), "error_rate": _round(self.error_rate, 6)}


@dataclass
class ClassData:
    """One hardware class of a wave: the new release on the wave's devices, the old release on the
    same devices before the switch, and the untouched devices of the class meanwhile."""

    new: Cohort = field(default_factory=Cohort)
    old: Cohort = field(default_factory=Cohort)
    untouched: Cohort = field(default_factory=Cohort)
    had_previous: bool = False  # some device of the class ran an older release of the model


@dataclass
class WaveData:
    wave: int
    devices: Sequence[RolloutDevice]  # this wave's
    classes: dict[str, ClassData] = field(default_factory=dict)  # by hardware class ("—" unknown)
    outputs_new: dict[str, OutputSummary] = field(default_factory=dict)  # the wave, merged
    outputs_old: dict[str, OutputSummary] = field(default_factory=dict)
    outputs_untouched: dict[str, OutputSummary] = field(default_factory=dict)  # the untouched devices, meanwhile
    had_previous: bool = False


def evaluate(limits: GateLimits, data: WaveData, at: float) -> list[Decision]:
    """Every gate's decision on this wave, in a fixed order."""
    return [failure_gate(limits, data, at), *latency_gates(limits, data, at), error_rate_gate(limits, data, at),
            provider_gate(limits, data, at), drift_gate(limits, data, at)]


def verdict_of(decisions: Iterable[Decision]) -> str:
    """fail if any gate failed, else wait if any waits, else pass."""
    verdicts = {d.verdict for d in decisions}
    return FAIL if FAIL in verdicts else WAIT if WAIT in verdicts else PASS


# -- install / health ------------------------------------------------------------------------------
def failure_gate(limits: GateLimits, data: WaveData, at: float) -> Decision:
    states = [d.state for d in data.devices]
    active, failed, unknown = states.count(ACTIVE), states.count(FAILED), states.count(UNKNOWN)
    failed_devices = [d for d in data.devices if d.state == FAILED]
    evidence: dict[str, Any] = {
        "devices": len(states), "active": active, "failed": failed, "unknown": unknown,
        "max_failure_rate": limits.max_failure_rate,
        "failures": [{"device": d.device_id, "reason": (d.reason or "")[:300]} for d in failed_devices[:MAX_LISTED]]}
    if limits.max_failure_rate is None:
        return Decision(data.wave, at, "failure-rate", NA, "off", evidence)
    resolved = active + failed
    if resolved == 0:
        return Decision(data.wave, at, "failure-rate", WAIT,
                        f"no device of the wave activated or failed yet ({unknown} offline: never counted a success)",
                        evidence)
    rate = failed / resolved
    evidence["failure_rate"] = round(rate, 6)
    text = (f"{failed} of {resolved} devices with an outcome failed ({rate:.1%}; limit "
            f"{describe_limit(limits.max_failure_rate)}; {len(states)} in the wave)"
            + (f"; {unknown} offline" if unknown else ""))
    if failed and failed_devices[0].reason:
        text += f"; {failed_devices[0].device_id}: {failed_devices[0].reason[:160]}"
    return Decision(data.wave, at, "failure-rate", FAIL if rate > limits.max_failure_rate else PASS, text, evidence)


# -- latency ----------------------------------------------------------------------------------------
def latency_gates(limits: GateLimits, data: WaveData, at: float) -> list[Decision]:
    return [_percentile_gate("p95-regression", 95, limits.max_p95_regression, limits.min_samples, data, at),
            _percentile_gate("p99-regression", 99, limits.max_p99_regression, limits.min_samples, data, at)]


def _percentile_gate(gate: str, q: float, limit: float | None, min_samples: int, data: WaveData,
                     at: float) -> Decision:
    if limit is None:
        return Decision(data.wave, at, gate, NA, "off", {})
    per_class: dict[str, Any] = {}
    failing, waiting, judged = [], [], []
    for hw, cls in sorted(data.classes.items()):
        entry: dict[str, Any] = {"new": cls.new.describe(), "same_devices_old": cls.old.describe(),
                                 "untouched": cls.untouched.describe()}
        per_class[hw] = entry
        if not cls.new.devices:
            entry["verdict"] = NA
            continue
        if not cls.had_previous and not cls.untouched.calls:
            entry["verdict"], entry["note"] = NA, "first install: no old release to compare with"
            continue
        if cls.new.calls < min_samples:
            entry["verdict"], entry["note"] = WAIT, f"{cls.new.calls} calls on the new release (< {min_samples})"
            waiting.append(hw)
            continue
        new_value = cls.new.hist.percentile(q)
        changes = []  # (baseline, change, its value) for each baseline with enough calls
        for side, base in (("same_devices_old", cls.old), ("untouched", cls.untouched)):
            if base.calls < min_samples:
                entry[f"{side}_note"] = f"not compared: {base.calls} calls (< {min_samples})"
                continue
            base_value = base.hist.percentile(q)
            if not base_value or new_value is None:
                continue
            change = new_value / base_value - 1
            entry[f"regression_vs_{side}"] = round(change, 4)
            changes.append((side, change, base_value))
        if not changes:
            entry["verdict"] = WAIT
            waiting.append(hw)
            continue
        judged.append(hw)
        # A regression must show against every baseline that has the data: the same devices before
        # the switch (device differences cancel) and the untouched devices meanwhile (load over
        # time cancels). One that only one baseline shows is the time or the device mix.
        mildest = min(changes, key=lambda c: c[1])
        if mildest[1] > limit:
            entry["verdict"] = FAIL
            failing.append((hw, mildest, new_value, changes))
        else:
            entry["verdict"] = PASS
    evidence = {"limit": limit, "percentile": q, "min_samples": min_samples, "classes": per_class}
    name = f"p{q:g}"
    if failing:
        hw, _, new_value, changes = max(failing, key=lambda f: f[1][1])
        against = " and ".join(f"{base_value:.3g} ms on {_BASELINE_TEXT[side]} (+{change:.0%})"
                               for side, change, base_value in changes)
        return Decision(data.wave, at, gate, FAIL, f"{name} on {hw}: {new_value:.3g} ms vs {against}; limit "
                        f"+{limit:.0%}", evidence)
    if waiting:
        return Decision(data.wave, at, gate, WAIT, f"waiting for {min_samples} calls per side on "
                        f"{', '.join(waiting)}", evidence)
    if not judged:
        return Decision(data.wave, at, gate, NA, "nothing to compare (first install)", evidence)
    worst_text = ", ".join(f"{hw} {_signed(per_class[hw], 'same_devices_old')}" for hw in judged)
    return Decision(data.wave, at, gate, PASS, f"{name} within +{limit:.0%} ({worst_text})", evidence)


_BASELINE_TEXT = {"same_devices_old": "the same devices on the old release", "untouched": "the untouched devices"}


def _signed(entry: Mapping[str, Any], side: str) -> str:
    value = entry.get(f"regression_vs_{side}", entry.get("regression_vs_untouched"))
    return "—" if value is None else f"{value:+.0%}"


# -- error rate --------------------------------------------------------------------------------------
def error_rate_gate(limits: GateLimits, data: WaveData, at: float) -> Decision:
    limit = limits.max_error_rate_rise
    if limit is None:
        return Decision(data.wave, at, "error-rate", NA, "off", {})
    per_class: dict[str, Any] = {}
    failing, waiting, judged = [], [], []
    for hw, cls in sorted(data.classes.items()):
        if not cls.new.devices:
            continue
        entry: dict[str, Any] = {"new": cls.new.describe()}
        per_class[hw] = entry
        base, side = (cls.old, "same_devices_old") if cls.old.calls >= limits.min_samples else \
            (cls.untouched, "untouched")
        if not cls.had_previous and not cls.untouched.calls:
            entry["verdict"] = NA
            continue
        if cls.new.calls < limits.min_samples or base.calls < limits.min_samples:
            entry["verdict"] = WAIT
            waiting.append(hw)
            continue
        rise = (cls.new.error_rate or 0.0) - (base.error_rate or 0.0)
        entry.update({"baseline": side, side: base.describe(), "rise": round(rise, 6)})
        judged.append(hw)
        entry["verdict"] = FAIL if rise > limit else PASS
        if rise > limit:
            failing.append((hw, rise, cls.new.error_rate, base.error_rate))
    evidence = {"limit": limit, "min_samples": limits.min_samples, "classes": per_class}
    if failing:
        hw, rise, new_rate, base_rate = max(failing, key=lambda f: f[1])
        return Decision(data.wave, at, "error-rate", FAIL, f"error rate on {hw}: {new_rate:.2%} vs {base_rate:.2%} "
                        f"(+{rise * 100:.2f} points; limit +{limit * 100:g})", evidence)
    if waiting:
        return Decision(data.wave, at, "error-rate", WAIT,
                        f"waiting for {limits.min_samples} calls per side on {', '.join(waiting)}", evidence)
    if not judged:
        return Decision(data.wave, at, "error-rate", NA, "nothing to compare (first install)", evidence)
    return Decision(data.wave, at, "error-rate", PASS, f"error rate within +{limit * 100:g} points", evidence)


# -- provider fallback -------------------------------------------------------------------------------
def provider_gate(limits: GateLimits, data: WaveData, at: float) -> Decision:
    if not limits.provider_fallback:
        return Decision(data.wave, at, "provider-fallback", NA, "off", {})
    fell, compared = [], 0
    for d in data.devices:
        if d.state != ACTIVE or not d.prev_provider or not d.new_provider:
            continue
        old_tier, new_tier = PROVIDER_TIERS.get(d.prev_provider), PROVIDER_TIERS.get(d.new_provider)
        if old_tier is None or new_tier is None:
            continue
        compared += 1
        if new_tier > old_tier:
            fell.append(d)
    evidence = {"compared": compared, "fallbacks": [
        {"device": d.device_id, "hardware_class": d.hardware_class, "from": d.prev_provider, "to": d.new_provider}
        for d in fell[:MAX_LISTED]], "fallback_count": len(fell)}
    if fell:
        first = fell[0]
        return Decision(data.wave, at, "provider-fallback", FAIL,
                        f"{len(fell)} of {compared} devices run the new release on a slower provider "
                        f"({first.device_id} on {first.hardware_class or '—'}: {first.prev_provider} -> "
                        f"{first.new_provider})", evidence)
    if not compared:
        return Decision(data.wave, at, "provider-fallback", NA, "no device ran an older release to compare with",
                        evidence)
    return Decision(data.wave, at, "provider-fallback", PASS, f"{compared} devices kept their provider class",
                    evidence)


# -- output drift --------------------------------------------------------------------------------------
def drift_gate(limits: GateLimits, data: WaveData, at: float) -> Decision:
    limit = limits.max_drift
    if limit is None:
        return Decision(data.wave, at, "output-drift", NA, "off", {})
    if not data.had_previous:
        return Decision(data.wave, at, "output-drift", NA, "first install: no old release to compare with", {})
    new, old, untouched = data.outputs_new, data.outputs_old, data.outputs_untouched
    per_output: dict[str, Any] = {}
    waiting, worst = [], None
    for name in sorted(set(new) | set(old) | set(untouched)):
        b = new.get(name)
        # The baseline: the same devices before the switch, else (too few summarized calls there,
        # e.g. devices that ran the old release only briefly) the untouched devices meanwhile.
        candidates = [(side, s) for side, s in (("same_devices_old", old.get(name)), ("untouched", untouched.get(name)))
                      if s is not None]
        if b is None or not candidates:
            per_output[name] = {"note": f"only on the {'new' if b is not None else 'old'} release"}
            continue
        side, a = next(((side, s) for side, s in candidates if s.calls >= limits.min_samples), candidates[0])
        entry: dict[str, Any] = {"baseline": side, "old": _summary(a), "new": _summary(b)}
        per_output[name] = entry
        if a.calls < limits.min_samples or b.calls < limits.min_samples:
            entry["verdict"] = WAIT
            waiting.append(name)
            continue
        value, method = psi(a, b)
        entry.update({"psi": round(value, 4) if math.isfinite(value) else "inf", "method": method})
        if worst is None or value > worst[1]:
            worst = (name, value, method)
    evidence = {"limit": limit, "min_samples": limits.min_samples, "outputs": per_output}
    if worst is not None and worst[1] > limit:
        name, value, method = worst
        return Decision(data.wave, at, "output-drift", FAIL, f"output {name} drifted: PSI {value:.3g} over "
                        f"{method} (limit {limit:g})", evidence)
    if waiting or not per_output or worst is None:
        what = (f"{limits.min_samples} summarized calls per side on {', '.join(waiting)}" if waiting else
                "output summaries from the devices (agents before this release send none: --max-drift off)")
        return Decision(data.wave, at, "output-drift", WAIT, f"waiting for {what}", evidence)
    return Decision(data.wave, at, "output-drift", PASS, f"outputs stable (largest PSI {worst[1]:.3g} on "
                    f"{worst[0]}; limit {limit:g})", evidence)


def psi(old: OutputSummary, new: OutputSummary) -> tuple[float, str]:
    """The population stability index of ``new`` against ``old``, and how it was computed."""
    if old.argmax and new.argmax:
        classes = sorted(set(old.argmax) | set(new.argmax))
        n_old, n_new = sum(old.argmax.values()), sum(new.argmax.values())
        k = len(classes)
        # Add-half smoothing: a class seen on one side only gives a large but finite index.
        expected = [(old.argmax.get(c, 0) + 0.5) / (n_old + 0.5 * k) for c in classes]
        actual = [(new.argmax.get(c, 0) + 0.5) / (n_new + 0.5 * k) for c in classes]
        return _psi(expected, actual), f"the argmax of {k} classes"
    # Ten equal-probability bins of the old distribution (normal, from its mean and std), each
    # scaled by the share of finite values, plus one bin for the non-finite ones: an output that
    # starts answering NaN drifts like any other.
    finite_o, finite_n = _finite_share(old), _finite_share(new)
    if old.mean is None and new.mean is None:
        return _psi([finite_o, 1 - finite_o], [finite_n, 1 - finite_n]), "no finite values on either side"
    mu_o, sd_o = (old.mean, old.std or 0.0) if old.mean is not None else (new.mean, new.std or 0.0)
    mu_n, sd_n = (new.mean, new.std or 0.0) if new.mean is not None else (mu_o, sd_o)
    assert mu_o is not None and mu_n is not None
    if sd_o <= 0 and sd_n <= 0 and math.isclose(mu_o, mu_n, rel_tol=1e-6, abs_tol=1e-12):
        expected, actual = [finite_o, 1 - finite_o], [finite_n, 1 - finite_n]
        return _psi(expected, actual), "a constant output and its non-finite share"
    scale = sd_o if sd_o > 0 else sd_n if sd_n > 0 else max(abs(mu_o), abs(mu_n), 1e-12)
    unit = NormalDist()
    edges = [mu_o + scale * unit.inv_cdf(i / PSI_BINS) for i in range(1, PSI_BINS)]
    old_cdf = _cdf(mu_o, sd_o, edges)
    new_cdf = _cdf(mu_n, sd_n, edges)
    expected = [finite_o * p for p in _bins(old_cdf)] + [1 - finite_o]
    actual = [finite_n * p for p in _bins(new_cdf)] + [1 - finite_n]
    return _psi(expected, actual), f"{PSI_BINS} bins of the old distribution (mean/std) and a non-finite bin"


def _finite_share(s: OutputSummary) -> float:
    total = s.count + s.nonfinite
    return s.count / total if total else 1.0


def _cdf(mu: float, sd: float, edges: Sequence[float]) -> list[float]:
    """The CDF of N(mu, sd) at ``edges`` (a point mass when sd is 0)."""
    if sd > 0:
        dist = NormalDist(mu, sd)
        return [dist.cdf(e) for e in edges]
    return [float(mu <= e) for e in edges]


def _bins(cdf: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *cdf], [*cdf, 1.0])]


def _psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    total = 0.0
    for e, a in zip(expected, actual):
        e, a = max(e, PSI_FLOOR), max(a, PSI_FLOOR)
        total += (a - e) * math.log(a / e)
    return total


def _summary(s: OutputSummary) -> dict[str, Any]:
    out: dict[str, Any] = {"calls": s.calls, "count": s.count, "mean": _round(s.mean, 6), "std": _round(s.std, 6)}
    if s.argmax:
        out["argmax_classes"] = len(s.argmax)
    return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)
