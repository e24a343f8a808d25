"""Simulated telemetry windows are real windows: the histogram is the one `record` would build, the
window parses as a TelemetryWindow and rebuilds with `histogram_of`, and windows merge exactly; latency noise
(jitter, device_spread) scales a window as a whole, stays in its band and is the same for the same seed."""

from __future__ import annotations

import numpy as np
import pytest

from edgesdk.broker import parse_broker_url
from edgesdk.protocol import TelemetryWindow
from edgesdk.protocol.histogram import LatencyHistogram, histogram_of
from edgesdk.sim import SimConfig, SimDevice, Simulator, StartRelease, parse_behaviour
from edgesdk.sim.behaviour import Z95
from edgesdk.sim.windows import (ModelContext, device_factor, draw, draw_load, fake_package_id, histogram_of_samples,
                                  window)


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


# -- latency noise: jitter (per device and window) and device_spread (per device and release) ----------

def release(**entry: object):  # noqa: ANN201
    return parse_behaviour({"default": entry}).for_release("det", "1.0", None)


@pytest.mark.parametrize("entry", [{}, {"jitter": 0, "device_spread": 0}])
def test_without_noise_a_seed_draws_exactly_what_plain_numpy_draws(entry: dict) -> None:
    # The reference is numpy's own sequence (Poisson, binomial, lognormal, normal): no extra draw
    # may sneak in when the noise keys are 0 or absent, or every seeded run would change.
    b = release(p50_ms=12, error_rate=0.02, **entry)
    got = draw(np.random.default_rng(11), b, 60.0, 60.0)
    ref = np.random.default_rng(11)
    calls = int(ref.poisson(b.calls_per_window))
    errors = int(ref.binomial(calls, b.error_rate))
    expected = histogram_of_samples(ref.lognormal(np.log(12), b.sigma, calls - errors))
    values = ref.normal(0.0, 1.0, calls - errors)
    assert got.hist == expected and got.errors == errors
    assert got.outputs["output"]["mean"] == float(values.mean())


@pytest.mark.parametrize("jitter, load", [(0.15, 1.0), (0.15, -1.0), (0.9, -0.999), (0.3, 0.25)])
def test_jitter_scales_every_latency_of_the_window_by_one_factor(jitter: float, load: float) -> None:
    # Same seed, load given (so no extra draw): the same samples, each times 1 + jitter * load.
    plain = draw(np.random.default_rng(4), release(), 60.0, 60.0)
    noisy = draw(np.random.default_rng(4), release(jitter=jitter), 60.0, 60.0, load=load)
    factor = 1 + jitter * load
    assert noisy.hist.count == plain.hist.count and noisy.errors == plain.errors
    assert noisy.hist.max == pytest.approx(plain.hist.max * factor, rel=1e-9)
    assert noisy.hist.min == pytest.approx(plain.hist.min * factor, rel=1e-9)
    assert noisy.hist.sum_ns == pytest.approx(plain.hist.sum_ns * factor, rel=1e-6)
    for q in (50, 95, 99):  # percentiles read from log1.01 buckets: within one bucket of the factor
        assert noisy.hist.percentile(q) / plain.hist.percentile(q) == pytest.approx(factor, rel=0.011)


def test_p95_over_many_jittered_windows_stays_within_the_band_and_fills_it() -> None:
    # The benchmark's noise: +-15 %. Every window's p95 lies in [0.85, 1.15] x the release's p95
    # (give or take the sampling error of a 600-call window), and the windows spread over the band.
    jitter, n = 0.15, 600
    nominal_p95 = 10.0 * np.exp(Z95 * 0.25)
    rng = np.random.default_rng(21)
    noisy = np.array([draw(rng, release(jitter=jitter), 60.0, 60.0).hist.percentile(95) for _ in range(n)])
    quiet = np.array([draw(rng, release(), 60.0, 60.0).hist.percentile(95) for _ in range(n)])
    ratio, quiet_ratio = noisy / nominal_p95, quiet / nominal_p95
    sampling = quiet_ratio.std()  # one window's own p95 noise, measured rather than assumed
    assert 0.01 < sampling < 0.06
    assert ratio.min() > (1 - jitter) - 4 * sampling and ratio.max() < (1 + jitter) + 4 * sampling
    assert ratio.min() < 1 - 0.8 * jitter and ratio.max() > 1 + 0.8 * jitter  # the band is used, both ends
    assert ratio.mean() == pytest.approx(quiet_ratio.mean(), abs=0.015)  # +-15 % around the same centre
    # U[1-j, 1+j] has std j/sqrt(3); it adds to the sampling noise in quadrature.
    assert ratio.std() == pytest.approx(np.hypot(jitter / np.sqrt(3), sampling), rel=0.12)


