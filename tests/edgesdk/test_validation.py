"""edgesdk.validation: metrics, the accuracy gate, and the device health check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesdk import runtime
from edgesdk.errors import HealthCheckError, PackagingError
from edgesdk.profiles import Gate
from edgesdk.validation import compare_outputs, evaluate_gate, health_check, health_tolerance

GATE = Gate(cosine_min=0.99, top1_min=0.95, spread_ratio_min=0.5, task_metric_drop_max=0.02)


def _logits(n: int = 40, classes: int = 10, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"logits": rng.normal(0, 3, (1, classes)).astype(np.float32)} for _ in range(n)]


def _copy(samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return [{k: v.copy() for k, v in s.items()} for s in samples]


def test_identical_outputs_pass_the_gate() -> None:
    ref = _logits()
    metrics = compare_outputs(ref, _copy(ref))
    m = metrics["logits"]
    assert (m.cosine, m.max_abs_error, m.top1_agreement, m.min_spread_ratio) == (1.0, 0.0, 1.0, 1.0)
    assert m.class_like and m.collapsed_channels == 0 and m.nonfinite == 0 and m.exact_match is None
    result = evaluate_gate(metrics, GATE)
    assert result.passed and result.failures == []


def _scores_collapsed_to_constant() -> tuple[list, list]:
    """N×8 detector head: 4 box channels ~1e2..1e3 and 4 score channels ~1e-3; int8 flattened the scores."""
    rng = np.random.default_rng(1)
    ref, cand = [], []
    for _ in range(50):
        boxes = rng.uniform(100, 1000, (1, 4))
        scores = rng.uniform(0, 2e-3, (1, 4))
        ref.append({"dets": np.concatenate([boxes, scores], 1).astype(np.float32)})
        cand.append({"dets": np.concatenate([boxes * 1.001, np.zeros((1, 4))], 1).astype(np.float32)})
    return ref, cand


def _yolo_classes_zeroed() -> tuple[list, list]:
    """1×84×A YOLO-style output (4 box rows ~1e2, 80 class rows in 0..1); every class score became 0."""
    rng = np.random.default_rng(2)
    ref, cand = [], []
    for _ in range(8):
        out = np.concatenate([rng.uniform(0, 640, (1, 4, 200)), rng.uniform(0, 1, (1, 80, 200)) ** 4], 1)
        ref.append({"output0": out.astype(np.float32)})
        broken = out.copy()
        broken[:, 4:, :] = 0.0
        cand.append({"output0": broken.astype(np.float32)})
    return ref, cand


def _nchw_channel_constant() -> tuple[list, list]:
    """N×C×H×W feature map where channel 2 (small values) became its mean."""
    rng = np.random.default_rng(3)
    ref = [{"feat": (rng.normal(0, 1, (1, 4, 6, 6)) * np.array([50, 40, 0.05, 30])[None, :, None, None])
            .astype(np.float32)} for _ in range(10)]
    cand = _copy(ref)
    for s in cand:
        s["feat"][:, 2] = 0.0
    return ref, cand


@pytest.mark.parametrize("build, name, channels", [
    (_scores_collapsed_to_constant, "dets", 4),
    (_yolo_classes_zeroed, "output0", 80),
    (_nchw_channel_constant, "feat", 1),
])
def test_collapsed_channels_fail_even_though_cosine_looks_fine(build, name: str, channels: int) -> None:
    ref, cand = build()
    m = compare_outputs(ref, cand)[name]
    assert m.cosine > 0.99  # what a cosine-only gate would have shipped
    assert m.collapsed_channels == channels and m.min_spread_ratio == 0.0
    result = evaluate_gate({name: m}, Gate(cosine_min=0.99))
    assert not result.passed
    assert result.failures == [f"output {name!r}: {channels} collapsed channels (spread ratio 0.00 < 0.5)"]


def test_top1_disagreement_fails_the_gate() -> None:
    ref = _logits(n=20)
    cand = _copy(ref)
    for s in cand[:2]:  # swap the winning and the runner-up class in 2 of 20 samples
        row = s["logits"][0]
        first, second = np.argsort(row)[-1], np.argsort(row)[-2]
        row[first], row[second] = row[second], row[first]
    m = compare_outputs(ref, cand)["logits"]
    assert m.top1_agreement == pytest.approx(0.9) and m.disagreements == 2
    result = evaluate_gate({"logits": m}, Gate(cosine_min=0.5, top1_min=0.95))
    assert result.failures == ["output 'logits': top-1 agreement 0.9000 < 0.95"]


def test_sequence_outputs_agree_per_position() -> None:
    rng = np.random.default_rng(4)
    ref = [{"seq": rng.normal(size=(1, 25, 30)).astype(np.float32)} for _ in range(4)]
    cand = _copy(ref)
    cand[0]["seq"][0, 3] = -cand[0]["seq"][0, 3]  # one position of 100 now has another winner
    m = compare_outputs(ref, cand)["seq"]
    # random normal scores over 30 classes: some positions' top two are within 1 % of the scale
    decided = 100 - m.tied_positions
    assert 0 < m.tied_positions < 20
    assert m.class_like and m.top1_agreement == pytest.approx(1 - 1 / decided) and m.disagreements == 1


def test_a_flip_between_near_tied_scores_is_not_a_top1_disagreement() -> None:
    # A detector's background anchors: every class score near 0, so their top-1 is rounding noise.
    # The one confident anchor flipping must still count.
    ref = np.full((1, 6, 3), 0.001, np.float32)
    ref[0, :, 1] = 0.0012  # background: class 1 leads by 0.0002 (0.02 % of the scale)
    ref[0, 0] = [0.1, 0.9, 0.05]  # one confident anchor
    noisy = ref.copy()
    noisy[0, 1:, 0] = 0.0013  # background anchors flip to class 0
    m = compare_outputs([{"scores": ref}], [{"scores": noisy}])["scores"]
    assert m.tied_positions == 5 and m.top1_agreement == 1.0 and m.disagreements == 0
    wrong = noisy.copy()
    wrong[0, 0] = [0.9, 0.1, 0.05]  # the confident anchor changes class
    m = compare_outputs([{"scores": ref}], [{"scores": wrong}])["scores"]
    assert m.top1_agreement == 0.0 and m.disagreements == 1


def test_nan_in_candidate_fails_and_metrics_stay_json_safe() -> None:
    ref = _logits(n=5)
    cand = _copy(ref)
    cand[3]["logits"][0, 4] = np.nan
    metrics = compare_outputs(ref, cand)
    assert metrics["logits"].nonfinite == 1
    json.dumps(metrics["logits"].to_dict(), allow_nan=False)  # NaN/inf become null
    result = evaluate_gate(metrics, GATE)
    assert result.failures == ["output 'logits': 1 nonfinite values (NaN/Inf)"]


def test_matching_nonfinite_reference_values_are_not_counted() -> None:
    ref = [{"masked": np.array([[0.5, -np.inf, 1.5]], np.float32)}]
    m = compare_outputs(ref, _copy(ref))["masked"]
    assert m.nonfinite == 0 and m.cosine == 1.0 and m.max_abs_error == 0.0


@pytest.mark.parametrize("variant_score, passed", [(0.90, False), (0.97, True)])
def test_task_metric_drop_beyond_gate_fails(variant_score: float, passed: bool) -> None:
    ref = _logits(n=5)
    result = evaluate_gate(compare_outputs(ref, _copy(ref)), GATE, task=(0.98, variant_score))
    assert result.passed is passed
    assert result.task == {"reference": 0.98, "variant": variant_score,
                           "drop": pytest.approx(0.98 - variant_score)}
    if not passed:
        assert result.failures == ["task metric dropped 0.0800 (0.9800 → 0.9000) > 0.02"]


def test_cosine_and_max_abs_error_gates() -> None:
    ref = _logits(n=10)
    cand = [{"logits": s["logits"] + 0.3 * np.random.default_rng(i).normal(size=s["logits"].shape)
             .astype(np.float32)} for i, s in enumerate(ref)]
    m = compare_outputs(ref, cand)["logits"]
    assert 0.9 < m.cosine < 0.999 and m.max_abs_error > 0.1
    failures = evaluate_gate({"logits": m}, Gate(cosine_min=0.9999, max_abs_error=0.1)).failures
    assert [f.split(":")[1].split()[0] for f in failures] == ["cosine", "max"]


def test_cosine_of_zero_vectors() -> None:
    zeros = [{"o": np.zeros((1, 3), np.float32)}]
    ones = [{"o": np.ones((1, 3), np.float32)}]
    assert compare_outputs(zeros, _copy(zeros))["o"].cosine == 1.0
    assert compare_outputs(ones, zeros)["o"].cosine == 0.0


def test_integer_outputs_are_gated_on_exact_match() -> None:
    labels = np.arange(20, dtype=np.int64) % 7
    ref = [{"label": labels[i:i + 1]} for i in range(20)]
    cand = _copy(ref)
    cand[0]["label"][0] += 1
    m = compare_outputs(ref, cand)["label"]
    assert m.exact_match == pytest.approx(0.95) and not m.class_like and m.top1_agreement is None
    assert m.min_spread_ratio is None
    assert evaluate_gate({"label": m}, Gate(cosine_min=0.99, top1_min=0.95)).passed
    assert evaluate_gate({"label": m}, Gate(cosine_min=0.99, top1_min=0.99)).failures == [
        "output 'label': exact match 0.9500 < 0.99"]


@pytest.mark.parametrize("cand, message", [
    ([{"logits": np.zeros((1, 10), np.float32)}] * 2, "2 candidate samples"),
    ([{"probs": np.zeros((1, 10), np.float32)}], "output 'logits': missing from candidate sample 0"),
    ([{"logits": np.zeros((1, 9), np.float32)}], r"output 'logits': candidate shape \(1, 9\) differs"),
])
def test_mismatched_outputs_raise_packaging_error(cand: list, message: str) -> None:
    with pytest.raises(PackagingError, match=message):
        compare_outputs(_logits(n=1), cand)


# -- health check ---------------------------------------------------------------------------------
def test_health_tolerance_adds_margins_to_host_metrics() -> None:
    ref = _logits(n=30)
    cand = [{"logits": s["logits"] + np.float32(0.01)} for s in ref]
    metrics = compare_outputs(ref, cand)
    m = metrics["logits"]
    tol = health_tolerance(metrics)
    assert tol["cosine_min"] == pytest.approx(m.cosine - 0.01, abs=1e-6)
    assert tol["max_abs"] == pytest.approx(2 * m.max_abs_error + 0.01 * m.reference_absmax + 1e-4)
    assert tol["top1_min"] == pytest.approx(0.9)
    assert health_tolerance({"o": compare_outputs(ref, [{"logits": -s["logits"]} for s in ref])["logits"]
                             })["cosine_min"] == 0.5  # clamped


def test_health_check_passes_near_identical_and_fails_perturbed() -> None:
    ref = _logits(n=8)
    tol = health_tolerance(compare_outputs(ref, _copy(ref)))
    near = [{"logits": s["logits"] + np.float32(1e-5)} for s in ref]
    assert health_check(ref, near, tol).passed
    rng = np.random.default_rng(9)
    garbage = [{"logits": rng.normal(0, 3, (1, 10)).astype(np.float32)} for _ in ref]
    result = health_check(ref, garbage, tol)
    assert not result.passed
    assert {f.split(":")[1].split()[0] for f in result.failures} == {"cosine", "max", "agreement"}
    json.dumps(result.to_dict(), allow_nan=False)


def test_health_check_forgives_one_flip_but_not_two() -> None:
    ref = _logits(n=8)
    tol = {"top1_min": 0.95}
    cand = _copy(ref)
    for i in range(2):
        row = cand[i]["logits"][0]
        row[np.argmin(row)] = row.max() + 1
        if i == 0:
            assert health_check(ref, cand, tol).passed  # 7/8 agree: one near-tie is noise
    assert health_check(ref, cand, tol).failures == ["output 'logits': agreement 0.7500 < 0.95 (2 differ)"]


def test_health_check_fails_on_nan_and_wrong_shape_without_raising() -> None:
    ref = _logits(n=3)
    cand = _copy(ref)
    cand[1]["logits"][0, 0] = np.inf
    assert health_check(ref, cand, {}).failures == ["output 'logits': 1 nonfinite values (NaN/Inf)"]
    result = health_check(ref, [{"logits": np.zeros((2, 10), np.float32)}] * 3, {})
    assert not result.passed and "shape" in result.failures[0]


# -- with real sessions ---------------------------------------------------------------------------
def _linear(path: Path, w: np.ndarray) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["scores"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_real_variant_with_a_dead_channel_fails_and_openvino_fp32_passes(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    w = rng.normal(size=(16, 6)) * np.array([10, 10, 10, 10, 10, 0.01])  # channel 5: small but alive
    broken_w = w.copy()
    broken_w[:, 5] = 0.0
    fp32 = _linear(tmp_path / "fp32.onnx", w)
    broken = _linear(tmp_path / "broken.onnx", broken_w)
    feeds = [{"x": rng.normal(size=(1, 16)).astype(np.float32)} for _ in range(30)]
    ref_session = runtime.open_session(fp32, "onnxruntime", "CPUExecutionProvider")
    reference = [ref_session.run(f) for f in feeds]

    ov_session = runtime.open_session(fp32, "openvino", "CPU")
    ov_outputs = [ov_session.run(f) for f in feeds]
    ov_metrics = compare_outputs(reference, ov_outputs)
    assert evaluate_gate(ov_metrics, GATE).passed
    assert health_check(reference, ov_outputs, health_tolerance(ov_metrics)).passed

    broken_session = runtime.open_session(broken, "onnxruntime", "CPUExecutionProvider")
    metrics = compare_outputs(reference, [broken_session.run(f) for f in feeds])
    assert metrics["scores"].cosine > 0.9999
    assert not evaluate_gate(metrics, GATE).passed
    assert metrics["scores"].collapsed_channels == 1


# -- the health check's own errors ------------------------------------------------------------------
@pytest.mark.parametrize("reference, tolerance, message", [
    ([], {}, "no reference outputs"),
    ([{"logits": np.array(["a", "b"])}], {}, "not a numeric array"),
    ([{"logits": [[1.0, 2.0]]}], {}, "not a numeric array"),
    ([1, 2], {}, "not a mapping"),
    (None, {"cosine_min": "0.9"}, "tolerance cosine_min must be a finite number"),
    (None, {"max_abs": float("nan")}, "tolerance max_abs must be a finite number"),
    (None, {"top1_min": True}, "tolerance top1_min must be a finite number"),
    (None, ["cosine_min"], "tolerance must be a mapping"),
], ids=["no-reference", "string-reference", "list-reference", "not-mappings", "string-tolerance",
        "nan-tolerance", "bool-tolerance", "tolerance-not-a-mapping"])
def test_health_check_failure_is_health_check_error(reference, tolerance, message: str) -> None:
    reference = _logits(n=2) if reference is None else reference
    candidate = _copy(_logits(n=2))

    with pytest.raises(HealthCheckError, match=message) as err:
        health_check(reference, candidate, tolerance)

    assert not isinstance(err.value, PackagingError)  # the packager's error never comes from a device check
    assert "\n" not in str(err.value)


def test_health_check_of_garbage_candidate_outputs_fails_without_raising() -> None:
    ref = _logits(n=2)
    for candidate in ([{"logits": np.array([["x"] * 10])}] * 2, [{"logits": object()}] * 2, [None, None],
                      _copy(ref)[:1]):
        result = health_check(ref, candidate, {"cosine_min": 0.9})
        assert not result.passed and result.failures, candidate
