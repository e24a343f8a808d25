"""Facts about a graph and the small rewrites that prepare it for quantization, plus the record
every variant builder returns.

The counts answer questions MODELS.md says a packager must ask: did quantization change anything
(`count_quantized_nodes`), is this graph MatMul- or Conv-bound (`matmul_fraction`), is it a
classic-ML graph (`has_ml_domain`), and do its weights hide inside control flow
(`if_subgraph_weight_count`). The rewrites (`ensure_node_names`, `fold_constant_nodes`,
`upgrade_opset`, `gemm_to_matmul`) each return a copy and never touch the caller's model.
`BuiltVariant` and `VariantNotApplicable` live here so the ONNX,
OpenVINO and LiteRT builder modules share them without importing one another, and so does
`split_float_nodes`, which reads a ``nodes_to_exclude`` value (names or ``(name, reason)`` pairs)
into the names a quantizer takes and the ``float_nodes`` records a variant reports.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgesdk.errors import ConfigError, ModelError, PackagingError, first_line
from edgesdk.pipeline.model_io import iter_graphs

ML_DOMAIN = "ai.onnx.ml"
# Ops whose weights static INT8 quantizes and whose names a repair step may leave in float.
QUANTIZABLE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")

# Ops that are themselves integer kernels (QOperator format, dynamic quantization, contrib ops).
INTEGER_OP_TYPES = frozenset({
    "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm",
    "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
})
_QDQ_OP_TYPES = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Ops ORT fuses with dequantized inputs into an integer kernel even when their output stays float
# (DQ→MatMul→float becomes MatMulIntegerToFloat).
_FUSED_WITHOUT_OUTPUT_Q = frozenset({"MatMul", "Gemm"})
_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
_MATMUL_OPS = frozenset({"MatMul", "Gemm"})
_RNN_OPS = frozenset({"LSTM", "GRU", "RNN"})
_CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})


class VariantNotApplicable(PackagingError):
    """This variant kind does not apply to this model; the caller records "skipped: <reason>"."""


@dataclass(frozen=True)
class BuiltVariant:
    """One variant written to disk by a builder.

    ``files``: main file first (an OpenVINO IR is .xml then .bin). ``runtime_options`` are what a
    session of this variant should be opened with (the agent and the validator both use them).
    ``notes`` record every repair or fallback the builder applied, one line each.
    """

    kind: str
    files: list[Path]
    precision: str
    runtime: str
    quantized_nodes: int = 0
    runtime_options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # name → {"shape": [...], "dtype": "float32"} for inputs/outputs, where the builder read them
    # from the built file (LiteRT); empty where the ONNX source already gives the signature.
    io_signature: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # Nodes an INT8 build kept in float on request, each {"node": name, "reason": why} (the
    # manifest's record of what stayed float: post-processing, repair picks, the user's list).
    float_nodes: list[dict[str, str]] = field(default_factory=list)

    @property
    def main_file(self) -> Path:
        return self.files[0]


FLOAT_BY_REQUEST = "kept in float by request"


def split_float_nodes(entries: Any, kind: str) -> tuple[tuple[str, ...], list[dict[str, str]]]:
    """Normalise a ``nodes_to_exclude`` value: each entry a node name or a ``(name, reason)`` pair.

    Returns the names (for the quantizer, first occurrence kept) and the records for
    ``BuiltVariant.float_nodes`` (``{"node", "reason"}``; names given alone get
    ``FLOAT_BY_REQUEST``). A string or a malformed entry is a ConfigError naming ``kind``.
    """
    if isinstance(entries, (str, bytes)):
        raise ConfigError(f"{kind}: nodes_to_exclude must be a sequence of node names or "
                          "(name, reason) pairs, not a string")
    names: list[str] = []
    records: list[dict[str, str]] = []
    for entry in entries or ():
        if isinstance(entry, str):
            name, reason = entry, FLOAT_BY_REQUEST
        elif (isinstance(entry, (tuple, list)) and len(entry) == 2
              and all(isinstance(x, str) for x in entry)):
            name, reason = entry
        elif isinstance(entry, dict) and isinstance(entry.get("node"), str):
            name, reason = entry["node"], str(entry.get("reason") or FLOAT_BY_REQUEST)
        else:
            raise ConfigError(f"{kind}: nodes_to_exclude entry {entry!r} is neither a node name nor "
                              "a (name, reason) pair")
        if not name:
            raise ConfigError(f"{kind}: nodes_to_exclude has an empty node name")
        if name in names:
            continue
        names.append(name)
        records.append({"node": name, "reason": reason})
    return tuple(names), records


# --------------------------------------------------------------------------- graph walking


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and its subgraphs (not model-local functions, unlike
    ``model_io.iter_nodes``, which takes a whole model)."""
    for g in iter_graphs(graph):
        yield from g.node


