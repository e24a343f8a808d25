"""Find the post-processing subgraph of a model, which INT8 builds should leave in float.

What comes after a network's last weighted layer is arithmetic on its outputs, not feature
extraction: bias adds, Sigmoid/Softmax, the Reshape/Transpose/Concat that gather a detector's heads,
DFL (a Softmax over distance bins and a Conv/MatMul with fixed ``arange`` weights) and the box
decode (Slice/Sub/Add/Mul/Div/Exp with anchors and strides). Quantizing it costs little time and
much accuracy: one int8 scale shared by box coordinates (hundreds of pixels) and class scores
(0-1) flattened a YOLO detector's scores to 0.0 at cosine 0.997 (MODELS.md); Ultralytics keeps this
part in float for its OpenVINO INT8 exports.

``postprocess_nodes(model)`` names every node on a path to a graph output that comes after the
last weighted layer of that path (Conv, ConvTranspose, or MatMul/Gemm with a constant operand;
DFL's projection does not count as one), each with a reason. Where one output gathers several
heads (the YOLOv8 pattern: per-scale head convs reshaped and concatenated), those final head layers
are included too: their outputs meet in one tensor of mixed scales, which int8 handles worst.

Walks follow data inputs only (a Reshape's shape, a Slice's starts and a Gather's indices are not
followed, nor is anything behind a ``Shape``), so shape arithmetic is not listed. A node that also
feeds a later weighted layer is part of the network, not post-processing (the last residual Add
before a classifier is quantized as before). Names are the ones ``ensure_node_names`` gives, which
is what the builders use, so the result can be passed as ``nodes_to_exclude`` unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from edgesdk.pipeline.graph_stats import ensure_node_names

_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
_MATMUL_OPS = frozenset({"MatMul", "Gemm"})
# Inputs that carry shapes, indices or axes rather than the data itself: not followed.
_NON_DATA_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Expand": frozenset({1}), "Tile": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}), "Split": frozenset({1}), "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}), "Pad": frozenset({1, 3}), "Resize": frozenset({1, 2, 3}),
    "Upsample": frozenset({1}), "Gather": frozenset({1}), "GatherElements": frozenset({1}),
    "GatherND": frozenset({1}), "TopK": frozenset({1}), "OneHot": frozenset({0, 1}),
    "ScatterND": frozenset({1}), "ScatterElements": frozenset({1}), "CumSum": frozenset({1}),
    "ReduceSum": frozenset({1}), "ReduceMean": frozenset({1}), "ReduceMax": frozenset({1}),
    "ReduceMin": frozenset({1}), "ReduceProd": frozenset({1}), "ReduceL2": frozenset({1}),
    "ConstantOfShape": frozenset({0}), "Range": frozenset({0, 1, 2}),
}
# Their outputs are metadata of a tensor, not derived from its values.
_METADATA_OPS = frozenset({"Shape", "Size"})
# Between DFL's Softmax and its projection only layout changes happen.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten"})


def postprocess_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(node name, reason)`` for every node of the main graph that should stay in float, in graph
    order; node names as ``ensure_node_names`` gives them. Empty when no output has a weighted
    layer on its way (nothing to tell apart)."""
    return _Graph(ensure_node_names(model)).postprocess()


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.order = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.nodes for o in n.output if o}
        self.arrays: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.arrays[node.output[0]] = attr.t
        self.constant = self._constant_tensors(graph)
        self.outputs = [o.name for o in graph.output]
        self.layers = {id(n) for n in self.nodes if self._is_layer(n)}
        self.dfl = {id(n) for n in self.nodes if self._is_dfl_projection(n)}
        self.layers -= self.dfl
        self.feeds_layer = self._feeds_layer()
        self.after_layer = self._after_layer()

    # -- facts per tensor and node ----------------------------------------------------------------
    def _constant_tensors(self, graph: onnx.GraphProto) -> set[str]:
        """Initializers, Constant outputs, and whatever is computed from them alone."""
        constant = set(self.arrays)
        inputs = {i.name for i in graph.input} - set(self.arrays)
        for node in self.nodes:
            ins = [i for i in node.input if i]
            if node.op_type == "Constant" or (ins and all(i in constant for i in ins)
                                              and not (set(ins) & inputs)):
                constant.update(o for o in node.output if o)
        return constant

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        """The node's inputs that carry values (not shapes, indices, axes), computed at run time."""
        if node.op_type in _METADATA_OPS:
            return []
        skip = _NON_DATA_INPUTS.get(node.op_type, frozenset())
        return [name for i, name in enumerate(node.input)
                if name and i not in skip and name not in self.constant]

    def _is_layer(self, node: onnx.NodeProto) -> bool:
        """A weighted layer: Conv/ConvTranspose, or MatMul/Gemm with a constant operand."""
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return False
        if node.op_type in _CONV_OPS:
            return node.input[1] in self.constant
        if node.op_type in _MATMUL_OPS:
            return node.input[0] in self.constant or node.input[1] in self.constant
        return False

    def _is_dfl_projection(self, node: onnx.NodeProto) -> bool:
        """DFL's expectation over distance bins: a layer whose weights are 0, 1, ..., n-1 (times a
        scale) reading a Softmax through layout changes only."""
        if id(node) not in self.layers:
            return False
        weight = next((self.arrays[i] for i in node.input[:2] if i in self.arrays), None)
        if weight is None or len(node.input) > 2 and node.input[2]:
            return False  # DFL's projection has no bias
        values = numpy_helper.to_array(weight).astype(np.float64).ravel()
        if values.size < 2 or values[1] <= 0 or not np.allclose(values, np.arange(values.size) * values[1]):
            return False
        source = self.producer.get(self.data_inputs(node)[0]) if self.data_inputs(node) else None
        for _ in range(8):
            if source is None or source.op_type not in _LAYOUT_OPS:
                break
            ins = self.data_inputs(source)
            source = self.producer.get(ins[0]) if ins else None
        return source is not None and source.op_type == "Softmax"

    def _consumers(self) -> dict[str, list[onnx.NodeProto]]:
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in self.data_inputs(node):
                consumers.setdefault(name, []).append(node)
        return consumers

    def _feeds_layer(self) -> set[int]:
        """Nodes some weighted layer reads, directly or through other nodes (reverse graph order)."""
        consumers = self._consumers()
        feeds: set[int] = set()
        for node in reversed(self.nodes):
            if any(id(c) in self.layers or id(c) in feeds
                   for o in node.output for c in consumers.get(o, [])):
                feeds.add(id(node))
        return feeds

    def _after_layer(self) -> set[int]:
        """Nodes that read a weighted layer's output, directly or through other nodes."""
        after: set[int] = set()
        for node in self.nodes:
            for name in self.data_inputs(node):
                src = self.producer.get(name)
                if src is not None and (id(src) in self.layers or id(src) in after):
                    after.add(id(node))
                    break
        return after

    # -- the walk ---------------------------------------------------------------------------------
    def _tail(self, output: str) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
        """Post-processing nodes on the way to ``output`` and the last layers where the walk stopped."""
        tail: dict[int, onnx.NodeProto] = {}
        last: dict[int, onnx.NodeProto] = {}
        start = self.producer.get(output)
        queue = deque([start] if start is not None else [])
        seen: set[int] = set()
        while queue:
            node = queue.popleft()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if id(node) in self.layers:
                last[id(node)] = node
                continue
            if id(node) in self.feeds_layer or id(node) not in self.after_layer:
                continue  # inside the network, or on a path with no layer at all
            tail[id(node)] = node
            queue.extend(p for p in (self.producer.get(i) for i in self.data_inputs(node)) if p is not None)
        return self._sorted(tail.values()), self._sorted(last.values())

    def _sorted(self, nodes: Iterable[onnx.NodeProto]) -> list[onnx.NodeProto]:
        return sorted(nodes, key=lambda n: self.order[id(n)])

    def _layers_behind(self, name: str, tail: set[int], memo: dict[str, frozenset[int]]) -> frozenset[int]:
        """The last layers a tensor of the tail comes from."""
        if name in memo:
            return memo[name]
        memo[name] = frozenset()  # cycles cannot occur in a valid graph; this guards anyway
        node = self.producer.get(name)
        found: frozenset[int] = frozenset()
        if node is not None and id(node) in self.layers:
            found = frozenset({id(node)})
        elif node is not None and id(node) in tail:
            found = frozenset().union(*(self._layers_behind(i, tail, memo) for i in self.data_inputs(node)))
        memo[name] = found
        return found

    def _head_layers(self, tail: list[onnx.NodeProto]) -> set[int]:
        """Final layers of several heads that a Concat of the tail gathers into one tensor."""
        members = {id(n) for n in tail}
        memo: dict[str, frozenset[int]] = {}
        heads: set[int] = set()
        for node in tail:
            if node.op_type != "Concat":
                continue
            per_input = [self._layers_behind(i, members, memo) for i in self.data_inputs(node)]
            merged = frozenset().union(*per_input) if per_input else frozenset()
            if sum(1 for s in per_input if s) >= 2 and len(merged) >= 2:
                heads |= merged
        return heads

    def postprocess(self) -> list[tuple[str, str]]:
        reasons: dict[int, str] = {}
        for output in self.outputs:
            tail, last = self._tail(output)
            if not last:
                continue
            kind = "conv" if any(n.op_type in _CONV_OPS for n in last) else "matmul"
            heads = self._head_layers(tail)
            by_id = {id(n): n for n in last}
            for layer_id in sorted(heads, key=lambda i: self.order[id(by_id[i])] if i in by_id else 0):
                if layer_id in by_id:
                    layer = by_id[layer_id]
                    reasons.setdefault(layer_id, (
                        f"final layer of a detector head: {len(heads)} heads are concatenated into "
                        f"output {output!r}: {layer.op_type}"))
            for node in tail:
                if id(node) in self.dfl:
                    why = f"DFL projection (arange weights after a Softmax) on the path to output {output!r}"
                else:
                    why = f"after the last {kind} on the path to output {output!r}"
                reasons.setdefault(id(node), f"{why}: {node.op_type}")
        chosen = [n for n in self.nodes if id(n) in reasons]
        return [(n.name, reasons[id(n)]) for n in chosen]
