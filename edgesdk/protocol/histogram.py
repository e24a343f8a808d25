"""Latency histogram on fixed log-spaced buckets, so merging windows and devices is exact.

Scheme ``log1.01`` v1 (the one a fleet collector must match before it adds counts):

    bound[k] = float(f"{0.001 * 1.01 ** k:.6g}")  ms,  k = 0 .. 1851   (1 µs .. ~99.8 s)
    bucket 0      [0, bound[0])              underflow (below 1 µs)
    bucket i      [bound[i-1], bound[i])     i = 1 .. 1851, each 1% wide
    bucket 1852   [bound[1851], inf)         overflow (above ~100 s)

Every histogram built with this scheme has the same boundaries, so ``merge`` only adds counts
(and the integer nanosecond sum): merging two windows gives the same histogram, bit for bit, as
recording both windows' samples into one. A percentile is its bucket's geometric midpoint, at
most 0.5% from any value in the bucket, clamped to the exact ``min``/``max`` seen.

Rounding the bounds to 6 significant digits makes the table identical on every platform (a libm
differing in the last bit of pow() cannot move a bound: every raw value sits > 1e-10 relative from
a rounding midpoint, see the tests) and gives each bucket a short exact text name, its upper
bound, used as the key on the wire (`to_bounds`, the telemetry message's ``histogram``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from edgesdk.errors import ProtocolError

if TYPE_CHECKING:
    from edgesdk.protocol.messages import TelemetryWindow

SCHEME_ID = "log1.01"
SCHEME_VERSION = 1
LOWEST_MS = 0.001  # 1 µs: below any inference worth timing
GROWTH = 1.01  # bucket width 1% -> representative within 0.5% of any value in the bucket
BUCKETS = 1852  # LOWEST_MS * GROWTH**1851 ~ 99.8 s; slower than that is an outage, not latency
OVERFLOW = BUCKETS  # index of [bound[-1], inf)

# Computed once; `bisect` on this table is the single definition of "which bucket" (~0.3 µs).
KEYS: tuple[str, ...] = tuple(f"{LOWEST_MS * GROWTH**k:.6g}" for k in range(BUCKETS)) + ("+Inf",)
BOUNDS: tuple[float, ...] = tuple(float(key) for key in KEYS[:BUCKETS])
_INDEX_OF_KEY = {key: index for index, key in enumerate(KEYS)}


class IncompatibleHistogramError(ProtocolError):
    """A serialised histogram uses another bucket scheme (or is malformed) and cannot be merged."""


def bucket_index(value_ms: float) -> int:
    """The bucket ``value_ms`` falls in (0 = underflow, OVERFLOW = beyond ~100 s)."""
    return bisect.bisect_right(BOUNDS, value_ms)


def bucket_range(index: int) -> tuple[float, float]:
    """[low, high) of a bucket in ms; the underflow starts at 0 and the overflow ends at inf."""
    if not 0 <= index <= OVERFLOW:
        raise ValueError(f"bucket index {index} outside 0..{OVERFLOW}")
    low = 0.0 if index == 0 else BOUNDS[index - 1]
    high = math.inf if index == OVERFLOW else BOUNDS[index]
    return low, high


def bucket_value(index: int) -> float:
    """The value a bucket stands for: geometric midpoint (edges: the finite bound)."""
    low, high = bucket_range(index)
    if index == 0:
        return high
    if index == OVERFLOW:
        return low
    return math.sqrt(low * high)


class LatencyHistogram:
    """Sparse counts per bucket plus exact count/min/max and a nanosecond-integer sum.

    Not thread-safe on its own: `agent.telemetry.LatencyRecorder` guards it with a lock.
    """

    __slots__ = ("counts", "count", "sum_ns", "min", "max")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.sum_ns = 0  # integer, so sums merge exactly too
        self.min: float | None = None
        self.max: float | None = None

    def record(self, value_ms: float) -> None:
        """Add one sample; negative values (a clock stepping back) count as 0."""
        if value_ms < 0.0:
            value_ms = 0.0
        index = bisect.bisect_right(BOUNDS, value_ms)
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        self.count += 1
        self.sum_ns += int(value_ms * 1_000_000.0)
        if self.min is None or value_ms < self.min:
            self.min = value_ms
        if self.max is None or value_ms > self.max:
            self.max = value_ms

    def record_many(self, values_ms: Iterable[float]) -> None:
        for value in values_ms:
            self.record(value)

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s samples into this one (exact: same scheme, integer counts and sum)."""
        counts = self.counts
        for index, n in other.counts.items():
            counts[index] = counts.get(index, 0) + n
        self.count += other.count
        self.sum_ns += other.sum_ns
        if other.min is not None and (self.min is None or other.min < self.min):
            self.min = other.min
        if other.max is not None and (self.max is None or other.max > self.max):
            self.max = other.max

    def copy(self) -> LatencyHistogram:
        clone = LatencyHistogram()
        clone.merge(self)
        return clone

    @property
    def sum(self) -> float:
        """Sum of recorded values in ms (exact to the nanosecond)."""
        return self.sum_ns / 1_000_000.0

    @property
    def mean(self) -> float | None:
        return None if self.count == 0 else self.sum / self.count

    def percentile(self, q: float) -> float | None:
        """Nearest-rank ``q``-th percentile (0..100) in ms, within 0.5% of the true sample; None if empty."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile {q} outside 0..100")
        if self.count == 0 or self.min is None or self.max is None:
            return None
        if q == 0.0:
            return self.min
        if q == 100.0:
            return self.max
        rank = max(1, math.ceil(q / 100.0 * self.count))
        if rank == self.count:  # the largest sample is known exactly
            return self.max
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                if index == OVERFLOW:  # unbounded above: the exact max is the better estimate
                    return self.max
                return min(max(bucket_value(index), self.min), self.max)
        return self.max  # unreachable while count == sum(counts)

    def percentiles(self, qs: Iterable[float]) -> dict[float, float | None]:
        return {q: self.percentile(q) for q in qs}

    def cumulative_at(self, bounds_ms: Iterable[float]) -> list[int]:
        """Samples at or below each bound (Prometheus ``le``), by bucket value: ≤0.5% off at a bound."""
        values = [(bucket_value(index), n) for index, n in self.counts.items()]
        return [sum(n for value, n in values if value <= bound) for bound in bounds_ms]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return (self.counts == other.counts and self.count == other.count and self.sum_ns == other.sum_ns
                and self.min == other.min and self.max == other.max)

    def __repr__(self) -> str:
        return f"LatencyHistogram(count={self.count}, buckets={len(self.counts)}, min={self.min}, max={self.max})"

    def to_bounds(self) -> dict[str, int]:
        """Sparse counts keyed by bucket upper bound in ms as text (``"+Inf"`` for the overflow)."""
        return {KEYS[index]: n for index, n in sorted(self.counts.items())}

    @classmethod
    def from_bounds(cls, counts: Mapping[str, int], *, sum_ns: int = 0, min_ms: float | None = None,
                    max_ms: float | None = None) -> LatencyHistogram:
        """Rebuild from `to_bounds` keys (exact: each key names one bucket of this scheme).

        Without ``min_ms``/``max_ms`` the first/last bucket's bounds stand in for them.
        """
        hist = cls()
        for key, n in counts.items():
            index = _INDEX_OF_KEY.get(key)
            if index is None:
                raise IncompatibleHistogramError(f"histogram: {key!r} is not a bucket bound of {SCHEME_ID!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise IncompatibleHistogramError(f"histogram: bad count for bucket {key!r}: {n!r}")
            hist.counts[index] = n
        hist.count = sum(hist.counts.values())
        hist.sum_ns = sum_ns
        if hist.count:
            lowest, highest = min(hist.counts), max(hist.counts)
            hist.min = min_ms if min_ms is not None else bucket_range(lowest)[0]
            hist.max = max_ms if max_ms is not None else bucket_range(highest)[1]
            if math.isinf(hist.max):
                hist.max = bucket_range(highest)[0]
        return hist

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON form: the scheme, then sparse ``{"index": count}`` and the exact aggregates."""
        return {
            "scheme": SCHEME_ID,
            "scheme_version": SCHEME_VERSION,
            "count": self.count,
            "sum_ns": self.sum_ns,
            "min_ms": self.min,
            "max_ms": self.max,
            "counts": {str(index): n for index, n in sorted(self.counts.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyHistogram:
        """Parse `to_dict` output; another scheme or inconsistent counts -> IncompatibleHistogramError."""
        if not isinstance(data, Mapping):
            raise IncompatibleHistogramError("histogram: expected a JSON object")
        scheme, version = data.get("scheme"), data.get("scheme_version")
        if scheme != SCHEME_ID or version != SCHEME_VERSION:
            raise IncompatibleHistogramError(
                f"histogram: scheme {scheme!r} v{version!r} is not {SCHEME_ID!r} v{SCHEME_VERSION}")
        raw = data.get("counts")
        if not isinstance(raw, Mapping):
            raise IncompatibleHistogramError("histogram: 'counts' must be an object of index -> count")
        hist = cls()
        for key, n in raw.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise IncompatibleHistogramError(f"histogram: bucket key {key!r} is not an integer") from None
            if not 0 <= index <= OVERFLOW or isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise IncompatibleHistogramError(f"histogram: bad bucket {key!r}: {n!r}")
            hist.counts[index] = n
        hist.count = sum(hist.counts.values())
        if data.get("count") != hist.count:
            raise IncompatibleHistogramError(
                f"histogram: 'count' {data.get('count')!r} differs from the bucket total {hist.count}")
        sum_ns, lo, hi = data.get("sum_ns"), data.get("min_ms"), data.get("max_ms")
        if isinstance(sum_ns, bool) or not isinstance(sum_ns, int) or sum_ns < 0:
            raise IncompatibleHistogramError(f"histogram: 'sum_ns' must be a non-negative integer, got {sum_ns!r}")
        hist.sum_ns = sum_ns
        if hist.count:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
                raise IncompatibleHistogramError("histogram: 'min_ms'/'max_ms' must be numbers")
            hist.min, hist.max = float(lo), float(hi)
        return hist


SCHEME = f"{SCHEME_ID}/{SCHEME_VERSION}"  # what a telemetry window's extra.histogram_scheme says


def histogram_of(window: TelemetryWindow) -> LatencyHistogram:
    """The window's exact latency histogram, for a collector merging windows and devices."""
    extra = window.extra
    if extra.get("histogram_scheme") != SCHEME:
        raise IncompatibleHistogramError(
            f"telemetry seq {window.seq}: histogram scheme {extra.get('histogram_scheme')!r} is not {SCHEME!r}")
    sum_ns = extra.get("histogram_sum_ns", 0)
    if isinstance(sum_ns, bool) or not isinstance(sum_ns, int) or sum_ns < 0:
        raise IncompatibleHistogramError(f"telemetry seq {window.seq}: 'histogram_sum_ns' must be an integer >= 0")
    min_ms = extra.get("min_ms")
    return LatencyHistogram.from_bounds(window.histogram, sum_ns=sum_ns,
                                        min_ms=float(min_ms) if isinstance(min_ms, (int, float)) else None,
                                        max_ms=window.max_ms)
