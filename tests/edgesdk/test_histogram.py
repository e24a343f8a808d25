"""LatencyHistogram: percentile accuracy, exact merging, and the wire forms a collector reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgesdk.protocol.histogram import (
    BOUNDS, BUCKETS, GROWTH, LOWEST_MS, OVERFLOW, IncompatibleHistogramError, LatencyHistogram,
    bucket_index, bucket_range, bucket_value,
)


def _lognormal(n: int, seed: int, median_ms: float = 5.0, sigma: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(math.log(median_ms), sigma, n)


def _hist(values: np.ndarray) -> LatencyHistogram:
    hist = LatencyHistogram()
    hist.record_many(values.tolist())
    return hist


@pytest.mark.parametrize("q", [1, 10, 50, 90, 95, 99, 99.9])
def test_percentile_within_one_percent_of_numpy_on_lognormal_latencies(q: float) -> None:
    data = _lognormal(50_000, seed=1)
    expected = np.percentile(data, q, method="inverted_cdf")  # nearest rank, like the histogram
    got = _hist(data).percentile(q)
    assert got is not None and abs(got - expected) / expected <= 0.01


def test_bucket_value_is_within_half_a_percent_of_every_value_in_its_bucket() -> None:
    values = np.exp(np.random.default_rng(2).uniform(math.log(LOWEST_MS), math.log(BOUNDS[-1]), 20_000))
    for value in values.tolist():
        rep = bucket_value(bucket_index(value))
        assert abs(rep - value) / value <= 0.005 + 1e-9


def test_merging_two_windows_equals_histogram_of_the_concatenated_samples_exactly() -> None:
    a, b = _lognormal(7_000, seed=3), _lognormal(3_000, seed=4, median_ms=40.0, sigma=0.3)
    merged = _hist(a)
    merged.merge(_hist(b))
    whole = _hist(np.concatenate([a, b]))
    assert merged == whole  # counts per bucket, count, integer sum, min and max
    assert merged.percentile(99) == whole.percentile(99)


def test_merge_across_devices_is_exact_after_json_round_trip() -> None:
    a, b = _lognormal(2_000, seed=5), _lognormal(2_000, seed=6, median_ms=0.3)
    fleet = LatencyHistogram.from_dict(json.loads(json.dumps(_hist(a).to_dict())))
    fleet.merge(LatencyHistogram.from_dict(json.loads(json.dumps(_hist(b).to_dict()))))
    assert fleet == _hist(np.concatenate([a, b]))


def test_to_dict_round_trip_is_sparse_and_names_its_scheme() -> None:
    hist = _hist(np.array([0.5, 0.5, 12.0, 3000.0]))
    data = hist.to_dict()
    assert data["scheme"] == "log1.01" and data["scheme_version"] == 1
    assert len(data["counts"]) == 3 and sum(data["counts"].values()) == 4
    assert LatencyHistogram.from_dict(json.loads(json.dumps(data))) == hist


def test_bounds_form_round_trips_exactly() -> None:
    hist = _hist(np.concatenate([_lognormal(500, seed=7), [0.0, 1e9]]))
    rebuilt = LatencyHistogram.from_bounds(hist.to_bounds(), sum_ns=hist.sum_ns, min_ms=hist.min, max_ms=hist.max)
    assert rebuilt == hist
    assert "+Inf" in hist.to_bounds()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(scheme="hdr-3"), "scheme 'hdr-3'"),
    (lambda d: d.update(scheme_version=2), "v2"),
    (lambda d: d.update(count=99), "differs from the bucket total"),
    (lambda d: d["counts"].update({"5000": 1}), "bad bucket '5000'"),
    (lambda d: d["counts"].update({"x": 1}), "not an integer"),
    (lambda d: d.update(sum_ns=-1), "sum_ns"),
])
def test_collector_rejects_incompatible_or_inconsistent_histograms(mutate, message: str) -> None:
    data = _hist(np.array([1.0, 2.0])).to_dict()
    mutate(data)
    with pytest.raises(IncompatibleHistogramError, match=message):
        LatencyHistogram.from_dict(data)


def test_bounds_form_rejects_a_key_outside_the_scheme() -> None:
    with pytest.raises(IncompatibleHistogramError, match="not a bucket bound"):
        LatencyHistogram.from_bounds({"1.23456789": 3})


def test_bucket_bounds_cannot_shift_with_the_platforms_pow() -> None:
    # Bounds are 0.001*1.01**k rounded to 6 digits; a libm off by a few ulps could only move one
    # if the raw value sat within ~1e-15 of a rounding midpoint. All sit far away.
    for k in range(BUCKETS):
        raw = LOWEST_MS * GROWTH**k
        step = 10.0 ** (math.floor(math.log10(raw)) - 5)
        frac = raw / step - math.floor(raw / step)
        assert abs(frac - 0.5) * step / raw > 1e-12
    assert len(set(BOUNDS)) == BUCKETS and list(BOUNDS) == sorted(BOUNDS)
    assert max(b / a for a, b in zip(BOUNDS, BOUNDS[1:])) <= 1.0101


def test_underflow_and_overflow_are_kept_and_clamped_to_the_exact_extremes() -> None:
    hist = _hist(np.array([0.0, 0.0002, 5.0, 2e6]))
    assert bucket_index(0.0) == 0 and bucket_index(2e6) == OVERFLOW
    assert hist.min == 0.0 and hist.max == 2e6
    assert hist.percentile(0) == 0.0 and hist.percentile(100) == 2e6
    assert 0.0 <= hist.percentile(25) <= LOWEST_MS  # sub-µs: reported as at most 1 µs
    assert hist.percentile(99) == 2e6  # the overflow bucket reports the exact max
    assert bucket_range(OVERFLOW)[1] == math.inf


def test_empty_histogram_has_no_percentiles_and_bad_q_is_refused() -> None:
    hist = LatencyHistogram()
    assert hist.percentile(50) is None and hist.mean is None and hist.count == 0
    with pytest.raises(ValueError):
        hist.percentile(101)
