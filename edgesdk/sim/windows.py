"""Telemetry windows a simulated device sends: drawn with numpy, filled exactly as the agent fills them.

A window holds a real `LatencyHistogram` of lognormal latencies, built vectorised (one
``searchsorted`` on the scheme's bucket bounds instead of a bisect per sample) but identical, bucket
for bucket and nanosecond for nanosecond, to ``record_many`` on the same samples, so a collector
merges simulated windows exactly as it merges real ones (agent/telemetry.py ``_roll`` is the model).

Latency noise scales the lognormal itself (its median: mu + log(factor)), so the histogram, p50,
p95, p99, max and mean of a window all move by the same factor: ``device_factor`` (fixed per device
and release, ``device_spread``) times the window's load factor 1 + jitter·load (``jitter``, load
drawn from U[-1, 1] once per device and window).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesdk.protocol import TelemetryWindow
from edgesdk.protocol.histogram import BOUNDS, SCHEME, LatencyHistogram
from edgesdk.sim.behaviour import ReleaseBehaviour

_BOUNDS = np.asarray(BOUNDS, dtype=np.float64)


@dataclass(frozen=True)
class ModelContext:
    """What a window is about: one release of one model as the device runs it (None: a heartbeat)."""

    model: str | None
    package_id: str | None = None
    variant: str | None = None
    provider: str | None = None


HEARTBEAT = ModelContext(None)


def histogram_of_samples(samples: np.ndarray) -> LatencyHistogram:
    """`LatencyHistogram.record_many(samples)`, vectorised (same buckets, sum, min and max)."""
    hist = LatencyHistogram()
    if samples.size == 0:
        return hist
    samples = np.maximum(samples.astype(np.float64, copy=False), 0.0)  # record() counts negatives as 0
    # bisect_right(BOUNDS, v) == searchsorted(BOUNDS, v, side="right") on the same float64 table.
    buckets, counts = np.unique(np.searchsorted(_BOUNDS, samples, side="right"), return_counts=True)
    hist.counts = dict(zip(buckets.tolist(), counts.tolist()))
    hist.count = int(samples.size)
    # record() adds int(v * 1e6) per sample; astype truncates toward zero the same way.
    hist.sum_ns = int((samples * 1_000_000.0).astype(np.int64).sum())
    hist.min, hist.max = float(samples.min()), float(samples.max())
    return hist


@dataclass
class Draw:
    """One window's worth of simulated calls."""

    hist: LatencyHistogram
    errors: int
    outputs: dict[str, dict[str, Any]]


def draw(rng: np.random.Generator, behaviour: ReleaseBehaviour, seconds: float, interval_s: float, *,
         scale: float = 1.0, load: float | None = None) -> Draw:
    """Calls over ``seconds`` of a release that makes ``calls_per_window`` calls per ``interval_s`` on
    average: a Poisson count, binomial errors, lognormal latencies of the successful calls, and
    output summaries (mean shifted by ``output_drift``).

    The latencies are multiplied by ``scale`` (the device's `device_factor`) and, when the release
    has ``jitter``, by 1 + jitter·``load``: ``load`` in [-1, 1] is the device's load this window,
    shared by the windows of one roll (drawn here, uniformly, when None). Without jitter nothing
    more is drawn from ``rng``, so a seed gives the same windows as before these keys existed."""
    expected = behaviour.calls_per_window * max(seconds, 0.0) / interval_s
    calls = int(rng.poisson(expected)) if expected > 0 else 0
    errors = int(rng.binomial(calls, behaviour.error_rate)) if calls and behaviour.error_rate > 0 else 0
    ok = calls - errors
    if behaviour.jitter > 0:
        scale *= 1.0 + behaviour.jitter * (draw_load(rng) if load is None else load)
    # lognormal(mu + log f, sigma) is f x lognormal(mu, sigma): the factor costs one log, not a pass over the samples.
    mu = behaviour.mu if scale == 1.0 else behaviour.mu + math.log(scale)
    hist = histogram_of_samples(rng.lognormal(mu, behaviour.sigma, ok))
    outputs: dict[str, dict[str, Any]] = {}
    for name, (mean, std) in behaviour.outputs.items():
        if ok:
            values = rng.normal(mean + behaviour.output_drift, std, ok)
            outputs[name] = {"count": ok, "mean": float(values.mean()), "std": float(values.std())}
        else:
            outputs[name] = {"count": 0, "mean": None, "std": None}
    return Draw(hist, errors, outputs)


def draw_load(rng: np.random.Generator) -> float:
    """A device's load in one window, uniform in [-1, 1) (``rng.random()``: 0.9 µs, ``uniform()`` 3 µs)."""
    return 2.0 * rng.random() - 1.0


def device_factor(seed: int, index: int, spread: float) -> float:
    """Device ``index``'s fixed latency factor, from U[1 - spread, 1 + spread]: the device is as much
    faster or slower than its class on every release (a unit's own thermals, clocks, neighbours).

    A hash of (seed, index), not a draw from the simulator's shared Generator: the same
    seed gives every device the same factor whatever order statements arrive in, and whichever
    simulator process (``--first``) runs the device. ~2 µs (blake2b): no Generator per device."""
    if spread <= 0:
        return 1.0
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    unit = int.from_bytes(digest, "big") / 18446744073709551616.0  # 2**64: a uniform in [0, 1)
    return 1.0 + spread * (2.0 * unit - 1.0)


def empty_draw() -> Draw:
    return Draw(LatencyHistogram(), 0, {})


def window(seq: int, start: float, end: float, ctx: ModelContext, drawn: Draw, dropped_windows: int) -> TelemetryWindow:
    """The TelemetryWindow an agent would send for ``drawn`` (fields as agent/telemetry.py fills them)."""
    hist = drawn.hist
    extra: dict[str, Any] = {"rejected": 0, "mean_ms": hist.mean, "min_ms": hist.min,
                             "histogram_scheme": SCHEME, "histogram_sum_ns": hist.sum_ns}
    if drawn.outputs:
        extra["outputs"] = drawn.outputs
    return TelemetryWindow(
        seq=seq, window_start=start, window_end=max(end, start), count=hist.count + drawn.errors,
        errors=drawn.errors, p50_ms=hist.percentile(50), p95_ms=hist.percentile(95), p99_ms=hist.percentile(99),
        max_ms=hist.max, histogram=hist.to_bounds(), variant=ctx.variant, provider=ctx.provider,
        package_id=ctx.package_id, model=ctx.model, dropped_windows=dropped_windows, extra=extra)


def fake_package_id(name: str, version: str) -> str:
    """The package id `--start-with NAME@VERSION` uses without --repo: sha256 of "NAME@VERSION"."""
    return hashlib.sha256(f"{name}@{version}".encode()).hexdigest()
