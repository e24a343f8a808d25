"""The INT8 repair loop's stopping rules, and the ranking's collapse measure.

The loop is driven with a scripted attempt function and a fake clock, so the budget rules are
checked without building models (the end-to-end repair is in test_runner.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgesdk.pipeline.progress import SilentReporter
from edgesdk.pipeline.repair import Attempt, min_spread_ratio, repair_int8
from edgesdk.validation import GateResult, compare_outputs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def failed(kind: str, label: str, options: dict) -> Attempt:
    built = SimpleNamespace(kind=kind, quantized_nodes=3, files=["unused"])
    return Attempt(label=label, options=options, exclude=(), built=built,
                   gate=GateResult(False, ["output 'y': cosine 0.5 < 0.98"]))


def scripted(clock: Clock, seconds: float, kind: str = "openvino-int8"):
    """An attempt function that fails and takes ``seconds`` of the fake clock; logs its calls."""
    calls: list[str] = []

    def attempt(options: dict, exclude: tuple[str, ...], label: str) -> Attempt:
        calls.append(label)
        clock.now += seconds
        return failed(kind, label, options)

    return attempt, calls


def test_remedy_runs_when_the_budget_left_covers_one_more_attempt():
    clock = Clock()
    attempt, calls = scripted(clock, seconds=10)

    _, remedies = repair_int8(failed("openvino-int8", "a0", {}), attempt, SilentReporter(), max_float_nodes=0,
                              reference_model=None, samples=[], budget_s=60, clock=clock, first_seconds=10)

    assert calls == ["r1"]  # the `mixed` preset
    assert [r["name"] for r in remedies] == ["nncf preset mixed"]


def test_remedy_is_skipped_when_less_budget_is_left_than_an_attempt_takes():
    clock = Clock()
    attempt, calls = scripted(clock, seconds=35)

    _, remedies = repair_int8(failed("openvino-int8", "a0", {}), attempt, SilentReporter(), max_float_nodes=0,
                              reference_model=None, samples=[], budget_s=30, clock=clock, first_seconds=35)

    assert calls == []
    (record,) = remedies
    assert record["name"] == "budget"
    assert "30 s left, less than one attempt of openvino-int8 takes here (~35 s)" in record["error"]


def test_the_mean_of_the_attempts_so_far_predicts_the_next_one():
    # a0 took 5 s; the first remedy 45 s: mean 25 s > the 20 s left after it, so no third.
    clock = Clock()
    durations = iter([45.0, 5.0])

    def attempt(options, exclude, label):
        clock.now += next(durations)
        return failed("onnx-int8", label, options)

    _, remedies = repair_int8(failed("onnx-int8", "a0", {"per_channel": False}), attempt, SilentReporter(),
                              max_float_nodes=0, reference_model=None, samples=[], budget_s=65, clock=clock,
                              first_seconds=5)

    assert [r["name"] for r in remedies] == ["per-channel weights", "budget"]
    assert "~25 s" in remedies[-1]["error"]


def test_without_a_first_time_only_the_spent_budget_stops_the_repair():
    clock = Clock()
    attempt, calls = scripted(clock, seconds=50)

    repair_int8(failed("openvino-int8", "a0", {}), attempt, SilentReporter(), max_float_nodes=0,
                reference_model=None, samples=[], budget_s=30, clock=clock)

    assert calls == ["r1"]


# -- the ranking's collapse measure ---------------------------------------------------------------


def _collapsing(shape: tuple[int, ...], seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    refs = [rng.normal(0, 1, shape).astype(np.float32) for _ in range(6)]
    cands = [r + rng.normal(0, 0.05, shape).astype(np.float32) for r in refs]
    channel_axis = 1 if len(shape) != 3 else 2
    for c in cands:  # channel 0 of the channel axis collapses to a constant, channel 1 halves
        index = [slice(None)] * len(shape)
        if len(shape) > 1:
            index[channel_axis] = 0
            c[tuple(index)] = 0.25
            index[channel_axis] = 1
            c[tuple(index)] *= 0.3
    return refs, cands


@pytest.mark.parametrize("shape", [(1, 4), (1, 6, 5), (1, 3, 4, 4), (1, 2, 3, 4, 5), (7,)])
def test_ranking_spread_ratio_is_the_gates_spread_ratio(shape):
    refs, cands = _collapsing(shape, seed=len(shape))

    gate_value = compare_outputs([{"t": r} for r in refs], [{"t": c} for c in cands])["t"].min_spread_ratio

    assert min_spread_ratio(refs, cands) == pytest.approx(gate_value, rel=1e-6, abs=1e-9)


def test_ranking_spread_ratio_ignores_constant_channels_and_integer_tensors():
    constant = [np.ones((1, 3, 2, 2), np.float32) for _ in range(4)]
    labels = [np.arange(4).reshape(1, 4) for _ in range(4)]

    assert min_spread_ratio(constant, constant) is None
    assert min_spread_ratio(labels, labels) is None


# -- the node search's trend rule -------------------------------------------------------------------


def node_search(monkeypatch, failures_by_size: dict[int, list[str]], max_float_nodes: int = 8) -> list[dict]:
    """Run the repair of an onnx-int8 attempt whose option remedy fails and whose node search
    gives ``failures_by_size[count]``; return the remedy log."""
    monkeypatch.setattr("edgesdk.pipeline.repair.rank_sensitive_nodes",
                        lambda *args: [f"n{i}" for i in range(max_float_nodes)])

    def attempt(options, exclude, label):
        found = failed("onnx-int8", label, options)
        if exclude:
            found.gate = GateResult(False, failures_by_size[len(exclude)])
        found.exclude = exclude
        return found

    _, remedies = repair_int8(failed("onnx-int8", "a0", {}), attempt, SilentReporter(),
                              max_float_nodes=max_float_nodes, reference_model=object(), samples=[],
                              budget_s=600, clock=Clock())
    return remedies


def test_node_search_stops_after_three_sizes_fail_alike(monkeypatch):
    same = ["output 'y': top-1 agreement 0.8750 < 0.95"]

    remedies = node_search(monkeypatch, {1: same, 2: same, 4: same, 8: same})

    names = [r["name"] for r in remedies]
    assert names == ["calibration percentile", "1 most sensitive node(s) in float",
                     "2 most sensitive node(s) in float", "4 most sensitive node(s) in float", "trend"]
    assert remedies[-1]["error"].startswith("1, 2, 4 nodes in float failed alike")


def test_node_search_goes_on_while_the_failures_change(monkeypatch):
    remedies = node_search(monkeypatch, {n: [f"output 'y': top-1 agreement 0.{80 + n}00 < 0.95"] for n in (1, 2, 4, 8)})

    assert [r["name"] for r in remedies][-1] == "8 most sensitive node(s) in float"
    assert "trend" not in [r["name"] for r in remedies]


def _quantized_collapsing_model(tmp_path):  # noqa: ANN001, ANN202
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from tests.fixtures.tiny_models import collapsing_model, random_samples

    from edgesdk.pipeline.graph_stats import ensure_node_names

    model = collapsing_model(tmp_path / "head.onnx")
    onnx.save(ensure_node_names(onnx.load(str(model.path))), str(model.path))  # as the packager does
    calibration = random_samples((32,), 64, seed=1)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter({"features": x[None]} for x in calibration)

        def get_next(self):  # noqa: ANN202
            return next(self.items, None)

    int8_path = tmp_path / "head.int8.onnx"
    quantize_static(str(model.path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    samples = [{"features": x[None]} for x in random_samples((32,), 8, seed=2)]
    return onnx.load(str(model.path)), int8_path, samples


def test_ranking_names_the_collapsing_head_first(tmp_path) -> None:  # noqa: ANN001
    from edgesdk.pipeline.repair import rank_sensitive_nodes

    reference, int8_path, samples = _quantized_collapsing_model(tmp_path)
    ranked = rank_sensitive_nodes(reference, int8_path, samples)
    gemm = next(n.name for n in reference.graph.node if n.op_type == "Gemm")
    assert ranked[0] == gemm  # the head is the one that collapses


def test_ranking_that_would_hold_too_many_tensors_is_skipped_not_run_out_of_memory(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    # A 800x608 layout detector's intermediate tensors are ~1.7 GB per sample and model: the
    # ranking held them for 8 samples of both models and the packager was OOM-killed at 24 GB.
    from edgesdk.pipeline import repair

    reference, int8_path, samples = _quantized_collapsing_model(tmp_path)
    one_sample = 64 * 4 * 3 + 8 * 4  # more than any one sample's tensors of this model is not needed
    monkeypatch.setattr(repair, "RANK_MEMORY_BYTES", one_sample)  # room for less than 2 samples
    assert repair.rank_sensitive_nodes(reference, int8_path, samples) == []
