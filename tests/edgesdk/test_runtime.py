"""edgesdk.runtime and edgesdk.benchmark on tiny models run by the real runtimes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesdk import runtime
from edgesdk.benchmark import LatencyStats, latency_stats, time_session
from edgesdk.errors import CalibrationDataError, ConfigError, ModelError, RuntimeUnavailableError
from edgesdk.manifest import TensorSpec

W = (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.0) / 7.0
B = np.array([0.5, -1.0, 0.25, 2.0], dtype=np.float32)
HAS_LITERT = importlib.util.find_spec("ai_edge_litert") is not None


def _matmul_add(path: Path) -> Path:
    """x [N,3] → y = x·W + B [N,4], z = Relu(y): two outputs, to check their order."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["y"]),
         helper.make_node("Relu", ["y"], ["z"])],
        "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _tiny_tflite(path: Path, const: np.ndarray) -> Path:
    """y = x + const, x [-1,4] float32, written with LiteRT's flatbuffer schema (no TensorFlow needed)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT()
    model.version = 3
    buffers = [s.BufferT() for _ in range(4)]  # buffer 0 is the empty sentinel by convention
    buffers[1].data = np.frombuffer(const.astype(np.float32).tobytes(), np.uint8)
    model.buffers = buffers

    def tensor(name: str, buffer: int, signature: list[int]) -> s.TensorT:
        t = s.TensorT()
        t.name, t.buffer, t.type = name, buffer, s.TensorType.FLOAT32
        t.shape, t.shapeSignature = [1, 4], signature
        return t

    graph = s.SubGraphT()
    graph.tensors = [tensor("x", 2, [-1, 4]), tensor("c", 1, [1, 4]), tensor("y", 3, [-1, 4])]
    graph.inputs, graph.outputs = [0], [2]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.AddOptions, s.AddOptionsT()
    graph.operators = [op]
    model.operatorCodes, model.subgraphs = [code], [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return _matmul_add(tmp_path / "matmul_add.onnx")


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)


# -- onnxruntime ----------------------------------------------------------------------------------
def test_ort_cpu_session_gives_the_numpy_result_in_output_order(model: Path, x: np.ndarray) -> None:
    with runtime.open_session(model, "onnxruntime", "CPUExecutionProvider", threads=1) as session:
        out = session.run({"x": x})
        assert list(out) == ["y", "z"] == session.output_names
        np.testing.assert_allclose(out["y"], x @ W + B, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out["z"], np.maximum(x @ W + B, 0), rtol=1e-6, atol=1e-6)
        assert session.inputs == [TensorSpec("x", "float32", ("N", 3))]
        assert (session.runtime, session.provider) == ("onnxruntime", "CPUExecutionProvider")
        assert session.config == {"intra_op_num_threads": 1}


def test_requesting_absent_provider_raises_runtime_unavailable(model: Path) -> None:
    with pytest.raises(RuntimeUnavailableError, match="CUDAExecutionProvider is not available"):
        runtime.open_session(model, "onnxruntime", "CUDAExecutionProvider")


def test_silent_ort_fallback_to_cpu_is_detected(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the probe saw CUDA (as onnxruntime-gpu lists it even without CUDA libraries);
    # onnxruntime then really falls back to CPU with only a warning.
    monkeypatch.setattr(runtime, "_probe_providers", lambda: {
        "onnxruntime": ("CUDAExecutionProvider", "CPUExecutionProvider")})
    with pytest.raises(RuntimeUnavailableError,
                       match="requested CUDAExecutionProvider but onnxruntime gave CPUExecutionProvider"):
        runtime.open_session(model, "onnxruntime", "CUDAExecutionProvider")


@pytest.mark.parametrize("rt, provider", [("onnxruntime", "CPUExecutionProvider"), ("openvino", "CPU")])
def test_corrupt_model_raises_one_line_model_error(tmp_path: Path, rt: str, provider: str) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="bad.onnx") as info:
        runtime.open_session(bad, rt, provider)
    assert "\n" not in str(info.value) and "Exception from" not in str(info.value)


@pytest.mark.parametrize("rt, provider", [("onnxruntime", "CPUExecutionProvider"), ("openvino", "CPU"),
                                          ("litert", "XNNPACK")])
def test_missing_model_file_raises_model_error(tmp_path: Path, rt: str, provider: str) -> None:
    if rt not in runtime.available_providers():
        pytest.skip(f"{rt} not installed")
    with pytest.raises(ModelError, match="model file not found"):
        runtime.open_session(tmp_path / "absent.onnx", rt, provider)


def test_unknown_runtime_and_option_are_rejected(model: Path) -> None:
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime 'tensorrt'"):
        runtime.open_session(model, "tensorrt", "GPU")
    with pytest.raises(ConfigError, match="option 'inference_precision_hint' is not known"):
        runtime.open_session(model, "onnxruntime", "CPUExecutionProvider",
                             {"inference_precision_hint": "f16"})
    with pytest.raises(ConfigError, match="threads"):
        runtime.open_session(model, "onnxruntime", "CPUExecutionProvider", threads=0)


def test_feeds_with_wrong_names_are_rejected(model: Path, x: np.ndarray) -> None:
    session = runtime.open_session(model, "onnxruntime", "CPUExecutionProvider")
    with pytest.raises(CalibrationDataError, match="lack input 'x'"):
        session.run({"input": x})
    with pytest.raises(CalibrationDataError, match="unknown input 'extra'"):
        session.run({"x": x, "extra": x})
    with pytest.raises(ModelError, match="onnxruntime run failed"):
        session.run({"x": x.astype(np.float64)})  # wrong dtype: the runtime's error, wrapped


def test_closed_session_refuses_to_run(model: Path, x: np.ndarray) -> None:
    with runtime.open_session(model, "onnxruntime", "CPUExecutionProvider") as session:
        pass
    with pytest.raises(ModelError, match="closed"):
        session.run({"x": x})


# -- OpenVINO -------------------------------------------------------------------------------------
def test_openvino_on_onnx_and_on_ir_matches_onnxruntime(model: Path, x: np.ndarray, tmp_path: Path) -> None:
    import openvino as ov

    ir = tmp_path / "ir" / "model.xml"
    ov.save_model(ov.Core().read_model(str(model)), str(ir), compress_to_fp16=False)
    expected = runtime.open_session(model, "onnxruntime", "CPUExecutionProvider").run({"x": x})
    for path in (model, ir):
        with runtime.open_session(path, "openvino", "CPU", threads=1) as session:
            out = session.run({"x": x})
            assert list(out) == ["y", "z"]
            for name in out:
                np.testing.assert_allclose(out[name], expected[name], rtol=0, atol=1e-5)
            assert session.inputs == [TensorSpec("x", "float32", ("?", 3))]
            out["y"][:] = 0  # the session handed back a copy, not its own buffer
            assert np.abs(session.run({"x": x})["y"]).max() > 0


def test_openvino_cpu_defaults_to_f32_precision(model: Path) -> None:
    # OpenVINO CPU picks bf16 by itself on AVX-512-BF16/AMX machines; we ask for f32 unless told.
    session = runtime.open_session(model, "openvino", "CPU")
    assert session.config["INFERENCE_PRECISION_HINT"] == "f32"
    assert session.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert session.compiled.get_property("PERFORMANCE_HINT") == "LATENCY"


def test_openvino_precision_hint_option_is_passed_and_checked(model: Path) -> None:
    session = runtime.open_session(model, "openvino", "CPU", {"inference_precision_hint": "bf16"}, threads=2)
    assert session.config["INFERENCE_PRECISION_HINT"] == "bf16"
    assert session.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    with pytest.raises(ConfigError, match="inference_precision_hint: 'fp8'"):
        runtime.open_session(model, "openvino", "CPU", {"inference_precision_hint": "fp8"})


# -- LiteRT ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_LITERT, reason="ai_edge_litert not installed")
@pytest.mark.parametrize("provider", ["XNNPACK", "CPU"])
def test_litert_session_runs_tflite_and_resizes_batch(tmp_path: Path, provider: str) -> None:
    const = np.array([[1.0, -2.0, 3.0, 0.5]], np.float32)
    path = _tiny_tflite(tmp_path / "add.tflite", const)
    with runtime.open_session(path, "litert", provider, threads=1) as session:
        assert session.inputs == [TensorSpec("x", "float32", ("?", 4))]
        for batch in (1, 3, 1):
            x = np.random.default_rng(batch).normal(size=(batch, 4)).astype(np.float32)
            out = session.run({"x": x})
            assert list(out) == ["y"]
            np.testing.assert_allclose(out["y"], x + const, rtol=1e-6)


# -- what is installed ----------------------------------------------------------------------------
def test_available_providers_lists_the_installed_runtimes() -> None:
    found = runtime.available_providers(refresh=True)
    assert "CPUExecutionProvider" in found["onnxruntime"]
    assert "CPU" in found["openvino"]
    assert all("." not in device for device in found["openvino"])  # GPU.0 → GPU
    assert ("litert" in found) == HAS_LITERT
    if HAS_LITERT:
        assert found["litert"] == ["XNNPACK", "CPU"]
    found["onnxruntime"].append("Bogus")  # callers get a copy; the cache stays intact
    assert "Bogus" not in runtime.available_providers()["onnxruntime"]


def test_runtime_versions_name_each_installed_runtime() -> None:
    import onnxruntime
    import openvino

    versions = runtime.runtime_versions()
    assert versions["onnxruntime"] == onnxruntime.__version__
    assert versions["openvino"] == openvino.get_version()
    assert ("litert" in versions) == HAS_LITERT


def test_importing_runtime_and_validation_loads_no_runtime() -> None:
    heavy = ("onnxruntime", "openvino", "ai_edge_litert", "onnx")  # the agent must not pay for these
    code = ("import sys, json, edgesdk.runtime, edgesdk.validation, edgesdk.benchmark; "
            f"print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout) == []


# -- benchmark ------------------------------------------------------------------------------------
STEP = 1 / 64  # seconds; a power of two, so sums of steps are exact in floating point


class _FakeClockSession:
    """A session whose every run takes exactly `step_s` on an injected clock."""

    def __init__(self, step_s: float) -> None:
        self.now = 0.0
        self.step_s = step_s
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def run(self, feeds: object) -> dict:
        self.now += self.step_s
        self.calls += 1
        return {}


@pytest.mark.parametrize("budget_s, runs, expected_runs", [
    (None, 20, 20),      # no budget: all runs
    (10 * STEP, 50, 7),  # 3 warm-up steps + timed runs until 10 steps are spent
    (0.0, 50, 3),        # budget gone already: still the minimum of 3 timed runs
    (0.0, 2, 2),         # ...unless fewer runs were asked for
])
def test_time_session_stops_at_budget_after_minimum_runs(budget_s: float | None, runs: int,
                                                         expected_runs: int) -> None:
    session = _FakeClockSession(step_s=STEP)
    stats = time_session(session, {}, warmup=3, runs=runs, budget_s=budget_s, clock=session.clock)
    assert stats.runs == expected_runs
    assert session.calls == 3 + expected_runs
    assert stats.p50_ms == pytest.approx(STEP * 1000) and stats.max_ms == pytest.approx(STEP * 1000)


def test_time_session_times_a_real_session(model: Path, x: np.ndarray) -> None:
    session = runtime.open_session(model, "onnxruntime", "CPUExecutionProvider", threads=1)
    stats = time_session(session, {"x": x}, warmup=2, runs=10)
    assert stats.runs == 10
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p95_ms <= stats.p99_ms <= stats.max_ms
    assert json.loads(json.dumps(stats.to_dict()))["runs"] == 10


def test_latency_stats_percentiles_and_bad_input() -> None:
    stats = latency_stats([float(v) for v in range(1, 101)])
    assert stats == LatencyStats(runs=100, p50_ms=50.5, p95_ms=pytest.approx(95.05),
                                 p99_ms=pytest.approx(99.01), mean_ms=50.5, min_ms=1.0, max_ms=100.0)
    with pytest.raises(ConfigError, match="no latency samples"):
        latency_stats([])
    with pytest.raises(ConfigError, match="runs"):
        time_session(_FakeClockSession(0.01), {}, runs=0)
