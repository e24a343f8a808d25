"""Load and check: every bad input model fails with one line naming the file."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesdk.errors import ConfigError, ModelError, UnsupportedModelError
from edgesdk.manifest import TensorSpec
from edgesdk.pipeline.model_io import (
    load_model,
    ops_unsupported,
    require_runtime_support,
    save_model,
)


def _conv_model(weight_elems: int = 16, opset: int = 17) -> onnx.ModelProto:
    """x[batch,4] → MatMul with a 4×(elems/4) weight → Relu, and ids[?] → Identity."""
    width = weight_elems // 4
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    w = numpy_helper.from_array(np.arange(weight_elems, dtype=np.float32).reshape(4, width), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"]),
             helper.make_node("Identity", ["ids"], ["ids_out"])]
    ids_out = helper.make_tensor_value_info("ids_out", TensorProto.INT64, [None])
    graph = helper.make_graph(nodes, "g", [x, ids], [y, ids_out], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _write(model: onnx.ModelProto, path) -> None:
    path.write_bytes(model.SerializeToString())


def _assert_one_line(exc: pytest.ExceptionInfo, path, *parts: str) -> None:
    """One line that starts with the file's path; ``parts`` are looked for after the path (the
    tmp_path folder is named after the test and would match words like "truncated")."""
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: "), text
    for part in parts:
        assert part in text[len(str(path)):], text


def test_describes_inputs_outputs_and_ops(tmp_path):
    path = tmp_path / "m.onnx"
    _write(_conv_model(), path)

    loaded = load_model(path)

    assert loaded.format == "onnx" and loaded.opset == 17
    assert loaded.inputs == [TensorSpec("x", "float32", ("batch", 4)), TensorSpec("ids", "int64", ("?",))]
    # The output shape comes from shape inference: the file has none.
    assert loaded.outputs[0] == TensorSpec("y", "float32", ("batch", 4))
    assert loaded.op_types == ("Identity", "MatMul", "Relu")
    assert loaded.domains == frozenset({"ai.onnx"})
    assert not loaded.has_ml_ops and not loaded.has_if_subgraph_weights
    assert loaded.size == path.stat().st_size and len(loaded.sha256) == 64


def test_rejects_missing_file(tmp_path):
    with pytest.raises(ModelError) as exc:
        load_model(tmp_path / "nope.onnx")
    _assert_one_line(exc, tmp_path / "nope.onnx", "model file not found")


@pytest.mark.parametrize("content, why", [
    (np.random.default_rng(1).bytes(4096), "(protobuf parse failed)"),
    (b"just some text\nmore\n", "(protobuf parse failed)"),
    (b"", "(no ir_version or graph in the file)"),  # parses as an empty protobuf message
], ids=["random-bytes", "text", "empty"])
def test_rejects_file_that_is_not_onnx(tmp_path, content, why):
    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError) as exc:
        load_model(path)
    _assert_one_line(exc, path, f"not an ONNX model {why}")


def test_rejects_truncated_model(tmp_path):
    data = _conv_model(weight_elems=40_000).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as exc:
        load_model(path)
    _assert_one_line(exc, path, "truncated or corrupt ONNX model")


def test_loads_external_data_next_to_the_model(tmp_path):
    model = _conv_model(weight_elems=4096)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="ext.weights", size_threshold=0)

    loaded = load_model(path)

    w = numpy_helper.to_array(loaded.model.graph.initializer[0])
    assert w.shape == (4, 1024) and w[0, 5] == 5.0


def test_rejects_missing_external_data_file(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save_model(_conv_model(4096), path, save_as_external_data=True, location="ext.weights",
                    size_threshold=0)
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(ModelError) as exc:
        load_model(path)
    _assert_one_line(exc, path, "external data file 'ext.weights' not found")


def test_rejects_external_data_pointing_outside_the_folder(tmp_path):
    model = _conv_model(4096)
    onnx.external_data_helper.convert_model_to_external_data(model, location="../evil.bin", size_threshold=0)
    (tmp_path / "evil.bin").write_bytes(b"\0" * 16384)
    sub = tmp_path / "models"
    sub.mkdir()
    _write(model, sub / "m.onnx")
    with pytest.raises(ModelError) as exc:
        load_model(sub / "m.onnx")
    _assert_one_line(exc, sub / "m.onnx", "points outside the model's folder")


def test_rejects_model_that_fails_the_checker(tmp_path):
    model = _conv_model()
    model.graph.node[1].input[0] = "never_produced"
    path = tmp_path / "bad.onnx"
    _write(model, path)
    with pytest.raises(ModelError) as exc:
        load_model(path)
    _assert_one_line(exc, path, "fails the ONNX checker", "never_produced")


def _sklearn_model():
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx

    rng = np.random.default_rng(0)
    features = rng.random((40, 4), dtype=np.float32)
    clf = LogisticRegression().fit(features, (features[:, 0] > 0.5).astype(int))
    return to_onnx(clf, features[:1])


def test_detects_ml_ops_that_openvino_cannot_run(tmp_path):
    path = tmp_path / "lr.onnx"
    _write(_sklearn_model(), path)

    loaded = load_model(path)

    assert loaded.has_ml_ops and "ai.onnx.ml" in loaded.domains
    assert "LinearClassifier" in ops_unsupported(loaded, "openvino")
    assert ops_unsupported(loaded, "onnxruntime") == []
    with pytest.raises(UnsupportedModelError) as exc:
        require_runtime_support(loaded, "openvino")
    _assert_one_line(exc, path, "ops LinearClassifier, ZipMap (domain ai.onnx.ml) cannot run on runtime openvino")
    assert [(o.name, o.dtype) for o in loaded.outputs] == [("output_label", "int64"),
                                                          ("output_probability", "object")]
    require_runtime_support(loaded, "onnxruntime")


def test_flags_op_onnxruntime_has_no_kernel_for(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    _write(model, path)
    loaded = load_model(path)

    assert ops_unsupported(loaded, "onnxruntime") == ["Frobnicate"]
    assert ops_unsupported(_loaded_plain(tmp_path), "onnxruntime") == []
    with pytest.raises(ConfigError):
        ops_unsupported(loaded, "tensorflow")


def _loaded_plain(tmp_path):
    path = tmp_path / "plain.onnx"
    _write(_conv_model(), path)
    return load_model(path)


def _if_model(branch_elems: int) -> onnx.ModelProto:
    def branch(name, value):
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [branch_elems])
        const = helper.make_node("Constant", [], [f"{name}_out"],
                                 value=numpy_helper.from_array(np.full(branch_elems, value, np.float32)))
        return helper.make_graph([const], name, [], [out])

    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [branch_elems])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 0.0))
    return helper.make_model(helper.make_graph([node], "g", [cond], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("elems, expected", [(64, True), (1, False)], ids=["weights", "scalar-only"])
def test_flags_weights_inside_if_subgraphs(tmp_path, elems, expected):
    path = tmp_path / "if.onnx"
    _write(_if_model(elems), path)
    assert load_model(path).has_if_subgraph_weights is expected


def _tflite_add(path) -> None:
    """A two-input ADD model with a dynamic batch, written with LiteRT's flatbuffer schema."""
    flatbuffers = pytest.importorskip("flatbuffers")
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")

    def tensor(name, buffer):
        t = schema.TensorT()
        t.name, t.shape, t.shapeSignature = name, [1, 4], [-1, 4]
        t.type, t.buffer = schema.TensorType.FLOAT32, buffer
        return t

    code = schema.OperatorCodeT()
    code.builtinCode, code.version = schema.BuiltinOperator.ADD, 1
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.AddOptions, schema.AddOptionsT()
    sub = schema.SubGraphT()
    sub.tensors = [tensor("a", 1), tensor("b", 2), tensor("out", 3)]
    sub.inputs, sub.outputs, sub.operators = [0, 1], [2], [op]
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [sub]
    model.buffers = [schema.BufferT() for _ in range(4)]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def test_reads_tflite_signature_with_litert(tmp_path):
    pytest.importorskip("ai_edge_litert.interpreter")
    path = tmp_path / "add.tflite"
    _tflite_add(path)

    loaded = load_model(path)

    assert loaded.format == "tflite" and loaded.model is None and loaded.opset is None
    assert loaded.inputs == [TensorSpec("a", "float32", ("?", 4)), TensorSpec("b", "float32", ("?", 4))]
    assert loaded.outputs == [TensorSpec("out", "float32", ("?", 4))]
    assert loaded.op_types == ("ADD",)
    assert ops_unsupported(loaded, "litert") == []
    with pytest.raises(UnsupportedModelError):
        require_runtime_support(loaded, "onnxruntime")


