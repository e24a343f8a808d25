"""The rollout gates as pure functions (edgesdk/fleet/rollout_gates.py): hand-built cohorts of
latencies drawn from a lognormal distribution (numpy, seeded), judged at and around each limit.

Latencies are recorded into the real `LatencyHistogram` (1 % buckets), so a "+19 %" cohort is the
baseline's own draws times 1.19: its percentile lands 1.01**k from the baseline's, 17 <= k <= 18,
clearly inside a 20 % limit, and "+21 %" lands at k = 19 or 20, clearly outside it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesdk.fleet.rollout_gates import (FAIL, NA, PASS, WAIT, ClassData, Cohort, WaveData, drift_gate,
                                         error_rate_gate, evaluate, failure_gate, latency_gates, provider_gate,
                                         psi, verdict_of)
from edgesdk.fleet.rollout_spec import GateLimits
from edgesdk.fleet.rollouts import ACTIVE, FAILED, SENT, UNKNOWN, Decision, RolloutDevice
from edgesdk.protocol.histogram import LatencyHistogram
from edgesdk.protocol.outputs import MAX_ABS, MAX_COUNT, OutputSummary

AT = 1_700_000_000.0
MIN = 500  # min_samples of every test's limits
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- builders ------------------------------------------------------------------------------------
def draws(n: int, median_ms: float, seed: int, sigma: float = 0.35) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(mean=math.log(median_ms), sigma=sigma, size=n)


def cohort(samples_ms, devices: tuple[str, ...] = ("d1",), errors: int = 0) -> Cohort:
    """A cohort whose calls are the samples (completed) plus ``errors`` failed calls."""
    hist = LatencyHistogram()
    hist.record_many(float(v) for v in samples_ms)
    return Cohort(hist=hist, calls=hist.count + errors, errors=errors, devices=set(devices) if hist.count else set())


def limits(**changes) -> GateLimits:
    return GateLimits(min_samples=MIN, **changes)


def device(device_id: str, state: str = ACTIVE, *, hw: str = "rpi", prev: str | None = None,
           new: str | None = None, reason: str | None = None) -> RolloutDevice:
    return RolloutDevice(device_id=device_id, wave=0, hardware_class=hw, target="raspberry-pi-5", package_id="b" * 64,
                         state=state, prev_package_id="a" * 64 if prev else None, prev_version="1.0" if prev else None,
                         prev_provider=prev, new_provider=new, reason=reason)


def wave(classes: dict[str, ClassData] | None = None, devices=(), **changes) -> WaveData:
    return WaveData(wave=0, devices=list(devices) or [device("d1")], classes=classes or {}, **changes)


def one_class(new: Cohort, old: Cohort | None = None, untouched: Cohort | None = None,
              had_previous: bool = True) -> dict[str, ClassData]:
    return {"rpi": ClassData(new=new, old=old or Cohort(), untouched=untouched or Cohort(), had_previous=had_previous)}


def within_a_bucket(change: float, factor: float) -> bool:
    """``change`` is what scaling every sample by ``factor`` measures through 1 % buckets (the
    evidence rounds to 4 digits)."""
    return factor / 1.0101 - 1e-4 <= 1 + change <= factor * 1.0101 + 1e-4


def p95(wave_data: WaveData, lim: GateLimits) -> Decision:
    return latency_gates(lim, wave_data, AT)[0]


def p99(wave_data: WaveData, lim: GateLimits) -> Decision:
    return latency_gates(lim, wave_data, AT)[1]


BASE = draws(4000, 10.0, seed=1)


# -- latency: boundaries -------------------------------------------------------------------------
@pytest.mark.parametrize(("gate", "factor", "limit", "verdict"), [
    (p95, 1.19, 0.20, PASS), (p95, 1.21, 0.20, FAIL), (p95, 1.00, 0.20, PASS), (p95, 0.70, 0.20, PASS),
    (p99, 1.29, 0.30, PASS), (p99, 1.31, 0.30, FAIL),
], ids=["p95+19%", "p95+21%", "p95-same", "p95-faster", "p99+29%", "p99+31%"])
def test_latency_regression_is_judged_at_its_limit(gate, factor: float, limit: float, verdict: str) -> None:
    lim = limits(max_p95_regression=limit, max_p99_regression=limit)
    data = wave(one_class(new=cohort(BASE * factor), old=cohort(BASE)))

    decision = gate(data, lim)

    assert decision.verdict == verdict, decision.summary
    entry = decision.evidence["classes"]["rpi"]
    assert entry["verdict"] == verdict
    assert within_a_bucket(entry["regression_vs_same_devices_old"], factor)
    if verdict == FAIL:
        assert decision.summary.startswith(f"p{decision.evidence['percentile']:g} on rpi:")
        assert "the same devices on the old release" in decision.summary and f"limit +{limit:.0%}" in decision.summary


def test_latency_waits_below_min_samples_on_the_new_release_and_judges_at_it() -> None:
    old = cohort(BASE)
    waiting = p95(wave(one_class(new=cohort(BASE[:MIN - 1] * 3), old=old)), limits())
    judged = p95(wave(one_class(new=cohort(BASE[:MIN] * 3), old=old)), limits())

    assert waiting.verdict == WAIT and "waiting for 500 calls" in waiting.summary
    assert waiting.evidence["classes"]["rpi"]["note"] == f"{MIN - 1} calls on the new release (< {MIN})"
    assert judged.verdict == FAIL  # 3x slower, now on enough calls


def test_failed_calls_count_towards_min_samples_but_not_the_histogram() -> None:
    new = cohort(BASE[:MIN - 10], errors=10)  # 490 timed calls + 10 failed = 500 calls

    decision = p95(wave(one_class(new=new, old=cohort(BASE))), limits())

    assert new.calls == MIN and new.hist.count == MIN - 10
    assert decision.verdict == PASS


# -- latency: per hardware class ------------------------------------------------------------------
def test_a_regression_on_one_class_fails_although_the_merged_fleet_would_pass() -> None:
    """Jetsons (2 ms, 20,000 calls) dwarf the Raspberry Pis (10 ms, 600 calls); the Pis got 50 %
    slower. Merged, the fleet's p95 sits in the Jetsons' tail and barely moves; per class it fails."""
    jetson_old, jetson_new = draws(20_000, 2.0, seed=2), draws(20_000, 2.0, seed=3)
    rpi_old = draws(600, 10.0, seed=4)
    rpi_new = rpi_old * 1.5
    classes = {
        "jetson-orin-nano": ClassData(new=cohort(jetson_new, ("j1", "j2")), old=cohort(jetson_old, ("j1", "j2")),
                                      had_previous=True),
        "raspberry-pi-5": ClassData(new=cohort(rpi_new, ("r1",)), old=cohort(rpi_old, ("r1",)), had_previous=True),
    }
    merged_old = cohort(np.concatenate([jetson_old, rpi_old]))
    merged_new = cohort(np.concatenate([jetson_new, rpi_new]))
    merged_change = merged_new.hist.percentile(95) / merged_old.hist.percentile(95) - 1
    assert merged_change <= 0.20, "the premise: the merged fleet alone would pass"

    decision = p95(wave(classes), limits())

    assert decision.verdict == FAIL
    assert decision.summary.startswith("p95 on raspberry-pi-5:") and "the same devices" in decision.summary
    per_class = decision.evidence["classes"]
    assert within_a_bucket(per_class["raspberry-pi-5"]["regression_vs_same_devices_old"], 1.5)
    assert per_class["jetson-orin-nano"]["verdict"] == PASS and per_class["raspberry-pi-5"]["verdict"] == FAIL


def test_a_class_without_new_calls_is_not_judged_and_another_class_still_is() -> None:
    classes = {"idle": ClassData(old=cohort(BASE, ("i1",)), had_previous=True),
               "rpi": ClassData(new=cohort(BASE * 1.05), old=cohort(BASE), had_previous=True)}

    decision = p95(wave(classes), limits())

    assert decision.verdict == PASS and decision.evidence["classes"]["idle"]["verdict"] == NA


# -- latency: baselines ----------------------------------------------------------------------------
def test_too_small_same_device_baseline_falls_back_to_the_untouched_devices() -> None:
    small_old = cohort(BASE[:MIN - 1])  # would say "no regression": the new release is as fast
    untouched = cohort(draws(4000, 5.0, seed=5), ("u1", "u2"))  # twice as fast as the new release

    decision = p95(wave(one_class(new=cohort(BASE), old=small_old, untouched=untouched)), limits())

    entry = decision.evidence["classes"]["rpi"]
    assert entry["same_devices_old_note"] == f"not compared: {MIN - 1} calls (< {MIN})"
    assert "regression_vs_same_devices_old" not in entry
    assert entry["regression_vs_untouched"] == pytest.approx(1.0, abs=0.1)
    assert decision.verdict == FAIL and "the untouched devices" in decision.summary


def test_untouched_baseline_passes_a_release_as_fast_as_the_rest_of_the_class() -> None:
    decision = p95(wave(one_class(new=cohort(BASE), old=Cohort(),
                                  untouched=cohort(draws(8000, 10.0, seed=6), ("u1",)))), limits())

    assert decision.verdict == PASS
    assert decision.evidence["classes"]["rpi"]["regression_vs_untouched"] == pytest.approx(0.0, abs=0.05)


def test_a_regression_only_one_baseline_shows_is_not_the_release() -> None:
    """Same devices before: +10 %; untouched devices meanwhile: +60 %: the wave's devices were
    already slower units (the untouched comparison sees the device mix, not the release). And the
    other way round, a load spike: +60 % against the same devices before, +10 % against the
    untouched devices running now. Neither is the release: both pass."""
    new = cohort(BASE * 1.6)
    device_mix = p95(wave(one_class(new=new, old=cohort(BASE * 1.45), untouched=cohort(BASE, ("u1",)))), limits())
    load_spike = p95(wave(one_class(new=new, old=cohort(BASE), untouched=cohort(BASE * 1.45, ("u1",)))), limits())

    entry = device_mix.evidence["classes"]["rpi"]
    assert within_a_bucket(entry["regression_vs_same_devices_old"], 1.6 / 1.45)
    assert within_a_bucket(entry["regression_vs_untouched"], 1.6)
    assert device_mix.verdict == PASS and load_spike.verdict == PASS


def test_a_regression_both_baselines_show_fails_and_names_both() -> None:
    decision = p95(wave(one_class(new=cohort(BASE * 1.6), old=cohort(BASE * 1.1),
                                  untouched=cohort(BASE, ("u1",)))), limits())

    assert decision.verdict == FAIL  # (histogram buckets are 1 % wide: +45 % reads +46 %, +60 % +61 %)
    assert re.search(r"on the same devices on the old release \(\+4[56]%\) and .* on the untouched devices "
                     r"\(\+6[01]%\)", decision.summary)


def test_without_a_usable_baseline_the_gate_waits() -> None:
    decision = p95(wave(one_class(new=cohort(BASE), old=cohort(BASE[:10]), untouched=cohort(BASE[:20], ("u1",)))),
                   limits())

    assert decision.verdict == WAIT and "rpi" in decision.summary
    assert decision.evidence["classes"]["rpi"]["verdict"] == WAIT


def test_first_install_has_nothing_to_compare() -> None:
    decision = p95(wave(one_class(new=cohort(BASE), had_previous=False)), limits())

    assert decision.verdict == NA and "first install" in decision.summary
    assert decision.evidence["classes"]["rpi"]["note"].startswith("first install")


@pytest.mark.parametrize("gate_of", [p95, p99])
def test_a_latency_gate_switched_off_is_not_applicable(gate_of) -> None:
    data = wave(one_class(new=cohort(BASE * 5), old=cohort(BASE)))

    decision = gate_of(data, limits(max_p95_regression=None, max_p99_regression=None))

    assert (decision.verdict, decision.summary, decision.evidence) == (NA, "off", {})


# -- error rate ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("new_errors", "verdict"), [(38, PASS), (40, PASS), (42, FAIL)])
def test_error_rate_rise_is_judged_at_its_limit(new_errors: int, verdict: str) -> None:
    """Baseline 1 % (20 of 2000); limit +1 point: 1.9 % passes, 2.0 % is at the limit, 2.1 % fails."""
    old = cohort(BASE[:1980], errors=20)
    new = cohort(BASE[:2000 - new_errors], errors=new_errors)

    decision = error_rate_gate(limits(max_error_rate_rise=0.01), wave(one_class(new=new, old=old)), AT)

    assert decision.verdict == verdict, decision.summary
    entry = decision.evidence["classes"]["rpi"]
    assert entry["baseline"] == "same_devices_old"
    assert entry["rise"] == pytest.approx(new_errors / 2000 - 0.01)
    if verdict == FAIL:
        assert decision.summary == "error rate on rpi: 2.10% vs 1.00% (+1.10 points; limit +1)"


def test_error_rate_falls_back_to_untouched_and_waits_without_any_baseline() -> None:
    new = cohort(BASE[:1900], errors=100)  # 5 %
    fallback = error_rate_gate(limits(), wave(one_class(new=new, old=cohort(BASE[:100]),
                                                       untouched=cohort(BASE[:2000], ("u1",)))), AT)
    waiting = error_rate_gate(limits(), wave(one_class(new=new, old=cohort(BASE[:100]))), AT)
    too_new = error_rate_gate(limits(), wave(one_class(new=cohort(BASE[:MIN - 1]), old=cohort(BASE))), AT)

    assert fallback.verdict == FAIL and fallback.evidence["classes"]["rpi"]["baseline"] == "untouched"
    assert waiting.verdict == WAIT and too_new.verdict == WAIT


def test_error_rate_first_install_and_off_are_not_applicable() -> None:
    new = cohort(BASE, errors=900)
    first = error_rate_gate(limits(), wave(one_class(new=new, had_previous=False)), AT)
    off = error_rate_gate(limits(max_error_rate_rise=None), wave(one_class(new=new, old=cohort(BASE))), AT)

    assert first.verdict == NA and "first install" in first.summary
    assert (off.verdict, off.summary) == (NA, "off")


# -- install failures -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("failed", "verdict"), [(0, PASS), (1, PASS), (2, FAIL)])
def test_failure_rate_is_judged_at_its_limit(failed: int, verdict: str) -> None:
    """20 resolved devices, limit 5 %: one failure is exactly 5 % (passes), two are 10 %."""
    devices = [device(f"d{i:02d}", FAILED if i < failed else ACTIVE, reason="health check failed: cosine 0.91")
               for i in range(20)]

    decision = failure_gate(limits(max_failure_rate=0.05), wave(devices=devices), AT)

    assert decision.verdict == verdict and decision.evidence["failed"] == failed
    if failed:
        assert "d00: health check failed: cosine 0.91" in decision.summary


def test_failure_rate_waits_until_a_device_resolved_and_offline_ones_never_count_as_success() -> None:
    pending = failure_gate(limits(), wave(devices=[device("d1", SENT), device("d2", UNKNOWN)]), AT)
    one_of_two = failure_gate(limits(), wave(devices=[device("d1", FAILED), device("d2", UNKNOWN)]), AT)

    assert pending.verdict == WAIT
    assert one_of_two.verdict == FAIL and "1 of 1 devices with an outcome failed" in one_of_two.summary
    assert "1 offline" in one_of_two.summary


def test_failure_gate_off() -> None:
    assert failure_gate(limits(max_failure_rate=None), wave(devices=[device("d1", FAILED)]), AT).verdict == NA


# -- provider fallback ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("before", "after", "verdict"), [
    ("TensorrtExecutionProvider", "CPUExecutionProvider", FAIL),
    ("CUDAExecutionProvider", "TensorrtExecutionProvider", PASS),
    ("CUDAExecutionProvider", "ROCMExecutionProvider", PASS),  # same class
    ("OpenVINOExecutionProvider", "CPU", FAIL),  # LiteRT's name for the CPU
    ("FancyNpuExecutionProvider", "CPUExecutionProvider", NA),  # unknown names are not judged
    ("TensorrtExecutionProvider", "SomethingNew", NA),
])
def test_provider_fallback_by_tier(before: str, after: str, verdict: str) -> None:
    decision = provider_gate(limits(), wave(devices=[device("d1", prev=before, new=after)]), AT)

    assert decision.verdict == verdict, decision.summary
    assert decision.evidence["compared"] == (0 if verdict == NA else 1)
    if verdict == FAIL:
        assert decision.summary == ("1 of 1 devices run the new release on a slower provider "
                                    f"(d1 on rpi: {before} -> {after})")


def test_provider_fallback_judges_only_active_devices_with_both_providers_known() -> None:
    devices = [device("ok", prev="CUDAExecutionProvider", new="CUDAExecutionProvider"),
               device("failed", FAILED, prev="TensorrtExecutionProvider", new="CPUExecutionProvider"),
               device("fresh", new="CPUExecutionProvider"),  # first install: nothing before
               device("odd", prev="MysteryEP", new="CPUExecutionProvider")]

    decision = provider_gate(limits(), wave(devices=devices), AT)

    assert decision.verdict == PASS and decision.evidence["compared"] == 1


def test_provider_fallback_allowed_is_not_applicable() -> None:
    data = wave(devices=[device("d1", prev="TensorrtExecutionProvider", new="CPUExecutionProvider")])
    assert provider_gate(limits(provider_fallback=False), data, AT).verdict == NA


# -- output drift: PSI ------------------------------------------------------------------------------------
def normal(mean: float, std: float, calls: int = 2000, values_per_call: int = 10) -> OutputSummary:
    count = calls * values_per_call
    return OutputSummary(calls=calls, count=count, mean=mean, m2=std * std * count)


def classes(counts: dict[int, int]) -> OutputSummary:
    rows = sum(counts.values())
    return OutputSummary(calls=rows, count=rows * 10, mean=0.1, m2=0.09 * rows * 10, argmax=counts)


def test_psi_of_identical_argmax_distributions_is_zero() -> None:
    value, method = psi(classes({0: 500, 1: 300, 7: 200}), classes({0: 500, 1: 300, 7: 200}))
    scaled, _ = psi(classes({0: 500, 1: 300, 7: 200}), classes({0: 50, 1: 30, 7: 20}))

    assert value == pytest.approx(0.0, abs=1e-12) and method == "the argmax of 3 classes"
    assert scaled < 0.01  # the same shares on ten times fewer rows (smoothing moves them a little)


def test_psi_of_a_shifted_argmax_distribution_is_a_major_shift() -> None:
    value, _ = psi(classes({0: 700, 1: 200, 2: 100}), classes({0: 200, 1: 200, 2: 600}))
    assert value > 0.25


def test_psi_of_a_class_seen_on_one_side_only_is_large_but_finite() -> None:
    value, method = psi(classes({0: 1000}), classes({0: 900, 5: 100}))
    disjoint, _ = psi(classes({3: 1000}), classes({4: 1000}))

    assert math.isfinite(value) and value > 0.25 and method == "the argmax of 2 classes"
    assert math.isfinite(disjoint) and disjoint > value


def test_psi_of_a_one_sigma_mean_shift_is_about_one() -> None:
    """For two unit normals, PSI over ever finer bins tends to their symmetric KL divergence,
    (delta mu / sigma)**2 = 1; ten equal-probability bins see a little less of it."""
    value, method = psi(normal(0.0, 1.0), normal(1.0, 1.0))
    scaled, _ = psi(normal(100.0, 20.0), normal(120.0, 20.0))  # the same shift in other units

    assert 0.85 <= value <= 1.0 and method.startswith("10 bins of the old distribution (mean/std)")
    assert scaled == pytest.approx(value, rel=1e-9)


def test_psi_of_the_same_normal_distribution_is_zero() -> None:
    assert psi(normal(3.0, 0.5), normal(3.0, 0.5))[0] == pytest.approx(0.0, abs=1e-12)
    assert psi(normal(3.0, 0.5), normal(3.0 + 0.05 * 0.5, 0.5))[0] < 0.01  # a twentieth of a sigma


def test_psi_of_constant_outputs_is_zero_when_equal_and_very_large_when_not() -> None:
    same, method = psi(normal(7.0, 0.0), normal(7.0, 0.0))
    moved, _ = psi(normal(7.0, 0.0), normal(7.5, 0.0))
    assert same == 0.0 and method.startswith("a constant output")
    assert math.isfinite(moved) and moved > 10  # all the mass moved to another bin (bins floored at 1e-4)


def test_psi_of_an_output_that_became_constant_is_large_but_finite() -> None:
    value, _ = psi(normal(0.0, 1.0), normal(0.0, 0.0))
    assert math.isfinite(value) and value > 0.25


def test_psi_of_a_constant_output_that_became_spread_is_large() -> None:
    value, _ = psi(normal(0.0, 0.0), normal(0.0, 1.0))
    assert math.isfinite(value) and value > 0.25


# -- output drift: the gate -----------------------------------------------------------------------------
def drift(old: dict[str, OutputSummary], new: dict[str, OutputSummary], **changes) -> Decision:
    return drift_gate(limits(**changes), wave(outputs_old=old, outputs_new=new, had_previous=True), AT)


def test_drift_gate_passes_stable_outputs_and_fails_a_shift() -> None:
    stable = drift({"y": normal(0, 1), "cls": classes({0: 600, 1: 400})},
                   {"y": normal(0.02, 1), "cls": classes({0: 590, 1: 410})})
    shifted = drift({"y": normal(0, 1), "cls": classes({0: 600, 1: 400})},
                    {"y": normal(1, 1), "cls": classes({0: 590, 1: 410})})

    assert stable.verdict == PASS and "largest PSI" in stable.summary
    assert shifted.verdict == FAIL and shifted.summary.startswith("output y drifted: PSI 0.9")
    assert shifted.evidence["outputs"]["y"]["method"].startswith("10 bins of the old distribution (mean/std)")


def test_drift_gate_fails_a_constant_output_that_changed() -> None:
    decision = drift({"flag": normal(1.0, 0.0)}, {"flag": normal(0.0, 0.0)})

    assert decision.verdict == FAIL and decision.evidence["outputs"]["flag"]["psi"] > 10
    assert decision.summary.startswith("output flag drifted: PSI")


def test_drift_gate_waits_for_enough_summarized_calls() -> None:
    at_limit = drift({"y": normal(0, 1, calls=MIN)}, {"y": normal(5, 1, calls=MIN)})
    below = drift({"y": normal(0, 1, calls=MIN)}, {"y": normal(5, 1, calls=MIN - 1)})
    nothing = drift({}, {})

    assert at_limit.verdict == FAIL
    assert below.verdict == WAIT and below.summary == f"waiting for {MIN} summarized calls per side on y"
    assert nothing.verdict == WAIT and "--max-drift off" in nothing.summary


def test_drift_gate_notes_an_output_on_one_side_only_without_judging_it() -> None:
    decision = drift({"y": normal(0, 1), "old_only": normal(0, 1)}, {"y": normal(0, 1), "new_only": normal(9, 1)})

    assert decision.verdict == PASS
    assert decision.evidence["outputs"]["old_only"] == {"note": "only on the old release"}
    assert decision.evidence["outputs"]["new_only"] == {"note": "only on the new release"}


def test_drift_gate_first_install_and_off_are_not_applicable() -> None:
    first = drift_gate(limits(), wave(outputs_old={}, outputs_new={"y": normal(0, 1)}, had_previous=False), AT)
    off = drift({"y": normal(0, 1)}, {"y": normal(9, 1)}, max_drift=None)

    assert first.verdict == NA and "first install" in first.summary
    assert (off.verdict, off.summary) == (NA, "off")


def test_drift_gate_fails_a_release_whose_outputs_all_became_nan() -> None:
    nan_outputs = OutputSummary(calls=2000, count=0, nonfinite=20_000)  # what the agent sends for all-NaN outputs

    decision = drift({"y": normal(0, 1)}, {"y": nan_outputs})
    some_nan = drift({"y": normal(0, 1)}, {"y": OutputSummary(calls=2000, count=18_000, mean=0.0, m2=18_000.0,
                                                              nonfinite=2_000)})

    assert decision.verdict == FAIL
    assert some_nan.verdict == FAIL  # 10 % of the values became NaN: its own bin


# -- every gate together ------------------------------------------------------------------------------
def test_evaluate_returns_every_gate_in_a_fixed_order() -> None:
    data = wave(one_class(new=cohort(BASE), old=cohort(BASE)),
                devices=[device("d1", prev="CPUExecutionProvider", new="CPUExecutionProvider")],
                outputs_old={"y": normal(0, 1)}, outputs_new={"y": normal(0, 1)}, had_previous=True)

    decisions = evaluate(limits(), data, AT)

    assert [d.gate for d in decisions] == ["failure-rate", "p95-regression", "p99-regression", "error-rate",
                                           "provider-fallback", "output-drift"]
    assert [d.verdict for d in decisions] == [PASS] * 6 and verdict_of(decisions) == PASS
    assert all(d.wave == 0 and d.at == AT for d in decisions)


def _d(verdict: str) -> Decision:
    return Decision(0, AT, "g", verdict, "")


@pytest.mark.parametrize(("verdicts", "expected"), [
    ([PASS, PASS], PASS), ([PASS, NA], PASS), ([NA, NA], PASS), ([], PASS),
    ([PASS, WAIT, NA], WAIT), ([WAIT, FAIL, PASS], FAIL), ([FAIL], FAIL),
])
def test_verdict_of_fail_beats_wait_beats_pass(verdicts: list[str], expected: str) -> None:
    assert verdict_of(_d(v) for v in verdicts) == expected


# -- properties -----------------------------------------------------------------------------------------
_counts = st.integers(min_value=1, max_value=10**9)
_spread = st.builds(normal, mean=st.floats(-1e6, 1e6), std=st.floats(1e-3, 1e3), calls=_counts)
_maybe_constant = st.builds(normal, mean=st.floats(-1e6, 1e6), std=st.just(0.0), calls=_counts)
_argmax = st.builds(classes, st.dictionaries(st.integers(0, 999), st.integers(0, 10**9), min_size=1, max_size=50))


@FUZZ
@given(st.one_of(st.tuples(_spread, st.one_of(_spread, _maybe_constant)),
                 st.tuples(_maybe_constant, _spread),
                 st.tuples(_argmax, _argmax)))
def test_psi_is_non_negative_and_finite_for_non_degenerate_summaries(pair) -> None:
    old, new = pair
    value, method = psi(old, new)
    assert math.isfinite(value) and value >= 0.0, (value, method)


_valid_number = st.floats(-MAX_ABS, MAX_ABS, allow_nan=False) | st.integers(-10**6, 10**6)
_valid_count = st.integers(0, MAX_COUNT)


@st.composite
def valid_summary(draw) -> OutputSummary:
    """Anything `OutputSummary.from_dict` accepts from a device."""
    count = draw(st.one_of(st.just(0), st.integers(1, 1000), _valid_count))
    data = {"count": count, "calls": draw(_valid_count), "nonfinite": draw(_valid_count),
            "mean": None if count == 0 else draw(_valid_number),
            "std": None if count == 0 else draw(st.floats(0, MAX_ABS) | st.just(0.0))}
    if draw(st.booleans()):
        data["argmax"] = draw(st.dictionaries(st.integers(0, 999).map(str), _valid_count, max_size=20))
    return OutputSummary.from_dict(data, "fuzz")


@FUZZ
@given(valid_summary(), valid_summary())
def test_psi_and_the_drift_gate_never_raise_on_valid_summaries(old: OutputSummary, new: OutputSummary) -> None:
    value, method = psi(old, new)
    assert not math.isnan(value) and value >= 0.0, (value, method)

    decision = drift_gate(GateLimits(min_samples=1), wave(outputs_old={"y": old}, outputs_new={"y": new},
                                                          had_previous=True), AT)
    assert decision.verdict in (PASS, FAIL, WAIT)


def test_drift_gate_falls_back_to_the_untouched_devices_when_the_same_devices_ran_the_old_release_briefly() -> None:
    """The wave's devices ran the old release too briefly to have enough summarized calls: the
    untouched devices' outputs meanwhile are the baseline (said in the evidence); a shift against
    them fails, the same outputs pass."""
    brief = {"y": normal(0, 1, calls=MIN - 1)}
    shifted = drift_gate(limits(), wave(outputs_old=brief, outputs_untouched={"y": normal(0, 1)},
                                        outputs_new={"y": normal(1, 1)}, had_previous=True), AT)
    same = drift_gate(limits(), wave(outputs_old=brief, outputs_untouched={"y": normal(0, 1)},
                                     outputs_new={"y": normal(0, 1)}, had_previous=True), AT)
    neither = drift_gate(limits(), wave(outputs_old=brief, outputs_new={"y": normal(0, 1)}, had_previous=True), AT)

    assert shifted.verdict == FAIL and shifted.evidence["outputs"]["y"]["baseline"] == "untouched"
    assert same.verdict == PASS
    assert neither.verdict == WAIT and neither.evidence["outputs"]["y"]["baseline"] == "same_devices_old"
