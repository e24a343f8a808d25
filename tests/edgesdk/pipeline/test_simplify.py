"""Simplify: onnxslim's model is kept only when it checks out against the original."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesdk.pipeline import simplify as simplify_module
from edgesdk.pipeline.graph_stats import fold_constant_nodes
from edgesdk.pipeline.model_io import load_model, save_model
from edgesdk.pipeline.shapes import fix_input_shapes
from edgesdk.pipeline.simplify import simplify


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_t"))


def _shape_subgraph_model() -> onnx.ModelProto:
    """x[batch,3,4,4] × Constant weight, then Reshape to [batch, 48] via Shape→Gather→Concat."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 48])
    scale = np.linspace(0.5, 2.0, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    nodes = [
        _const("scale", scale),
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Shape", ["scaled"], ["shape"]),
        _const("zero", np.array([0], np.int64)),
        helper.make_node("Gather", ["shape", "zero"], ["batch_dim"], axis=0),
        _const("rest", np.array([48], np.int64)),
        helper.make_node("Concat", ["batch_dim", "rest"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["scaled", "new_shape"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_folds_shape_subgraph_on_static_model_and_keeps_outputs():
    model = fix_input_shapes(_shape_subgraph_model(), {"x": (2, 3, 4, 4)})
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32)

    slim, report = simplify(model)

    assert report["applied"] is True and report["reason"] is None
    assert report["nodes_before"] == 8 and report["nodes_after"] < report["nodes_before"]
    assert not {"Constant", "Shape", "Gather", "Concat"} & set(_ops(slim))
    np.testing.assert_allclose(_run(slim, x), _run(model, x), rtol=1e-6)


def test_folds_constants_on_dynamic_model():
    model = _shape_subgraph_model()
    slim, report = simplify(model)
    assert report["applied"] is True
    assert "Constant" not in _ops(slim)
    assert _ops(model).count("Constant") == 3  # the caller's model is untouched
    x = np.ones((5, 3, 4, 4), np.float32)
    np.testing.assert_allclose(_run(slim, x), _run(model, x), rtol=1e-6)


def test_keeps_original_with_constants_folded_when_onnxslim_raises(monkeypatch):
    def broken(model, *args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("onnxslim.slim", broken)
    model = _shape_subgraph_model()

    result, report = simplify(model)

    assert report["applied"] is False and report["reason"] == "onnxslim failed: boom"
    assert report["constants_folded"] == 3 and "Constant" not in _ops(result)
    assert _ops(result) == [op for op in _ops(model) if op != "Constant"]


def test_keeps_original_when_simplified_outputs_differ(monkeypatch):
    real_slim = __import__("onnxslim").slim

    def wrong(model, *args, **kwargs):
        out = real_slim(model)
        for init in out.graph.initializer:
            if init.name.startswith("scale"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
        return out

    monkeypatch.setattr("onnxslim.slim", wrong)

    result, report = simplify(_shape_subgraph_model())

    assert report["applied"] is False
    assert "changed output 'y'" in report["reason"], report["reason"]
    assert "Shape" in _ops(result)


def test_keeps_original_when_checker_rejects_simplified_model(monkeypatch):
    real_slim = __import__("onnxslim").slim

    def invalid(model, *args, **kwargs):
        out = real_slim(model)
        out.graph.node[0].input[0] = "dangling"
        return out

    monkeypatch.setattr("onnxslim.slim", invalid)
    _, report = simplify(_shape_subgraph_model())
    assert report["applied"] is False and "ONNX checker" in report["reason"]


def test_keeps_original_when_onnxslim_drops_an_input():
    # onnxslim removes unused graph inputs; the package's signature must not change.
    model = _shape_subgraph_model()
    model.graph.input.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1]))
    result, report = simplify(model)
    assert report["applied"] is False and "inputs" in report["reason"]
    assert [i.name for i in result.graph.input] == ["x", "unused"]


def _if_with_constant_weights() -> onnx.ModelProto:
    def branch(name: str, value: float) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4])
        nodes = [_const(f"{name}_w", np.full(4, value, np.float32)),
                 helper.make_node("Mul", ["x", f"{name}_w"], [f"{name}_out"])]
        return helper.make_graph(nodes, name, [], [out])

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    nodes = [
        helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0, 3.0, 4.0]),
        helper.make_node("Add", ["x", "k"], ["xk"]),
        helper.make_node("ReduceSum", ["xk"], ["s"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value_float=0.0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 2.0), else_branch=branch("else", -1.0)),
    ]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_fold_constant_nodes_turns_constants_into_initializers_in_subgraphs_too():
    model = _if_with_constant_weights()

    folded = fold_constant_nodes(model)

    all_ops = [n.op_type for n in folded.graph.node]
    all_ops += [n.op_type for a in folded.graph.node[-1].attribute for n in a.g.node]
    assert "Constant" not in all_ops
    assert {i.name for i in folded.graph.initializer} == {"k", "zero"}
    onnx.checker.check_model(folded)
    for x in (np.ones(4, np.float32), -10 * np.ones(4, np.float32)):
        np.testing.assert_array_equal(_run(folded, x), _run(model, x))


def test_fold_keeps_constant_that_is_a_graph_output():
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = helper.make_model(helper.make_graph([_const("y", np.ones(2, np.float32))], "g", [], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    assert _ops(fold_constant_nodes(model)) == ["Constant"]


def test_pipeline_steps_leave_no_files_in_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    models = tmp_path / "models"
    models.mkdir()
    save_model(_shape_subgraph_model(), models / "m.onnx")

    loaded = load_model(models / "m.onnx")
    fixed = fix_input_shapes(loaded.model, {}, policy="static", batch=2)
    simplify(fixed)
    simplify(_if_with_constant_weights())

    assert list(work.iterdir()) == []
    assert sorted(p.name for p in models.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("reference, candidate, fragment", [
    ([1.0, np.nan], [1.0, np.nan], None),
    ([1.0, 1.0], [1.0, 1.00005], None),
    ([0.0, 100.0], [0.005, 100.0], None),  # absolute slack scales with the output's magnitude
    ([1.0, 1.0], [1.0, 1.01], "max abs difference"),
    ([1.0, 1.0], [1.0], "shape"),
], ids=["nan-equal", "within-rtol", "near-zero", "outside-tolerance", "shape-change"])
def test_output_comparison_tolerance(reference, candidate, fragment):
    why = simplify_module._difference(np.array(reference, np.float32), np.array(candidate, np.float32), 1e-4)
    assert (why is None) if fragment is None else (fragment in why)


def _reshape_by_five_model() -> onnx.ModelProto:
    """x[1,n] → Reshape(5, -1) × Constant: runs only when n is a multiple of 5."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, None])
    nodes = [_const("shape", np.array([5, -1], np.int64)), helper.make_node("Reshape", ["x", "shape"], ["r"]),
             _const("two", np.array(2.0, np.float32)), helper.make_node("Mul", ["r", "two"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_verifies_with_the_given_sample_when_random_inputs_do_not_fit():
    model = _reshape_by_five_model()

    _, unverified = simplify(model)
    slim, verified = simplify(model, sample={"x": np.ones((1, 10), np.float32)})

    assert unverified["applied"] is False and unverified["reason"].startswith("not verified")
    assert verified["applied"] is True and "Constant" not in _ops(slim)


def test_fold_adds_initializers_to_inputs_for_ir3_models():
    model = _reshape_by_five_model()
    model.ir_version = 3
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 8))

    folded = fold_constant_nodes(model)

    assert [i.name for i in folded.graph.input] == ["x", "shape", "two"]
    onnx.checker.check_model(folded)
