"""OpenVINO IR builders (fp32, fp16, NNCF INT8) on tiny models built with onnx.helper."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesdk.errors import ConfigError, UnsupportedModelError
from edgesdk.pipeline.graph_stats import count_openvino_quantized
from edgesdk.pipeline.variants_onnx import VariantNotApplicable
from edgesdk.pipeline.variants_openvino import (
    HOST_REFERENCE_OPTIONS, OPENVINO_BUILDERS, OpenVinoFp16Builder, OpenVinoFp32Builder,
    OpenVinoInt8Builder, OpenVinoInt8Config, openvino_reason,
)
from edgesdk.profiles import VARIANT_KINDS

ov = pytest.importorskip("openvino")


def conv_net(seed: int = 0) -> onnx.ModelProto:
    """3x3 conv → relu → 3x3 conv → relu → global avgpool → flatten → gemm, random He weights."""
    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...], std: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name)

    inits = [init("w0", (8, 3, 3, 3), (2 / 27) ** 0.5), init("b0", (8,), 0.1),
             init("w1", (16, 8, 3, 3), (2 / 72) ** 0.5), init("b1", (16,), 0.1),
             init("fcw", (10, 16), 0.3), init("fcb", (10,), 0.1)]
    nodes = [helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["r1"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fcw", "fcb"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def images(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.random((1, 3, 4, 4), dtype=np.float32)
        img = np.kron(coarse, np.ones((1, 1, 4, 4), np.float32)) + rng.normal(0, 0.02, (1, 3, 16, 16))
        out.append({"input": np.clip(img, 0, 1).astype(np.float32)})
    return out


def run_ort(model: onnx.ModelProto, samples: list[dict]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, s)[0] for s in samples])


def run_ir(xml, samples: list[dict], hint: str = "f32") -> np.ndarray:
    """Feeds by ONNX input name; the output read by its ONNX name."""
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return np.concatenate([compiled(s)["logits"] for s in samples])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return conv_net()


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert os.listdir(cwd) == []


def test_fp32_ir_keeps_names_and_matches_onnx(tmp_path, model):
    built = OpenVinoFp32Builder().build(model, tmp_path / "v", [])
    assert [p.name for p in built.files] == ["openvino-fp32.xml", "openvino-fp32.bin"]
    assert sorted(os.listdir(tmp_path / "v")) == ["openvino-fp32.bin", "openvino-fp32.xml"]
    assert built.runtime_options == HOST_REFERENCE_OPTIONS == {"inference_precision_hint": "f32"}
    ir = ov.Core().read_model(str(built.files[0]))
    assert "input" in ir.inputs[0].get_names() and "logits" in ir.outputs[0].get_names()
    data = images(8, seed=2)
    np.testing.assert_allclose(run_ir(built.files[0], data), run_ort(model, data), atol=1e-4, rtol=1e-4)


def test_fp16_ir_is_smaller_and_close(tmp_path, model):
    fp32 = OpenVinoFp32Builder().build(model, tmp_path / "a", [])
    fp16 = OpenVinoFp16Builder().build(model, tmp_path / "b", [])
    assert fp16.runtime_options == {"inference_precision_hint": "f16"}
    assert fp16.files[1].stat().st_size < 0.6 * fp32.files[1].stat().st_size
    data = images(8, seed=2)
    np.testing.assert_allclose(run_ir(fp16.files[0], data, "f32"), run_ort(model, data), atol=1e-2, rtol=1e-2)


def test_int8_ir_is_quantized_and_close(tmp_path, model):
    built = OpenVinoInt8Builder().build(model, tmp_path, images(32, seed=1))
    assert built.quantized_nodes >= 3 and built.quantized_nodes == count_openvino_quantized(built.files[0])
    assert built.runtime_options == {"inference_precision_hint": "f32"}
    types = {op.get_type_name() for op in ov.Core().read_model(str(built.files[0])).get_ops()}
    assert "FakeQuantize" in types
    data = images(16, seed=2)
    assert cosine(run_ir(built.files[0], data), run_ort(model, data)) > 0.98


def test_int8_ignored_scope_leaves_a_node_in_float(tmp_path, model):
    data = images(8, seed=1)
    full = OpenVinoInt8Builder().build(model, tmp_path / "a", data)
    cfg = OpenVinoInt8Config(nodes_to_exclude=("conv1", "no_such_node"), preset="mixed")
    part = OpenVinoInt8Builder(cfg).build(model, tmp_path / "b", data)
    assert part.quantized_nodes < full.quantized_nodes
    assert any("no_such_node" in n for n in part.notes)


@pytest.mark.parametrize("kind", sorted(OPENVINO_BUILDERS))
def test_classic_ml_graph_is_not_applicable(tmp_path, kind):
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).random((40, 4), dtype=np.float32)
    clf = LogisticRegression().fit(x, (x[:, 0] > 0.5).astype(int))
    ml = to_onnx(clf, x[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    with pytest.raises(VariantNotApplicable, match="no conversion rule"):
        OPENVINO_BUILDERS[kind]().build(ml, tmp_path, [{"X": x[:1]}])


def test_unconvertible_op_is_an_unsupported_model_with_openvinos_reason(tmp_path):
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "g",
                              [vi("x", TensorProto.FLOAT, [1])], [vi("y", TensorProto.FLOAT, [1])])
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedModelError, match="No conversion rule found for operations: com.example.Frobnicate"):
        OpenVinoFp32Builder().build(bad, tmp_path / "v", [])
    assert os.listdir(tmp_path / "v") == []  # nothing half-written


def test_openvino_reason_skips_assertion_boilerplate():
    err = RuntimeError("Check 'false' failed at src/frontends/common/src/frontend.cpp:47:\n"
                       "FrontEnd API failed with OpConversionFailure:\nModel wasn't fully converted.\n"
                       "Summary:\n-- No conversion rule found for operations: Foo\n")
    assert openvino_reason(err) == "No conversion rule found for operations: Foo"


def test_registry_and_config_checks():
    assert set(OPENVINO_BUILDERS) == {k for k, v in VARIANT_KINDS.items() if v.runtime == "openvino"}
    builder = OPENVINO_BUILDERS["openvino-int8"].from_options({"preset": "mixed", "subset_size": 50})
    assert (builder.config.preset, builder.config.subset_size) == ("mixed", 50)
    with pytest.raises(ConfigError, match="preset 'fast'"):
        OpenVinoInt8Config(preset="fast")