def has_ml_domain(model: onnx.ModelProto) -> bool:
    """True when any node (subgraphs included) is a classic-ML op from the ai.onnx.ml domain."""
    return bool(ml_op_types(model))


def ml_op_types(model: onnx.ModelProto) -> list[str]:
    """The distinct ai.onnx.ml op types the graph uses, sorted (for messages)."""
    return sorted({n.op_type for n in iter_nodes(model.graph) if n.domain == ML_DOMAIN})


# --------------------------------------------------------------------------- quantized nodes


def _count_in_graph(graph: onnx.GraphProto, outer_producers: dict[str, str]) -> int:
    producers = dict(outer_producers)  # subgraphs may read tensors produced in the outer scope
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node.op_type
        for inp in node.input:
            consumers.setdefault(inp, []).append(node.op_type)
    count = 0
    for node in graph.node:
        if node.op_type.startswith("QLinear") or node.op_type in INTEGER_OP_TYPES:
            count += 1
        elif node.op_type not in _QDQ_OP_TYPES:
            dq_inputs = [producers.get(i) == "DequantizeLinear" for i in node.input]
            if any(dq_inputs):
                output_quantized = any("QuantizeLinear" in consumers.get(o, ()) for o in node.output)
                fused = node.op_type in _FUSED_WITHOUT_OUTPUT_Q and all(dq_inputs[:2])
                if output_quantized or fused:
                    count += 1
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                count += _count_in_graph(sub, producers)
    return count


def count_quantized_nodes(model: onnx.ModelProto) -> int:
    """How many compute nodes run in int8, subgraphs included.

    Integer ops (QLinear*, ConvInteger, MatMulInteger, ...) count one each. In QDQ form a node counts
    when ORT's QDQ fusion turns it into an integer kernel: an input comes from DequantizeLinear and
    its output goes into QuantizeLinear, or it is a MatMul/Gemm whose two data inputs are both
    dequantized. A float op merely reading a DequantizeLinear output (weight-only DQ, a Softmax
    after the last quantized layer) does not count: it computes in float.
    """
    return _count_in_graph(model.graph, {})


def count_openvino_quantized(ir_xml_path: str | Path) -> int:
    """How many ops of an OpenVINO IR consume int8 data: a FakeQuantize/FakeConvert input, or a
    weight decompressed from an 8-bit-or-smaller integer constant (NNCF's compressed weights)."""
    import openvino as ov  # host-side tooling; imported only when needed

    try:
        ir = ov.Core().read_model(str(ir_xml_path))
    except Exception as exc:  # openvino raises RuntimeError subclasses with multi-line text
        raise ModelError(f"{ir_xml_path}: cannot read OpenVINO IR: {first_line(exc)}") from None
    low_bit = {"i8", "u8", "i4", "u4", "f8e4m3", "f8e5m2", "nf4"}
    skip = {"Constant", "Parameter", "Result", "FakeQuantize", "FakeConvert", "Convert"}

    def from_low_bit_constant(node: Any, depth: int = 0) -> bool:
        # Decompression chain: Constant(i8) → Convert → [Subtract zp] → Multiply scale [→ Reshape].
        if node.get_type_name() == "Constant":
            return node.get_output_element_type(0).get_type_name() in low_bit
        if depth > 4 or node.get_type_name() not in {"Convert", "Subtract", "Multiply", "Reshape"}:
            return False
        return any(from_low_bit_constant(i.get_source_output().get_node(), depth + 1)
                   for i in node.inputs())

    count = 0
    for op in ir.get_ops():
        if op.get_type_name() in skip or from_low_bit_constant(op):  # part of a decompression chain
            continue
        sources = [i.get_source_output().get_node() for i in op.inputs()]
        if any(s.get_type_name() in ("FakeQuantize", "FakeConvert") for s in sources) or any(
                s.get_type_name() != "Constant" and from_low_bit_constant(s) for s in sources):
            count += 1
    return count


# --------------------------------------------------------------------------- MatMul vs Conv


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is a hint here; weights alone still give an estimate
        inferred = model
    shapes: dict[str, list[int | None]] = {}
    for g in iter_graphs(inferred.graph):
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def _prod_known(dims: list[int | None] | None) -> int:
    """Product with unknown (symbolic) dims counted as 1, i.e. per batch element / per step."""
    return int(np.prod([d if d else 1 for d in dims])) if dims is not None else 1


