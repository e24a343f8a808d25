"""ONNX variant builders and graph statistics, on tiny models built with onnx.helper."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesdk.errors import CalibrationDataError, ConfigError
from edgesdk.pipeline import graph_stats
from edgesdk.pipeline.calibration_cache import QuantCache
from edgesdk.pipeline.graph_stats import (
    count_quantized_nodes, ensure_node_names, has_ml_domain, if_subgraph_weight_count,
    matmul_fraction, quantizable_node_names,
)
from edgesdk.pipeline.graph_stats import fold_constant_nodes_counted as fold_constant_nodes
from edgesdk.pipeline.variants_onnx import (
    ONNX_BUILDERS, Fp16Config, Int8StaticConfig, OnnxFp16Builder, OnnxFp32Builder,
    OnnxInt8DynamicBuilder, OnnxInt8StaticBuilder, VariantNotApplicable,
)
from edgesdk.profiles import VARIANT_KINDS

# --------------------------------------------------------------------------- tiny models


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_net(opset: int = 17, seed: int = 0, constant_weights: bool = False) -> onnx.ModelProto:
    """3x3 conv → relu → 3x3 conv → relu → global avgpool → flatten → gemm, random He weights."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name: str, array: np.ndarray) -> str:
        array = array.astype(np.float32)
        if constant_weights:
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array)))
        else:
            inits.append(numpy_helper.from_array(array, name))
        return name

    x, cin = "input", 3
    for i, cout in enumerate((8, 16)):
        w = weight(f"w{i}", rng.normal(0, (2 / (cin * 9)) ** 0.5, (cout, cin, 3, 3)))
        b = weight(f"b{i}", rng.normal(0, 0.1, cout))
        nodes += [helper.make_node("Conv", [x, w, b], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x, cin = f"r{i}", cout
    fcw, fcb = weight("fcw", rng.normal(0, 0.3, (10, cin))), weight("fcb", rng.normal(0, 0.1, 10))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", fcw, fcb], ["logits"], transB=1, name="fc")]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits, opset)


def mlp(seed: int = 0, gemm: bool = True) -> onnx.ModelProto:
    """64 → 128 → 128 → 10 MLP (Gemm nodes as torch exports them, or MatMul + Add)."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "input"
    dims = (64, 128, 128, 10)
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        inits += [numpy_helper.from_array(rng.normal(0, (2 / a) ** 0.5, (a, b)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.01, b).astype(np.float32), f"b{i}")]
        out = f"h{i}" if i < len(dims) - 2 else "logits"
        pre = f"z{i}" if out != "logits" else out
        if gemm:
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [pre], name=f"fc{i}"))
        else:
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [pre], name=f"add{i}")]
        if out != "logits":
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
        x = out
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)


def if_weights_net(seed: int = 0) -> onnx.ModelProto:
    """Like silero_vad.onnx: every weight sits inside the branches of an If node."""
    rng = np.random.default_rng(seed)

    def branch(name: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), f"{name}_w")
        nodes = [helper.make_node("Conv", ["input", f"{name}_w"], [f"{name}_c"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", [f"{name}_c"], [f"{name}_out"])]
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 8, 8, 8])
        return helper.make_graph(nodes, name, [], [out], [w])

    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
             helper.make_node("Greater", ["mean", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["output"], then_branch=branch("then"),
                              else_branch=branch("else"))]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 8, 8])], [zero])


def sklearn_logreg() -> onnx.ModelProto:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).random((40, 4), dtype=np.float32)
    clf = LogisticRegression().fit(x, (x[:, 0] > 0.5).astype(int))
    return to_onnx(clf, x[:1], target_opset={"": 17, "ai.onnx.ml": 3})


def images(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Smooth, image-like inputs in [0, 1] (a low-res pattern upsampled, plus a little noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.random((1, 3, 4, 4), dtype=np.float32)
        img = np.kron(coarse, np.ones((1, 1, 4, 4), np.float32)) + rng.normal(0, 0.02, (1, 3, 16, 16))
        out.append({"input": np.clip(img, 0, 1).astype(np.float32)})
    return out


def vectors(n: int, seed: int, dim: int = 64) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.normal(0, 1, (1, dim)).astype(np.float32)} for _ in range(n)]


def run(model: onnx.ModelProto | Path, samples: list[dict]) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, s)[0] for s in samples])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path, monkeypatch):
    """Every test runs in an empty cwd and checks it stays empty (quant_pre_process leaks temps)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert os.listdir(cwd) == []
    assert Path.cwd() == cwd


# --------------------------------------------------------------------------- fp32 / fp16


def test_fp32_writes_the_model_unchanged(tmp_path):
    model = conv_net()
    built = OnnxFp32Builder().build(model, tmp_path / "out", [])
    assert built.files == [tmp_path / "out" / "onnx-fp32.onnx"]
    assert onnx.load(str(built.files[0])) == model
    assert (built.precision, built.runtime, built.quantized_nodes) == ("fp32", "onnxruntime", 0)


def test_fp16_of_a_conv_net_loads_and_matches_fp32(tmp_path):
    model, data = conv_net(), images(8, seed=1)
    built = OnnxFp16Builder().build(model, tmp_path, data)
    fp16 = onnx.load(str(built.files[0]))
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # keep_io_types
    assert any(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer)
    np.testing.assert_allclose(run(built.files[0], data), run(model, data), atol=1e-2, rtol=1e-2)
    assert built.files[0].stat().st_size < 0.7 * len(model.SerializeToString())


def test_fp16_without_io_casts_takes_float16_inputs(tmp_path):
    built = OnnxFp16Builder(Fp16Config(keep_io_types=False)).build(conv_net(), tmp_path, [])
    fp16 = onnx.load(str(built.files[0]))
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_fp16_of_a_graph_without_float_weights_is_not_applicable(tmp_path):
    with pytest.raises(VariantNotApplicable, match="no float32 weights"):
        OnnxFp16Builder().build(sklearn_logreg(), tmp_path, [])


# --------------------------------------------------------------------------- static INT8


def test_int8_static_quantizes_a_conv_net_and_stays_close(tmp_path):
    model = conv_net()
    built = OnnxInt8StaticBuilder().build(model, tmp_path / "v", images(32, seed=1))
    assert built.quantized_nodes >= 3  # both convs and the gemm at least
    assert built.files == [tmp_path / "v" / "onnx-int8.onnx"]
    assert os.listdir(tmp_path / "v") == ["onnx-int8.onnx"]  # no work files left behind
    int8 = onnx.load(str(built.files[0]))
    assert count_quantized_nodes(int8) == built.quantized_nodes
    assert [i.name for i in int8.graph.input] == ["input"] and [o.name for o in int8.graph.output] == ["logits"]
    check = images(16, seed=2)
    assert cosine(run(built.files[0], check), run(model, check)) > 0.98


def test_symmetric_activations_have_zero_points_of_zero(tmp_path):
    cfg = Int8StaticConfig(activation_symmetric=True)
    built = OnnxInt8StaticBuilder(cfg).build(conv_net(), tmp_path, images(8, seed=1))
    int8 = onnx.load(str(built.files[0]))
    inits = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    zero_points = [inits[n.input[2]] for n in int8.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(zp.dtype == np.int8 and not zp.any() for zp in zero_points)


def test_asymmetric_activations_use_uint8(tmp_path):
    built = OnnxInt8StaticBuilder().build(conv_net(), tmp_path, images(8, seed=1))
    int8 = onnx.load(str(built.files[0]))
    inits = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    assert {inits[n.input[2]].dtype for n in int8.graph.node if n.op_type == "QuantizeLinear"} == {np.dtype(np.uint8)}


def test_opset_11_model_is_upgraded_for_per_channel(tmp_path):
    built = OnnxInt8StaticBuilder().build(conv_net(opset=11), tmp_path, images(8, seed=1))
    assert any("opset 11 upgraded to 13" in n for n in built.notes)
    int8 = onnx.load(str(built.files[0]))
    assert graph_stats.default_opset(int8) >= 13
    assert any(a.name == "axis" for n in int8.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
    ort.InferenceSession(str(built.files[0]), providers=["CPUExecutionProvider"])


def test_constant_node_weights_are_folded_and_quantized(tmp_path):
    model = conv_net(constant_weights=True)
    cfg = Int8StaticConfig(pre_process=False)  # ORT's optimizer would fold them too: test ours
    built = OnnxInt8StaticBuilder(cfg).build(model, tmp_path, images(8, seed=1))
    assert built.quantized_nodes >= 3
    assert any("Constant node(s) folded" in n for n in built.notes)


def test_layers_inside_model_local_functions_are_inlined_and_quantized(tmp_path):
    rng = np.random.default_rng(0)
    block = helper.make_function(
        "local", "ConvRelu", ["x", "w"], ["y"],
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        opset_imports=[helper.make_opsetid("", 17)])
    w = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w")
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("ConvRelu", ["input", "w"], ["output"], domain="local")], "g",
                              [vi("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [vi("output", TensorProto.FLOAT, [1, 8, 16, 16])], [w])
    model = helper.make_model(graph, functions=[block], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 8
    built = OnnxInt8StaticBuilder().build(model, tmp_path, images(8, seed=1))
    assert "1 model-local function(s) inlined" in built.notes and built.quantized_nodes >= 1


def test_weights_inside_if_subgraphs_are_not_applicable(tmp_path):
    model = if_weights_net()
    assert if_subgraph_weight_count(model) == 2
    samples = [{"input": np.random.default_rng(i).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}
               for i in range(4)]
    with pytest.raises(VariantNotApplicable, match="0 nodes quantized.*If/Loop/Scan"):
        OnnxInt8StaticBuilder().build(model, tmp_path / "v", samples)
    assert not (tmp_path / "v" / "onnx-int8.onnx").exists()
    assert os.listdir(tmp_path / "v") == []


def test_excluded_nodes_stay_in_float(tmp_path):
    model, data = conv_net(), images(8, seed=1)
    assert quantizable_node_names(model) == ["conv0", "conv1", "fc"]
    full = OnnxInt8StaticBuilder().build(model, tmp_path / "a", data)
    part = OnnxInt8StaticBuilder(Int8StaticConfig(nodes_to_exclude=("conv1",))).build(model, tmp_path / "b", data)
    int8 = onnx.load(str(part.files[0]))
    producers = {o: n.op_type for n in int8.graph.node for o in n.output}
    conv1 = next(n for n in int8.graph.node if n.name == "conv1")
    assert conv1.input[1] == "w1" and producers.get("w1") is None  # float weight, no DequantizeLinear
    assert part.quantized_nodes < full.quantized_nodes


@pytest.mark.parametrize("failures, note", [
    (1, "retried with skip_symbolic_shape=True"),
    (2, "quantized without it"),
])
def test_quant_pre_process_failures_fall_back(tmp_path, monkeypatch, failures, note):
    import onnxruntime.quantization.shape_inference as shape_inference

    real, calls = shape_inference.quant_pre_process, []

    def flaky(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) <= failures:
            raise RuntimeError("symbolic shape inference failed on node X\nmore detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(shape_inference, "quant_pre_process", flaky)
    built = OnnxInt8StaticBuilder().build(conv_net(), tmp_path, images(8, seed=1))
    assert calls[1]["skip_symbolic_shape"] is True
    assert any(note in n for n in built.notes) and built.quantized_nodes >= 3


def test_classic_ml_graph_is_not_quantized(tmp_path):
    model = sklearn_logreg()
    assert has_ml_domain(model)
    samples = [{"X": np.zeros((1, 4), np.float32)}]
    for builder in (OnnxInt8StaticBuilder(), OnnxInt8DynamicBuilder()):
        with pytest.raises(VariantNotApplicable, match="ai.onnx.ml ops: LinearClassifier"):
            builder.build(model, tmp_path, samples)


def test_samples_must_name_the_model_inputs(tmp_path):
    with pytest.raises(CalibrationDataError, match="sample 0 has inputs"):
        OnnxInt8StaticBuilder().build(conv_net(), tmp_path, [{"x": np.zeros((1, 3, 16, 16), np.float32)}])
    with pytest.raises(CalibrationDataError, match="no calibration samples"):
        OnnxInt8StaticBuilder().build(conv_net(), tmp_path, [])


def test_samples_with_the_wrong_dtype_are_a_calibration_error(tmp_path):
    wrong = [{"input": np.zeros((1, 3, 16, 16), np.float64)}]
    with pytest.raises(CalibrationDataError, match="is float64, the model expects float32"):
        OnnxInt8StaticBuilder().build(conv_net(), tmp_path, wrong)


# --------------------------------------------------------------------------- dynamic INT8


def test_dynamic_int8_is_refused_on_a_conv_net(tmp_path):
    with pytest.raises(VariantNotApplicable, match="Conv-heavy graph.*6-15x slower"):
        OnnxInt8DynamicBuilder().build(conv_net(), tmp_path, [])


@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "matmul"])
def test_dynamic_int8_quantizes_an_mlp(tmp_path, gemm):
    model, data = mlp(gemm=gemm), vectors(16, seed=3)
    built = OnnxInt8DynamicBuilder().build(model, tmp_path, [])
    assert built.quantized_nodes == 3
    assert any("Gemm node(s) rewritten" in n for n in built.notes) == gemm
    ops = {n.op_type for n in onnx.load(str(built.files[0])).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert cosine(run(built.files[0], data), run(model, data)) > 0.98


# --------------------------------------------------------------------------- graph statistics and config


def test_matmul_fraction_tells_mlps_from_cnns():
    assert matmul_fraction(conv_net()) < 0.05
    assert matmul_fraction(mlp()) == 1.0
    assert matmul_fraction(mlp(gemm=False)) == 1.0


def test_count_ignores_float_ops_that_only_read_dequantized_weights():
    w = numpy_helper.from_array(np.ones((4, 4), np.int8), "wq")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]  # weight-only: computes in float
    vi = helper.make_tensor_value_info
    model = _model(nodes, [vi("x", TensorProto.FLOAT, [1, 4])], [vi("y", TensorProto.FLOAT, [1, 4])], [w, scale])
    assert count_quantized_nodes(model) == 0


def test_node_names_are_unique_and_stable():
    model = mlp(gemm=False)
    for node in model.graph.node:
        node.name = ""
    model.graph.node[1].name = "dup"
    model.graph.node[2].name = "dup"
    named = ensure_node_names(model)
    names = [n.name for n in named.graph.node]
    assert len(set(names)) == len(names) and all(names)
    assert [n.name for n in ensure_node_names(model).graph.node] == names
    assert model.graph.node[0].name == ""  # the caller's model is untouched


def test_fold_constant_nodes_moves_weights_to_initializers():
    folded, count = fold_constant_nodes(conv_net(constant_weights=True))
    assert count == 6 and not any(n.op_type == "Constant" for n in folded.graph.node)
    onnx.checker.check_model(folded)


def test_registry_covers_onnx_kinds_and_reads_profile_options():
    assert set(ONNX_BUILDERS) == {k for k, v in VARIANT_KINDS.items() if v.format == "onnx"}
    builder = ONNX_BUILDERS["onnx-int8"].from_options({"calibration_method": "entropy", "max_float_nodes": 4})
    assert builder.config.calibration_method == "entropy"
    with pytest.raises(ConfigError, match="calibration_method 'kl'"):
        Int8StaticConfig(calibration_method="kl")
    with pytest.raises(ConfigError, match="unknown option"):
        ONNX_BUILDERS["onnx-fp16"].from_options({"per_channel": True})



# --------------------------------------------------------------------------- real models (MODELS.md)


def _silero_samples(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"input": rng.normal(0, 0.1, (1, 512)).astype(np.float32), "sr": np.array(16000, np.int64),
             "state": np.zeros((2, 1, 128), np.float32)} for _ in range(n)]


@pytest.mark.realmodel
@pytest.mark.parametrize("name, reason", [
    ("silero-vad-if", "all 28 weight tensors are inside If/Loop/Scan subgraphs"),
    ("silero-vad", "Conv/MatMul/Gemm nodes are inside If/Loop/Scan subgraphs"),
])
def test_real_silero_vad_is_refused_not_shipped_unquantized(tmp_path, real_model, name, reason):
    model = onnx.load(str(real_model(name)))
    with pytest.raises(VariantNotApplicable, match=f"0 nodes quantized: .*{reason}"):
        OnnxInt8StaticBuilder().build(model, tmp_path, _silero_samples(4))


@pytest.mark.realmodel
def test_real_magika_quantizes_after_symbolic_shape_inference_fails(tmp_path, real_model):
    model = onnx.load(str(real_model("magika")))
    rng = np.random.default_rng(0)
    data = [{"bytes": rng.integers(0, 257, (1, 2048)).astype(np.int32)} for _ in range(8)]
    built = OnnxInt8StaticBuilder().build(model, tmp_path, data)
    assert any("retried with skip_symbolic_shape=True" in n for n in built.notes)
    assert built.quantized_nodes > 20
    assert cosine(run(built.files[0], data[:2]), run(model, data[:2])) > 0.9


def test_gemm_bias_of_shape_1xn_is_flattened_without_changing_outputs(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgesdk.pipeline.variants_onnx import flatten_gemm_biases

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((1, 4)).astype(np.float32), "b")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((1, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    assert flatten_gemm_biases(model) == 1

    assert list(model.graph.initializer[1].dims) == [4]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)


# --------------------------------------------------------------------------- calibration cache


def test_a_repair_build_reuses_the_calibration_ranges_and_matches_a_fresh_build(tmp_path):
    model, data = conv_net(), images(16, seed=1)
    cache = QuantCache(tmp_path / "cache")
    excluded = Int8StaticConfig(nodes_to_exclude=("conv1",))

    OnnxInt8StaticBuilder(cache=cache).build(model, tmp_path / "a0", data)
    repaired = OnnxInt8StaticBuilder(excluded, cache=cache).build(model, tmp_path / "r1", data)
    fresh = OnnxInt8StaticBuilder(excluded).build(model, tmp_path / "fresh", data)

    # Pre-processing and calibration ran once; the second build read both back ...
    assert cache.hits == {"preprocess": 1, "ranges": 1}
    # ... and the ranges read back give exactly the model a new calibration gives.
    assert repaired.files[0].read_bytes() == fresh.files[0].read_bytes()
    assert repaired.notes == fresh.notes


@pytest.mark.parametrize("change", ["method", "samples"])
def test_calibration_ranges_are_not_reused_across_methods_or_samples(tmp_path, change):
    model, data = conv_net(), images(16, seed=1)
    cache = QuantCache(tmp_path / "cache")
    OnnxInt8StaticBuilder(cache=cache).build(model, tmp_path / "a0", data)

    if change == "method":
        OnnxInt8StaticBuilder(Int8StaticConfig(calibration_method="percentile"), cache=cache).build(
            model, tmp_path / "r1", data)
    else:
        OnnxInt8StaticBuilder(cache=cache).build(model, tmp_path / "r1", images(16, seed=2))

    assert "ranges" not in cache.hits
    assert len(list((tmp_path / "cache").glob("ranges-*.json"))) == 2


def test_a_failed_pre_process_is_remembered_with_its_note(tmp_path, monkeypatch):
    def always_fails(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("onnxruntime.quantization.shape_inference.quant_pre_process", always_fails)
    cache = QuantCache(tmp_path / "cache")
    model, data = conv_net(), images(8, seed=1)

    first = OnnxInt8StaticBuilder(cache=cache).build(model, tmp_path / "a0", data)
    second = OnnxInt8StaticBuilder(Int8StaticConfig(nodes_to_exclude=("conv0",)), cache=cache).build(
        model, tmp_path / "r1", data)

    assert cache.hits["preprocess"] == 1
    for built in (first, second):
        assert any("quant_pre_process failed (boom)" in n for n in built.notes)


# --------------------------------------------------------------------------- calibration memory
def test_histogram_calibration_over_the_memory_bound_uses_fewer_samples_and_says_so(tmp_path, monkeypatch):
    # onnxruntime's percentile/entropy calibrators keep every sample's full intermediate tensors:
    # an 800x608 layout detector's percentile repair took 24 GB and was OOM-killed.
    from edgesdk.pipeline import variants_onnx

    model, samples = conv_net(), images(12, seed=1)
    assert variants_onnx.calibration_samples(model, "percentile", samples) == (samples, None)  # fits
    monkeypatch.setattr(variants_onnx, "CALIBRATION_MEMORY_BYTES", variants_onnx.activation_bytes(model) * 4)
    kept, note = variants_onnx.calibration_samples(model, "percentile", samples)
    assert len(kept) == 4 and "percentile calibration on 4 of 12 samples" in note
    assert variants_onnx.calibration_samples(model, "minmax", samples) == (samples, None)  # keeps scalars only
    built = OnnxInt8StaticBuilder(Int8StaticConfig(calibration_method="percentile")).build(model, tmp_path / "v", samples)
    assert any("4 of 12 samples" in n for n in built.notes) and built.quantized_nodes >= 3
