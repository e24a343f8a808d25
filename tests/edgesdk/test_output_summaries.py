"""Output summaries (a telemetry window's ``extra["outputs"]``): statistics against numpy, merging
equal to summarizing the concatenation, argmax of classifier-like outputs, and reading hostile
JSON from any device (only ProtocolError, one line) or the simulator's older 3-key form."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgesdk.errors import ProtocolError
from edgesdk.protocol import MAX_JSON_BYTES, TelemetryWindow
from edgesdk.protocol.histogram import BOUNDS, LatencyHistogram
from edgesdk.protocol.outputs import (MAX_ARGMAX_CLASSES_PER_WINDOW, MAX_CLASSES, MAX_OUTPUTS_PER_MODEL,
                                      MAX_OUTPUTS_PER_WINDOW, OutputSummary, merge_summaries, parse_window_outputs,
                                      summarize_outputs, window_outputs)
from edgesdk.sim.behaviour import ReleaseBehaviour
from edgesdk.sim.windows import HEARTBEAT, ModelContext, draw, window

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _summary(*arrays: np.ndarray) -> OutputSummary:
    summary = OutputSummary()
    for arr in arrays:
        summary.add(arr)
    return summary


def _expected(values: np.ndarray) -> tuple[int, float | None, float | None, int]:
    """(count, mean, std, nonfinite) by numpy in float64 over every element."""
    flat = values.astype(np.float64).reshape(-1)
    finite = flat[np.isfinite(flat)]
    if finite.size == 0:
        return 0, None, None, int(flat.size)
    return int(finite.size), float(finite.mean()), float(finite.std()), int(flat.size - finite.size)


# -- statistics of one call ------------------------------------------------------------------------
@pytest.mark.parametrize("arr", [
    np.random.default_rng(1).normal(5.0, 3.0, (1, 10)).astype(np.float32),  # small: Python floats
    np.random.default_rng(2).normal(-2.0, 0.5, (1, 84, 8400)).astype(np.float32),  # detector head
    np.random.default_rng(3).normal(1e6, 1.0, (4, 1000)).astype(np.float64),  # large mean, small spread
    np.random.default_rng(4).normal(0.0, 1.0, (2, 70_000)).astype(np.float16),
    np.random.default_rng(5).integers(-5, 100, (3, 50)).astype(np.int64),
    np.array([True, False, True, True]),
    np.float32(3.5),  # a scalar output
], ids=["f32-small", "f32-detector", "f64-offset", "f16", "int64", "bool", "scalar"])
def test_one_call_summary_matches_numpy_over_every_element(arr: np.ndarray) -> None:
    summary = _summary(arr)
    count, mean, std, nonfinite = _expected(np.asarray(arr))
    assert (summary.calls, summary.count, summary.nonfinite) == (1, count, nonfinite)
    # float32 data is accumulated in float32 (chunked, corrected): the mean is within 1e-7 std
    assert summary.mean == pytest.approx(mean, rel=1e-12, abs=1e-7 * std + 1e-12)
    assert summary.std == pytest.approx(std, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("size", [8, 4096, 200_000], ids=["small", "large", "several-chunks"])
def test_nan_and_inf_are_counted_apart_and_left_out_of_mean_and_std(size: int) -> None:
    values = np.tile(np.array([1.0, np.nan, 3.0, np.inf, -np.inf, 1.0, 3.0, np.nan], dtype=np.float32), size // 8)
    summary = _summary(values.reshape(1, -1))
    assert (summary.count, summary.nonfinite) == (size // 2, size // 2)
    assert summary.mean == pytest.approx(2.0) and summary.std == pytest.approx(1.0)


def test_float32_values_whose_sum_overflows_float32_are_still_summarized() -> None:
    values = np.full(10_000, 3e38, dtype=np.float32)  # the float32 sum is inf; the values are finite
    summary = _summary(values)
    assert (summary.count, summary.nonfinite) == (10_000, 0)
    assert summary.mean == pytest.approx(float(np.float32(3e38)), rel=1e-6)
    assert summary.std == pytest.approx(0.0, abs=1e-6 * 3e38)


def test_float64_values_beyond_1e100_count_as_nonfinite_so_the_summary_stays_representable() -> None:
    summary = _summary(np.array([1e300, -1e300, 2.0, 4.0] * 100))
    assert (summary.count, summary.nonfinite) == (200, 200)
    assert summary.mean == pytest.approx(3.0)
    json.dumps(summary.to_dict(), allow_nan=False)


def test_an_output_with_only_nonfinite_values_has_no_mean_or_std() -> None:
    summary = _summary(np.full((1, 5), np.nan, dtype=np.float32))
    assert summary.to_dict() == {"calls": 1, "count": 0, "mean": None, "std": None, "nonfinite": 5}


def test_refuses_a_non_numeric_array() -> None:
    with pytest.raises(ValueError, match="dtype"):
        OutputSummary().add(np.array(["cat", "dog"]))


# -- argmax -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype,classifier", [
    ((10,), np.float32, True),
    ((1, 10), np.float32, True),
    ((8, 2), np.float64, True),
    ((1, MAX_CLASSES), np.float32, True),
    ((1, MAX_CLASSES + 1), np.float32, False),  # wider: features, not classes
    ((4, 1), np.float32, False),  # one score per row
    ((1, 3, 10), np.float32, False),  # rank 3: a map, not a class choice
    ((4, 10), np.int64, False),  # integer outputs are labels already
])
def test_argmax_is_counted_only_for_classifier_like_outputs(shape: tuple[int, ...], dtype: type,
                                                            classifier: bool) -> None:
    arr = np.random.default_rng(7).normal(size=shape).astype(dtype)
    summary = _summary(arr)
    if classifier:
        want = np.bincount(arr.reshape(-1, shape[-1]).argmax(axis=1), minlength=shape[-1])
        assert summary.argmax == {i: int(n) for i, n in enumerate(want) if n}
        assert summary.to_dict()["argmax"] == {str(i): int(n) for i, n in enumerate(want) if n}
    else:
        assert summary.argmax == {} and "argmax" not in summary.to_dict()


def test_rows_holding_a_nan_choose_no_class() -> None:
    logits = np.array([[0.0, 5.0, 1.0], [np.nan, 0.0, 9.0], [7.0, np.inf, 0.0], [3.0, 0.0, 0.0]], dtype=np.float32)
    assert _summary(logits).argmax == {1: 2, 0: 1}


# -- merging ----------------------------------------------------------------------------------------
_VALUES = st.one_of(st.floats(-1e6, 1e6, width=32), st.sampled_from([np.nan, np.inf, -np.inf]))


@st.composite
def _calls(draw: Any) -> list[np.ndarray]:
    """Several calls of one classifier-like output ([rows, classes], rows varying per call)."""
    classes = draw(st.integers(2, 12))
    # rows * classes up to 2000: both the Python-float path (<= 64 values) and the numpy path run
    shapes = st.integers(0, 160).map(lambda rows: (rows, classes))
    elements = st.one_of(_VALUES, st.floats(-1e6, 1e6, width=32))
    return draw(st.lists(hnp.arrays(np.float32, shapes, elements=elements), min_size=1, max_size=6))


@FUZZ
@given(_calls())
def test_merging_per_call_summaries_equals_summarizing_the_concatenation(calls: list[np.ndarray]) -> None:
    merged = OutputSummary()
    for arr in calls:
        merged.merge(_summary(arr))
    together = _summary(np.concatenate(calls))
    assert merged.calls == len(calls) and together.calls == 1
    assert (merged.count, merged.nonfinite, merged.argmax) == (together.count, together.nonfinite, together.argmax)
    count, mean, std, nonfinite = _expected(np.concatenate(calls))
    assert (merged.count, merged.nonfinite) == (count, nonfinite)
    if count:
        scale = float(np.max(np.abs(np.concatenate(calls)[np.isfinite(np.concatenate(calls))]), initial=1.0))
        assert merged.mean == pytest.approx(mean, rel=1e-9, abs=1e-7 * std + 1e-12 * scale)
        assert merged.std == pytest.approx(std, rel=1e-6, abs=1e-6 * scale)
    else:
        assert merged.mean is None and merged.std is None


def test_merge_is_the_same_in_either_order_and_leaves_the_other_unchanged() -> None:
    rng = np.random.default_rng(11)
    a, b = _summary(rng.normal(0, 1, (30, 5))), _summary(rng.normal(10, 3, (70, 5)))
    b_before = b.to_dict()
    ab, ba = a.copy(), b.copy()
    ab.merge(b)
    ba.merge(a)
    assert (ab.calls, ab.count, ba.calls, ba.count) == (2, 500, 2, 500)
    assert (ab.mean, ab.std) == pytest.approx((ba.mean, ba.std), rel=1e-12)
    assert ab.argmax == ba.argmax and b.to_dict() == b_before


def test_merge_summaries_merges_per_name_into_new_objects() -> None:
    rng = np.random.default_rng(12)
    first = summarize_outputs({"logits": rng.normal(size=(1, 4)).astype(np.float32), "box": np.ones((1, 4))})
    second = summarize_outputs({"logits": rng.normal(size=(1, 4)).astype(np.float32)})
    before = {name: s.to_dict() for name, s in first.items()}
    merged = merge_summaries([first, second])
    assert merged["logits"].calls == 2 and merged["box"].calls == 1
    assert sum(merged["logits"].argmax.values()) == 2
    assert {name: s.to_dict() for name, s in first.items()} == before


def test_summarize_outputs_skips_strings_and_keeps_the_first_16_names_sorted() -> None:
    outputs: dict[str, Any] = {f"o{i:02d}": np.full((1, 3), i, dtype=np.float32) for i in range(20)}
    outputs["a_label"] = np.array(["cat"])
    outputs["a_zipmap"] = [{"cat": 0.9}]  # onnxruntime's seq(map) outputs are Python lists
    summaries = summarize_outputs(outputs)
    assert list(summaries) == [f"o{i:02d}" for i in range(MAX_OUTPUTS_PER_MODEL)]
    assert summaries["o03"].mean == 3.0


# -- the wire format ----------------------------------------------------------------------------
def test_to_dict_round_trips_through_strict_json() -> None:
    summary = _summary(np.random.default_rng(13).normal(size=(16, 10)).astype(np.float32),
                       np.array([[np.nan] * 10], dtype=np.float32))
    data = json.loads(json.dumps(summary.to_dict(), allow_nan=False))
    assert set(data) == {"calls", "count", "mean", "std", "nonfinite", "argmax"}
    back = OutputSummary.from_dict(data, "test")
    assert (back.calls, back.count, back.nonfinite, back.argmax) == (2, 160, 10, summary.argmax)
    assert (back.mean, back.std) == pytest.approx((summary.mean, summary.std), rel=1e-12)


def test_accepts_the_three_key_form_the_simulator_sends() -> None:
    behaviour = ReleaseBehaviour(outputs={"score": (0.5, 0.1), "box": (3.0, 2.0)}, output_drift=0.25)
    drawn = draw(np.random.default_rng(14), behaviour, seconds=60.0, interval_s=60.0)
    sent = window(0, 0.0, 60.0, ModelContext("m", "ab" * 32), drawn, 0)
    assert set(sent.extra["outputs"]["score"]) == {"count", "mean", "std"}
    parsed = parse_window_outputs(json.loads(sent.to_json())["extra"], "devices/d/telemetry")
    assert set(parsed) == {"score", "box"}
    score = parsed["score"]
    assert (score.calls, score.count, score.nonfinite, score.argmax) == (drawn.outputs["score"]["count"],) * 2 + (0, {})
    assert (score.mean, score.std) == pytest.approx((drawn.outputs["score"]["mean"], drawn.outputs["score"]["std"]))
    quiet = window(1, 60.0, 120.0, HEARTBEAT, draw(np.random.default_rng(0), ReleaseBehaviour(calls_per_window=0.0),
                                                   60.0, 60.0), 0)
    assert all(s.count == 0 and s.mean is None for s in parse_window_outputs(quiet.extra, "t").values())


_GOOD = {"calls": 3, "count": 30, "mean": 0.5, "std": 0.25, "nonfinite": 1, "argmax": {"0": 2, "7": 1}}


@pytest.mark.parametrize("change,complaint", [
    ({"count": True}, "'count' must be an integer"),
    ({"count": -1}, "'count' must be in 0..2\\*\\*53"),
    ({"count": 2 ** 53 + 1}, "'count' must be in"),
    ({"count": 10 ** 5000}, "'count' must be in"),
    ({"count": 30.0}, "'count' must be an integer"),
    ({"calls": -3}, "'calls' must be in"),
    ({"nonfinite": False}, "'nonfinite' must be an integer"),
    ({"mean": math.nan}, "'mean' must be a finite number"),
    ({"mean": math.inf}, "'mean' must be a finite number"),
    ({"mean": 1e101}, "'mean' must be a finite number within"),
    ({"mean": -(10 ** 400)}, "'mean' must be a finite number within"),
    ({"mean": True}, "'mean' must be a number"),
    ({"mean": "0.5"}, "'mean' must be a number"),
    ({"mean": None}, "'mean' must be a number"),
    ({"std": -0.1}, "'std' must not be negative"),
    ({"count": 0}, "'mean' must be null when 'count' is 0"),
    ({"argmax": [1, 2]}, "'argmax' must be an object"),
    ({"argmax": {"-1": 1}}, "not a class index"),
    ({"argmax": {"01": 1}}, "not a class index"),
    ({"argmax": {"1000": 1}}, "not a class index"),
    ({"argmax": {"1.0": 1}}, "not a class index"),
    ({"argmax": {"\u0663": 1}}, "not a class index"),  # an Arabic-Indic digit: str.isdigit() says yes
    ({"argmax": {"3": True}}, "count of class 3"),
    ({"argmax": {"3": -1}}, "count of class 3"),
    ({"argmax": {"3": 2 ** 60}}, "count of class 3"),
    ({"argmax": {str(i): 1 for i in range(MAX_CLASSES)} | {"x": 1}}, "more than 1000"),
])
def test_from_dict_refuses_hostile_fields_in_one_line_naming_where(change: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint) as caught:
        OutputSummary.from_dict(_GOOD | change, "devices/cam-01/telemetry: extra.outputs['logits']")
    assert str(caught.value).startswith("devices/cam-01/telemetry: extra.outputs['logits']: ")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


def test_from_dict_refuses_what_is_not_an_object() -> None:
    for value in (None, [], "x", 3, True):
        with pytest.raises(ProtocolError, match="expected an object"):
            OutputSummary.from_dict(value, "w")


def test_from_dict_keeps_the_largest_legal_values_representable() -> None:
    huge = OutputSummary.from_dict({"calls": 2 ** 53, "count": 2 ** 53, "mean": -1e100, "std": 1e100,
                                    "nonfinite": 2 ** 53, "argmax": {"999": 2 ** 53}}, "w")
    huge.merge(huge.copy())
    json.dumps(huge.to_dict(), allow_nan=False)
    assert huge.std == pytest.approx(1e100)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10 ** 400), 10 ** 400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
_KEYS = st.sampled_from(["calls", "count", "mean", "std", "nonfinite", "argmax"])
_ARGMAX = st.dictionaries(st.one_of(st.from_regex(r"[0-9]{1,4}", fullmatch=True), st.text(max_size=4)),
                          st.one_of(st.integers(-2, 2 ** 54), st.booleans(), _JSON), max_size=6)
_NEAR_VALID = st.fixed_dictionaries({}, optional={
    "calls": st.one_of(st.integers(-1, 2 ** 54), _JSON), "count": st.one_of(st.integers(-1, 2 ** 54), _JSON),
    "mean": st.one_of(st.floats(), st.integers(), _JSON), "std": st.one_of(st.floats(), st.integers(), _JSON),
    "nonfinite": st.one_of(st.integers(-1, 2 ** 54), _JSON), "argmax": st.one_of(_ARGMAX, _JSON)})


def _usable(summary: OutputSummary) -> None:
    """What parsed must serialise as strict JSON and read back the same (std up to rounding: it
    travels as std and is kept as M2 = std^2 * count)."""
    text = json.dumps(summary.to_dict(), allow_nan=False)
    back = OutputSummary.from_dict(json.loads(text), "again").to_dict()
    want = summary.to_dict()
    back_std, want_std = back.pop("std"), want.pop("std")
    assert back_std == want_std or back_std == pytest.approx(want_std, rel=1e-12, abs=1e-150)  # std^2 underflows
    assert back == want


@FUZZ
@given(st.one_of(_JSON, _NEAR_VALID, st.dictionaries(_KEYS, _JSON)))
def test_from_dict_on_arbitrary_json_raises_only_protocol_error(data: Any) -> None:
    try:
        summary = OutputSummary.from_dict(data, "fuzz")
    except ProtocolError as exc:
        assert str(exc).startswith("fuzz") and "\n" not in str(exc)
        return
    _usable(summary)
    merged = summary.copy()
    merged.merge(summary)
    json.dumps(merged.to_dict(), allow_nan=False)


@FUZZ
@given(st.one_of(_JSON, st.dictionaries(st.text(max_size=4), st.one_of(_NEAR_VALID, _JSON), max_size=8)))
def test_parse_window_outputs_never_raises(outputs: Any) -> None:
    for extra in ({"outputs": outputs}, outputs):
        parsed = parse_window_outputs(extra, "fuzz")
        assert len(parsed) <= MAX_OUTPUTS_PER_WINDOW
        for summary in parsed.values():
            _usable(summary)


def test_parse_window_outputs_drops_bad_entries_keeps_good_ones_and_logs_at_debug(
        caplog: pytest.LogCaptureFixture) -> None:
    extra = {"outputs": {"logits": _GOOD, "bad": _GOOD | {"count": -1}, "": _GOOD, "x" * 300: _GOOD,
                         "worse": "not an object"}}
    with caplog.at_level(logging.DEBUG, logger="edgesdk.protocol.outputs"):
        parsed = parse_window_outputs(extra, "devices/cam-01/telemetry")
    assert list(parsed) == ["logits"] and parsed["logits"].argmax == {0: 2, 7: 1}
    assert {r.levelno for r in caplog.records} == {logging.DEBUG}
    assert any("'bad'" in r.getMessage() and "'count'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("extra", [None, [], "outputs", {}, {"outputs": None}, {"outputs": [_GOOD]},
                                   {"outputs": "x"}])
def test_parse_window_outputs_of_no_or_malformed_outputs_is_empty(extra: Any) -> None:
    assert parse_window_outputs(extra, "w") == {}


def test_parse_window_outputs_keeps_at_most_64_outputs_first_by_name() -> None:
    extra = {"outputs": {f"o{i:03d}": _GOOD for i in range(100)}}
    parsed = parse_window_outputs(extra, "w")
    assert list(parsed) == [f"o{i:03d}" for i in range(MAX_OUTPUTS_PER_WINDOW)]


def test_a_window_of_the_widest_classifiers_stays_under_the_message_limit() -> None:
    # 16 outputs of 1000 classes, every class chosen 10**6 times, and every latency bucket used.
    widest = {f"head{i:02d}": OutputSummary(calls=10 ** 6, count=10 ** 9, mean=0.5, m2=1e9, nonfinite=0,
                                            argmax={c: 10 ** 6 for c in range(MAX_CLASSES)})
              for i in range(MAX_OUTPUTS_PER_MODEL)}
    outputs = window_outputs(widest)
    with_argmax = [name for name, data in outputs.items() if "argmax" in data]
    assert with_argmax == sorted(widest)[:MAX_ARGMAX_CLASSES_PER_WINDOW // MAX_CLASSES]
    assert all(set(data) >= {"calls", "count", "mean", "std", "nonfinite"} for data in outputs.values())
    hist = LatencyHistogram()
    for bound in BOUNDS:
        hist.record(bound * 0.999)
    message = TelemetryWindow(seq=10 ** 12, window_start=0.0, window_end=60.0, count=10 ** 6, errors=0,
                              histogram=hist.to_bounds(), model="m" * 64, extra={"outputs": outputs}).to_json()
    assert len(message) < MAX_JSON_BYTES * 0.75
    assert len(parse_window_outputs(json.loads(message)["extra"], "w")) == MAX_OUTPUTS_PER_MODEL