def test_device_factors_lie_in_the_band_spread_evenly_and_depend_only_on_seed_and_device() -> None:
    spread = 0.2
    factors = np.array([device_factor(7, i, spread) for i in range(5000)])
    assert factors.min() >= 1 - spread and factors.max() <= 1 + spread
    # uniform: each tenth of the band holds ~500 of 5000 (binomial sd ~21)
    counts, _ = np.histogram(factors, bins=10, range=(1 - spread, 1 + spread))
    assert counts.min() > 420 and counts.max() < 580
    assert device_factor(7, 3, spread) == factors[3]  # again: the same
    assert device_factor(8, 3, spread) != factors[3]  # another seed
    assert device_factor(7, 3, 0.0) == 1.0


def test_a_device_draws_every_release_with_its_own_fixed_factor() -> None:
    b = release(device_spread=0.3, error_rate=0)
    dev = SimDevice(42, "sim-00042", "f", None, {}, 60.0, seed=5)
    dev.activate("det", "1.0", fake_package_id("det", "1.0"), b, 0.0)
    dev.activate("det", "2.0", fake_package_id("det", "2.0"), b, 20.0)  # replaced mid-window
    windows = dev.roll(60.0, np.random.default_rng(9), send=True)
    # The same seed drawing the two parts by hand, each with its release's factor, gives the same windows.
    ref = np.random.default_rng(9)
    f1 = f2 = device_factor(5, 42, 0.3)  # the device's, whatever the release
    assert 0.7 <= f1 <= 1.3 and f1 != device_factor(5, 43, 0.3)
    parts = sorted([(fake_package_id("det", "1.0"), 20.0, f1), (fake_package_id("det", "2.0"), 40.0, f2)])
    expected = [draw(ref, b, seconds, 60.0, scale=f).hist for _, seconds, f in parts]  # the device's order
    assert [w.package_id for w in windows] == [package_id for package_id, _, _ in parts]
    assert [histogram_of(w) for w in windows] == expected


def test_a_device_shares_one_load_between_the_windows_of_one_roll() -> None:
    b = release(jitter=0.5, error_rate=0)
    dev = SimDevice(1, "sim-00001", "f", None, {}, 60.0)
    dev.activate("a", "1", fake_package_id("a", "1"), b, 0.0)
    dev.activate("b", "1", fake_package_id("b", "1"), b, 0.0)
    windows = dev.roll(60.0, np.random.default_rng(2), send=True)
    ref = np.random.default_rng(2)
    load = draw_load(ref)
    assert -1.0 <= load < 1.0
    assert [histogram_of(w) for w in windows] == [draw(ref, b, 60.0, 60.0, load=load).hist for _ in range(2)]


def simulated(seed: int, devices: int, first: int = 0) -> dict[str, float]:
    behaviour = parse_behaviour({"default": {"device_spread": 0.25}})
    config = SimConfig(parse_broker_url("mqtt://127.0.0.1:1"), "f", devices, first_index=first, seed=seed,
                       behaviour=behaviour, start_with=(StartRelease("det", "1.0", fake_package_id("det", "1.0")),))
    return {dev.device_id: dev.models["det"].scale for dev in Simulator(config).devices}  # no connection yet


def test_the_simulator_gives_each_device_the_same_factor_in_every_run_with_the_same_seed() -> None:
    first = simulated(seed=3, devices=40)
    assert simulated(seed=3, devices=40) == first
    assert len(set(first.values())) == 40  # devices of one class are not identical
    assert simulated(seed=4, devices=40) != first
    # a second simulator process running sim-00030.. (--first 30) agrees with the first one
    assert simulated(seed=3, devices=10, first=30) == {d: f for d, f in first.items() if d >= "sim-00030"}