def test_accepts_tflite_without_litert_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "add.tflite"
    _tflite_add(path)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import now fails

    loaded = load_model(path)

    assert loaded.format == "tflite" and loaded.inputs == [] and loaded.outputs == []
    assert any("LiteRT" in note for note in loaded.notes)


def test_rejects_tflite_named_file_without_identifier(tmp_path):
    path = tmp_path / "fake.tflite"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ModelError) as exc:
        load_model(path)
    _assert_one_line(exc, path, "not a TFLite model (no TFL3")


def test_saves_small_model_as_one_file(tmp_path):
    model = _conv_model()
    written = save_model(model, tmp_path / "out.onnx")
    assert written == [tmp_path / "out.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert load_model(tmp_path / "out.onnx").op_types == ("Identity", "MatMul", "Relu")


def test_saves_large_model_with_external_data_and_leaves_caller_model_intact(tmp_path):
    model = _conv_model(weight_elems=4096)
    path = tmp_path / "big.onnx"

    for _ in range(2):  # a second save must replace the data file, not append to it
        written = save_model(model, path, external_data_threshold=1000)

    assert written == [path, tmp_path / "big.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    assert (tmp_path / "big.onnx.data").stat().st_size == 4096 * 4
    assert model.graph.initializer[0].raw_data  # the caller's model still holds its weights
    reloaded = load_model(path).model
    np.testing.assert_array_equal(numpy_helper.to_array(reloaded.graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))
