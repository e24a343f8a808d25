"""Latency measurement of a session: warm up, time bounded runs, summarise as percentiles.

Used by the host packager (informational host latency in the manifest) and by the agent when it
ranks variant × provider candidates, where the total time per candidate must stay bounded.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from edgesdk.errors import ConfigError

MIN_TIMED_RUNS = 3  # fewer timed runs than this make p50 a single sample's noise


class Runnable(Protocol):
    def run(self, feeds: Mapping[str, np.ndarray]) -> Any: ...


@dataclass(frozen=True)
class LatencyStats:
    """Latency of `runs` timed inference calls, in milliseconds."""

    runs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    def to_dict(self) -> dict[str, Any]:
        # Microsecond resolution is all a timer over Python calls can claim.
        return {k: (v if isinstance(v, int) else round(v, 4)) for k, v in asdict(self).items()}


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    """Summarise per-call latencies (ms); percentiles interpolate linearly between samples."""
    values = np.asarray(list(samples_ms), dtype=np.float64)
    if values.size == 0:
        raise ConfigError("latency_stats: no latency samples to summarise")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ConfigError("latency_stats: latency samples must be finite and non-negative")
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return LatencyStats(runs=int(values.size), p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99),
                        mean_ms=float(values.mean()), min_ms=float(values.min()), max_ms=float(values.max()))


def time_session(session: Runnable, feeds: Mapping[str, np.ndarray], warmup: int = 3, runs: int = 50,
                 budget_s: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> LatencyStats:
    """Warm up, then time up to ``runs`` calls of ``session.run(feeds)``.

    ``budget_s`` bounds the whole call, warm-up included (the agent times many candidates and must
    finish): timing stops once it is spent, but never before min(runs, 3) timed runs. Warm-up runs
    always complete; the first call of a session is often much slower (lazy allocation, JIT).
    """
    if warmup < 0:
        raise ConfigError(f"time_session: warmup must be ≥ 0, got {warmup}")
    if runs < 1:
        raise ConfigError(f"time_session: runs must be ≥ 1, got {runs}")
    if budget_s is not None and budget_s < 0:
        raise ConfigError(f"time_session: budget_s must be ≥ 0, got {budget_s}")
    start = clock()
    for _ in range(warmup):
        session.run(feeds)
    minimum = min(runs, MIN_TIMED_RUNS)
    samples: list[float] = []
    while len(samples) < runs:
        if budget_s is not None and len(samples) >= minimum and clock() - start >= budget_s:
            break
        t0 = clock()
        session.run(feeds)
        samples.append((clock() - t0) * 1000.0)
    return latency_stats(samples)


def time_interleaved(sessions: Sequence[Runnable], feeds: Mapping[str, np.ndarray], warmup: int = 3,
                     block: int = 5, max_runs: int = 200, budget_s: float | None = None,
                     clock: Callable[[], float] = time.perf_counter,
                     order_seed: int = 0) -> list[LatencyStats]:
    """Time several sessions fairly: rounds of ``block`` calls each, in a shuffled order per round.

    Timing one candidate after another lets a change of machine load between them decide the
    ranking (measured: the 1.5× slower runtime won 2 of 3 times on a loaded 2-core host). Rounds
    spread that noise over every candidate. The first call of each block is untimed (another
    runtime's threads just ran). Stops at ``max_runs`` timed calls per session or when
    ``budget_s`` (warm-up included) is spent, after at least one full round.
    """
    if not sessions:
        return []
    if warmup < 0 or block < 1 or max_runs < 1:
        raise ConfigError("time_interleaved: warmup ≥ 0, block ≥ 1 and max_runs ≥ 1 are required")
    start = clock()
    for session in sessions:
        for _ in range(warmup):
            session.run(feeds)
    rng = np.random.default_rng(order_seed)
    samples: list[list[float]] = [[] for _ in sessions]
    while min(len(s) for s in samples) < max_runs:
        if budget_s is not None and samples[0] and clock() - start >= budget_s:
            break
        for index in rng.permutation(len(sessions)):
            session = sessions[index]
            session.run(feeds)  # untimed: settle caches and thread pools after the previous runtime
            for _ in range(min(block, max_runs - len(samples[index]))):
                t0 = clock()
                session.run(feeds)
                samples[index].append((clock() - t0) * 1000.0)
    return [latency_stats(s) for s in samples]