def matmul_fraction(model: onnx.ModelProto) -> float:
    """Estimated share of multiply-accumulates in MatMul/Gemm/RNN ops vs Conv ops, 0.0 to 1.0.

    MACs, not parameter counts: a CNN with a large FC head has most of its weights in Gemm but
    most of its work in Conv, and dynamic INT8 would make it slower. Per op, MACs = output elements
    × reduction length, from ONNX shape inference with symbolic dims taken as 1. Where a shape is
    unknown the estimate falls back to the op's weight elements (one output position). 0.0 when
    the graph has neither kind of op.
    """
    shapes = _known_shapes(model)
    weights: dict[str, tuple[int, ...]] = {}
    for g in iter_graphs(model.graph):
        for init in g.initializer:
            weights[init.name] = tuple(init.dims)
        for node in g.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        weights[node.output[0]] = tuple(attr.t.dims)

    def shape(name: str) -> list[int | None] | None:
        if name in weights:
            return list(weights[name])
        return shapes.get(name)

    conv = mm = 0.0
    for node in iter_nodes(model.graph):
        if node.op_type in _CONV_OPS and len(node.input) > 1:
            w = shape(node.input[1])
            out = shapes.get(node.output[0])
            if w is None:
                continue
            # Conv: each output element reduces Cin/g·kh·kw; ConvTranspose: each input element
            # scatters into Cout/g·kh·kw outputs.
            positions = out if node.op_type == "Conv" else shapes.get(node.input[0])
            conv += (_prod_known(positions) * _prod_known(w[1:])) if positions else _prod_known(w)
        elif node.op_type in _MATMUL_OPS and len(node.input) > 1:
            a, b, out = shape(node.input[0]), shape(node.input[1]), shapes.get(node.output[0])
            if node.op_type == "Gemm":
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                k = (a[0] if trans_a else a[-1]) if a else None
            else:
                k = a[-1] if a else None
            if out is not None and k:
                mm += _prod_known(out) * k
            elif b is not None:
                mm += _prod_known(b)
        elif node.op_type in _RNN_OPS and len(node.input) > 2:
            x = shapes.get(node.input[0])
            steps = (x[0] or 1) if x else 1
            mm += (_prod_known(shape(node.input[1])) + _prod_known(shape(node.input[2]))) * steps
    total = conv + mm
    return float(mm / total) if total else 0.0


# --------------------------------------------------------------------------- hidden weights


def _is_weight(tensor: onnx.TensorProto, dtypes: frozenset[int] = _FLOAT_TYPES) -> bool:
    return tensor.data_type in dtypes and int(np.prod(tensor.dims)) > 1


def _graph_weights(graph: onnx.GraphProto, dtypes: frozenset[int] = _FLOAT_TYPES) -> int:
    """Weight tensors held directly by one graph: initializers and Constant nodes."""
    return sum(_is_weight(t, dtypes) for t in graph.initializer) + sum(
        1 for n in graph.node if n.op_type == "Constant"
        and any(a.name == "value" and _is_weight(a.t, dtypes) for a in n.attribute))


def if_subgraph_weight_count(model: onnx.ModelProto) -> int:
    """Float weight tensors (more than one element) held inside If/Loop/Scan subgraphs, as
    initializers or Constant nodes. Quantizers skip them: a count > 0 explains "0 nodes quantized"."""
    count = 0
    for node in iter_nodes(model.graph):  # nested control flow is counted when its node is reached
        if node.op_type in _CONTROL_FLOW_OPS:
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                count += sum(_graph_weights(sub) for sub in subs)
    return count


def float_weight_count(model: onnx.ModelProto, include_subgraphs: bool = True,
                       float32_only: bool = False) -> int:
    """Float weight tensors (initializers and Constant nodes, more than one element)."""
    dtypes = frozenset({onnx.TensorProto.FLOAT}) if float32_only else _FLOAT_TYPES
    graphs = iter_graphs(model.graph) if include_subgraphs else iter([model.graph])
    return sum(_graph_weights(g, dtypes) for g in graphs)


# --------------------------------------------------------------------------- preparation rewrites


