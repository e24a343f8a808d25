"""Simulated telemetry windows are real windows: the histogram is the one `record` would build, the
window parses as a TelemetryWindow and rebuilds with `histogram_of`, and windows merge exactly."""

from __future__ import annotations

import numpy as np
import pytest

from edgesdk.protocol import TelemetryWindow
from edgesdk.protocol.histogram import LatencyHistogram, histogram_of
from edgesdk.sim import parse_behaviour
from edgesdk.sim.windows import ModelContext, draw, fake_package_id, histogram_of_samples, window


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_histogram_is_bucket_for_bucket_the_recorded_one(seed: int) -> None:
    rng = np.random.default_rng(seed)
    samples = np.concatenate([rng.lognormal(np.log(10), 1.5, 5000), [0.0, 1e-4, 0.001, 12.5, 2e5]])
    expected = LatencyHistogram()
    expected.record_many(samples.tolist())
    assert histogram_of_samples(samples) == expected


def test_a_window_parses_rebuilds_and_merges_exactly() -> None:
    behaviour = parse_behaviour({"default": {"p50_ms": 20, "error_rate": 0.05, "output_drift": 0.7,
                                             "outputs": {"score": {"mean": 1.0, "std": 0.5}}}})
    release = behaviour.for_release("det", "2.0", None)
    rng = np.random.default_rng(7)
    ctx = ModelContext("det", fake_package_id("det", "2.0"), release.variant, release.provider)
    drawn = [draw(rng, release, 60.0, 60.0) for _ in range(3)]
    windows = [TelemetryWindow.from_json(window(seq, 60.0 * seq, 60.0 * (seq + 1), ctx, d, 0).to_json())
               for seq, d in enumerate(drawn)]
    merged = LatencyHistogram()
    for w, d in zip(windows, drawn):
        rebuilt = histogram_of(w)
        assert rebuilt == d.hist  # exact: buckets, count, sum_ns, min, max
        assert w.count == rebuilt.count + w.errors and w.errors == d.errors
        assert (w.model, w.package_id, w.provider) == ("det", fake_package_id("det", "2.0"), "CPUExecutionProvider")
        assert w.extra["outputs"]["score"]["mean"] == pytest.approx(1.7, abs=0.15)
        merged.merge(rebuilt)
    assert 0.03 < sum(w.errors for w in windows) / sum(w.count for w in windows) < 0.07
    assert merged.count == sum(d.hist.count for d in drawn)
    assert merged.percentile(50) == pytest.approx(20, rel=0.1)


def test_a_partial_window_draws_calls_in_proportion_to_its_length() -> None:
    release = parse_behaviour({"default": {"calls_per_window": 1000}}).for_release("m", "1", None)
    rng = np.random.default_rng(3)
    counts = [draw(rng, release, 15.0, 60.0).hist.count for _ in range(200)]
    assert np.mean(counts) == pytest.approx(250 * 0.999, rel=0.03)
