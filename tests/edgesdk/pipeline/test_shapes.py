"""Fix input shapes: explicit CLI shapes, the static policy, and the errors that name the fix."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgesdk.errors import ConfigError
from edgesdk.pipeline.model_io import model_inputs, value_spec
from edgesdk.pipeline.shapes import fix_input_shapes, parse_input_shapes


def _image_model() -> onnx.ModelProto:
    """x[batch,3,height,width] → Relu → y (output written with the same symbolic dims)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _text_model() -> onnx.ModelProto:
    """input_ids[batch,seq] and mask[batch,seq] → Mul → out; the dims are shared by name."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", "seq"])
    graph = helper.make_graph([helper.make_node("Mul", ["input_ids", "mask"], ["out"])], "g", [ids, mask], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _shape(model: onnx.ModelProto, name: str, outputs: bool = False):
    values = model.graph.output if outputs else model.graph.input
    return next(value_spec(v).shape for v in values if v.name == name)


@pytest.mark.parametrize("specs, expected", [
    (["x=1x3x224x224"], {"x": (1, 3, 224, 224)}),
    (["x:1,3,224,224"], {"x": (1, 3, 224, 224)}),
    (["input:0=1X8", "b=4"], {"input:0": (1, 8), "b": (4,)}),
])
def test_parses_cli_input_shapes(specs, expected):
    assert parse_input_shapes(specs) == expected


@pytest.mark.parametrize("bad", ["x", "x=", "=1x3", "x=1x-3", "x=1xx3", "x=0x3", "x=1x3.5"])
def test_rejects_malformed_input_shape_naming_it(bad):
    with pytest.raises(ConfigError) as exc:
        parse_input_shapes([bad])
    assert repr(bad) in str(exc.value)


def test_rejects_same_input_twice():
    with pytest.raises(ConfigError, match="more than once"):
        parse_input_shapes(["x=1x3", "x=2x3"])


def test_explicit_shape_fixes_input_and_reinfers_output():
    model = _image_model()

    fixed = fix_input_shapes(model, {"x": (2, 3, 64, 48)})

    assert _shape(fixed, "x") == (2, 3, 64, 48)
    assert _shape(fixed, "y", outputs=True) == (2, 3, 64, 48)
    assert _shape(model, "x") == ("batch", 3, "height", "width")  # the caller's model is untouched
    onnx.checker.check_model(fixed)
    session = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 64, 48]


def test_dynamic_policy_keeps_dims_not_given():
    fixed = fix_input_shapes(_image_model(), {}, policy="dynamic")
    assert _shape(fixed, "x") == ("batch", 3, "height", "width")


def test_static_policy_gives_batch_dim_the_profile_batch():
    fixed = fix_input_shapes(_image_model(), {"x": (1, 3, 640, 640)}, policy="static", batch=4)
    # Explicit shapes win over the policy's batch.
    assert _shape(fixed, "x") == (1, 3, 640, 640)

    model = _text_model()
    fixed = fix_input_shapes(model, {"input_ids": (1, 128)}, policy="static", batch=4)
    assert _shape(fixed, "mask") == (1, 128)  # "batch" and "seq" are shared by name
    assert _shape(fixed, "out", outputs=True) == (1, 128)


def test_static_policy_fills_batch_and_shared_dims():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    fixed = fix_input_shapes(model, {}, policy="static", batch=8)

    assert _shape(fixed, "x") == (8, 4)
    assert _shape(fixed, "y", outputs=True) == (8, 4)


def test_static_policy_names_the_dynamic_dim_and_the_flag_to_pass():
    with pytest.raises(ConfigError) as exc:
        fix_input_shapes(_image_model(), {}, policy="static")
    text = str(exc.value)
    assert "\n" not in text
    assert "input 'x' dim 2 is dynamic ('height')" in text
    assert "--input-shape x=1x3x<height>x<width>" in text


@pytest.mark.parametrize("shapes, fragment", [
    ({"image": (1, 3, 8, 8)}, "unknown input 'image' (model inputs: x)"),
    ({"x": (1, 3, 8)}, "rank 4"),
    ({"x": (1, 4, 8, 8)}, "dim 1 is fixed at 3"),
])
def test_rejects_bad_explicit_shapes(shapes, fragment):
    with pytest.raises(ConfigError) as exc:
        fix_input_shapes(_image_model(), shapes)
    assert fragment in str(exc.value)


def test_rejects_conflicting_values_for_a_shared_dim():
    with pytest.raises(ConfigError, match="'seq'"):
        fix_input_shapes(_text_model(), {"input_ids": (1, 16), "mask": (1, 32)})


def test_fixed_text_model_runs_with_the_fixed_shapes():
    fixed = fix_input_shapes(_text_model(), {"input_ids": (2, 5)}, policy="static")
    assert [s.shape for s in model_inputs(fixed)] == [(2, 5), (2, 5)]
    session = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    ones = np.ones((2, 5), np.int64)
    assert session.run(None, {"input_ids": ones, "mask": ones})[0].shape == (2, 5)


def test_static_batch_reaches_a_shared_dim_in_another_position():
    # silero-VAD style: the recurrent state carries the batch as its second dim.
    audio = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", 4])
    state = helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, "batch", 8])
    graph = helper.make_graph([helper.make_node("Identity", ["state"], ["out"]),
                               helper.make_node("Identity", ["audio"], ["audio_out"])], "g", [state, audio],
                              [out, helper.make_tensor_value_info("audio_out", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    fixed = fix_input_shapes(model, {}, policy="static", batch=3)

    assert _shape(fixed, "state") == (2, 3, 8) and _shape(fixed, "audio") == (3, 4)
    assert _shape(fixed, "out", outputs=True) == (2, 3, 8)


def _paddle_style_model() -> onnx.ModelProto:
    """What Paddle2ONNX writes: x[-1, 3, ?, ?] → GlobalAveragePool → y[-1, 3, 1, 1]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, 1, 1])
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_paddle_minus_one_and_anonymous_dims_are_dynamic_and_independent() -> None:
    # -1 read as a size ("fixed at -1, not 1") and the two "?" read as one dim (48 vs 192) both
    # refused the real text-direction classifier before.
    fixed = fix_input_shapes(_paddle_style_model(), {"x": (1, 3, 48, 192)})
    assert _shape(fixed, "x") == (1, 3, 48, 192)
    session = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": np.ones((1, 3, 48, 192), np.float32)})[0]
    assert out.shape == (1, 3, 1, 1)


def test_paddle_style_model_under_the_static_policy_fixes_the_batch() -> None:
    fixed = fix_input_shapes(_paddle_style_model(), {"x": (1, 3, 48, 192)}, policy="static", batch=1)
    assert _shape(fixed, "x") == (1, 3, 48, 192)