def ensure_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where every node (subgraphs included) has a unique name.

    Unnamed or duplicate nodes become ``{op_type}_{n}`` in graph order, so the same input model
    always gets the same names: ``quantizable_node_names`` and ``nodes_to_exclude`` agree.
    """
    model = copy.deepcopy(model)
    taken = {n.name for n in iter_nodes(model.graph) if n.name}  # explicit names are never changed
    seen: set[str] = set()
    for graph in iter_graphs(model.graph):
        for i, node in enumerate(graph.node):
            if not node.name or node.name in seen:  # unnamed, or a later duplicate
                base, n = f"{node.op_type}_{i}", 0
                node.name = base
                while node.name in taken or node.name in seen:
                    n += 1
                    node.name = f"{base}_{n}"
            seen.add(node.name)
    return model


def quantizable_node_names(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's Conv/ConvTranspose/MatMul/Gemm nodes, in graph order, after
    ``ensure_node_names`` (static quantization does not enter subgraphs)."""
    named = ensure_node_names(model)
    return [n.name for n in named.graph.node if n.op_type in QUANTIZABLE_OP_TYPES and not n.domain]


def fold_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose `Constant` nodes are initializers (subgraphs included).

    ORT's quantizers only see weights that are initializers; ``quantize_dynamic`` fails outright on
    Constant-node weights. Kept as nodes: a Constant that is directly a graph output, sparse
    constants, and, for IR < 4 models (initializers must be graph inputs there), those inside
    subgraphs.
    """
    return fold_constant_nodes_counted(model)[0]


def fold_constant_nodes_counted(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``fold_constant_nodes``, with how many Constant nodes it folded (for notes and reports)."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    old_ir = folded.ir_version < 4
    graphs = list(iter_graphs(folded.graph))  # depth first: the main graph comes first
    count = 0
    # Deepest first: rewriting a graph's node list copies its nodes, so a subgraph is folded
    # before the graph that holds it.
    for index in reversed(range(len(graphs))):
        graph = graphs[index]
        if old_ir and index > 0:
            continue
        outputs = {v.name for v in graph.output}
        kept = []
        for node in graph.node:
            tensor = _constant_tensor(node) if node.output and node.output[0] not in outputs else None
            if tensor is None:
                kept.append(node)
                continue
            graph.initializer.append(tensor)
            if old_ir:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                                 list(tensor.dims)))
        if len(kept) != len(graph.node):
            count += len(graph.node) - len(kept)
            del graph.node[:]
            graph.node.extend(kept)
    return folded, count


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    name = node.output[0]
    make = helper.make_tensor
    TP = onnx.TensorProto
    if attr.name == "value":
        tensor = TP()
        tensor.CopyFrom(attr.t)
        tensor.name = name
        return tensor
    if attr.name == "value_float":
        return make(name, TP.FLOAT, [], [attr.f])
    if attr.name == "value_floats":
        return make(name, TP.FLOAT, [len(attr.floats)], list(attr.floats))
    if attr.name == "value_int":
        return make(name, TP.INT64, [], [attr.i])
    if attr.name == "value_ints":
        return make(name, TP.INT64, [len(attr.ints)], list(attr.ints))
    if attr.name == "value_string":
        return make(name, TP.STRING, [], [attr.s])
    if attr.name == "value_strings":
        return make(name, TP.STRING, [len(attr.strings)], list(attr.strings))
    return None  # sparse_value: left as a node


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model converted to ``target`` opset with onnx's version converter, checked."""
    converted = onnx.version_converter.convert_version(model, target)
    onnx.checker.check_model(converted)
    return converted


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy where plain Gemm nodes (alpha=beta=1, no transA, constant B) are MatMul (+ Add).

    ORT's dynamic quantizer has no Gemm kernel (MatMulInteger only); an MLP exported as Gemm would
    otherwise quantize nothing. The MatMul keeps the Gemm's name; the bias Add is ``{name}/bias``.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes, rewritten, replaced = [], 0, set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (node.op_type == "Gemm" and not node.domain and attrs.get("alpha", 1.0) == 1.0
                 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
                 and node.input[1] in inits)
        if not plain:
            new_nodes.append(node)
            continue
        b_name = node.input[1]
        if attrs.get("transB", 0):
            replaced.add(b_name)
            b = numpy_helper.to_array(inits[b_name]).T.copy()
            b_name = f"{b_name}/transposed"
            if b_name not in inits:
                inits[b_name] = numpy_helper.from_array(b, b_name)
                graph.initializer.append(inits[b_name])
        has_bias = len(node.input) > 2 and bool(node.input[2])
        mm_out = f"{node.output[0]}/matmul" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [mm_out], name=node.name))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                              name=f"{node.name}/bias"))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(new_nodes)
        # Drop only the untransposed weights nothing reads any more (subgraphs and outputs count).
        used = {i for n in iter_nodes(graph) for i in n.input} | {o.name for o in graph.output}
        stale = replaced - used - {i.name for i in graph.input}
        kept = [t for t in graph.initializer if t.name not in stale]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return model, rewritten
