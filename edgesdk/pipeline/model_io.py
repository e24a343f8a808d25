"""Load and check the input model: the first pass of the packaging pipeline.

`load_model` reads an ONNX or TFLite file, checks it (onnx.checker, external data present) and
describes it as a `LoadedModel`; every failure is a one-line `ModelError` naming the file.
`ops_unsupported` says which op types a runtime cannot run; `save_model` writes ONNX models of any
size (external data past 1.8 GB, since one protobuf cannot pass 2 GB).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from edgesdk.atomicfile import fsync_dir, write_bytes_atomic
from edgesdk.errors import ConfigError, ModelError, UnsupportedModelError
from edgesdk.manifest import TensorSpec

TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4:8 of every .tflite file
ML_DOMAIN = "ai.onnx.ml"
DEFAULT_DOMAIN = "ai.onnx"  # how `domains` and messages name ONNX's default ("") domain
# Past this many serialized bytes `save_model` moves tensors to a data file: protobuf's hard
# limit is 2 GiB, and the margin leaves room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
RUNTIMES = ("onnxruntime", "openvino", "litert")
# A tensor inside an If/Loop/Scan body counts as a weight from this many elements on; smaller
# ones are loop counters, axes and scalar scales that every control-flow graph carries.
_WEIGHT_MIN_ELEMENTS = 16
_CONTROL_FLOW = ("If", "Loop", "Scan")


@dataclass(frozen=True)
class LoadedModel:
    """A checked input model and what the later passes need to know about it."""

    path: Path
    format: str  # "onnx" | "tflite"
    sha256: str  # of the file as given (external data not included)
    size: int  # bytes of the file as given
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int | None  # default-domain opset; None for tflite
    domains: frozenset[str]  # op domains the graph uses; the default domain is "ai.onnx"
    has_ml_ops: bool  # any op of the ai.onnx.ml domain (scikit-learn style models)
    has_if_subgraph_weights: bool  # weights inside If/Loop/Scan bodies (quantizers skip them)
    op_types: tuple[str, ...]  # sorted, unique, subgraphs included
    model: onnx.ModelProto | None  # external data loaded; None for tflite
    notes: list[str] = field(default_factory=list)  # what was not checked or could not be inferred


def load_model(path: str | Path) -> LoadedModel:
    """Read and check an ONNX or TFLite model; raise ModelError with one line on a bad file."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    if not path.is_file():
        raise ModelError(f"{path}: not a file (give an .onnx or .tflite model file)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model file: {exc.strerror or exc}") from None
    sha256 = hashlib.sha256(data).hexdigest()
    if data[4:8] == TFLITE_IDENTIFIER:
        return _load_tflite(path, sha256, len(data))
    if path.suffix.lower() == ".tflite":
        raise ModelError(f"{path}: not a TFLite model (no TFL3 identifier at bytes 4-8)")
    return _load_onnx(path, data, sha256)


def _load_onnx(path: Path, data: bytes, sha256: str) -> LoadedModel:
    model = _parse_onnx(path, data)
    _check_external_data(path, model)
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: fails the ONNX checker: {_first_line(exc)}") from None
    notes: list[str] = []
    # Inference runs before the external data is loaded: it needs dims, not weights, and the
    # proto stays small however large the model is.
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # real models fail inference in many ways; it is optional here
        notes.append(f"ONNX shape inference failed, shapes as written in the file: {_first_line(exc)}")
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"{path}: cannot load external data: {_first_line(exc)}") from None

    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [value_spec(v) for v in graph.input if v.name not in initializers]
    outputs = [value_spec(v) for v in graph.output]
    for spec in inputs:
        if not spec.shape and _rank_unknown(graph, spec.name):
            notes.append(f"input '{spec.name}' has no shape in the model (unknown rank)")
    nodes = list(iter_nodes(model))
    domains = frozenset(_domain_name(n.domain) for n in nodes)
    return LoadedModel(
        path=path, format="onnx", sha256=sha256, size=len(data), inputs=inputs, outputs=outputs,
        opset=opset_version(model, ""), domains=domains, has_ml_ops=ML_DOMAIN in domains,
        has_if_subgraph_weights=any(_subgraphs_hold_weights(n) for n in nodes
                                    if n.op_type in _CONTROL_FLOW and n.domain in ("", DEFAULT_DOMAIN)),
        op_types=tuple(sorted({n.op_type for n in nodes})), model=model, notes=notes,
    )


def _parse_onnx(path: Path, data: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        # Every serializer writes ir_version (field 1, varint: tag 0x08) first; a file that
        # starts like that but does not parse was cut short or corrupted.
        if len(data) > 1 and data[0] == 0x08 and 1 <= data[1] <= 32:
            raise ModelError(f"{path}: truncated or corrupt ONNX model (protobuf parse failed)") from None
        raise ModelError(f"{path}: not an ONNX model (protobuf parse failed)") from None
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelError(f"{path}: not an ONNX model (no ir_version or graph in the file)")
    return model


def _check_external_data(path: Path, model: onnx.ModelProto) -> None:
    """Every external data file exists inside the model's folder and is long enough."""
    base = path.parent.resolve()
    for tensor in iter_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelError(f"{path}: external data location '{location}' of tensor '{tensor.name}' "
                             "points outside the model's folder")
        if not target.is_file():
            raise ModelError(f"{path}: external data file '{location}' not found "
                             f"(tensor '{tensor.name}' expects it next to the model)")
        offset = info.offset or 0
        if info.length and offset + info.length > target.stat().st_size:
            raise ModelError(f"{path}: external data file '{location}' is shorter than tensor "
                             f"'{tensor.name}' needs (truncated?)")


def _load_tflite(path: Path, sha256: str, size: int) -> LoadedModel:
    notes: list[str] = []
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    op_types: tuple[str, ...] = ()
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        notes.append("LiteRT (ai-edge-litert) is not installed: the TFLite model was not checked "
                     "and its inputs/outputs are unknown")
    else:
        try:
            interpreter = Interpreter(model_path=str(path))
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{path}: LiteRT cannot read this TFLite model: {_first_line(exc)}") from None
        inputs = [_tflite_spec(d) for d in interpreter.get_input_details()]
        outputs = [_tflite_spec(d) for d in interpreter.get_output_details()]
        try:  # private API of the interpreter; only used to describe the model
            op_types = tuple(sorted({d["op_name"] for d in interpreter._get_ops_details()}))
        except Exception:
            notes.append("op types of the TFLite model could not be listed")
    return LoadedModel(
        path=path, format="tflite", sha256=sha256, size=size, inputs=inputs, outputs=outputs,
        opset=None, domains=frozenset(), has_ml_ops=False, has_if_subgraph_weights=False,
        op_types=op_types, model=None, notes=notes,
    )


def _tflite_spec(detail: dict) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(detail["name"], np.dtype(detail["dtype"]).name,
                      tuple("?" if int(d) < 0 else int(d) for d in dims))


# -- describing ONNX graphs ----------------------------------------------------------------------

def value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """TensorSpec of a graph input/output; unnamed dynamic dims are "?", non-tensors "object"."""
    if value.type.WhichOneof("value") != "tensor_type":
        return TensorSpec(value.name, "object", ())
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type == onnx.TensorProto.STRING:
        dtype = "str"
    else:
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        except (KeyError, ValueError, TypeError):
            dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    shape: list[int | str] = []
    if tensor_type.HasField("shape"):
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param if dim.HasField("dim_param") and dim.dim_param else "?")
    return TensorSpec(value.name, dtype, tuple(shape))


def model_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The model's real inputs (initializers listed as inputs by old exporters left out)."""
    initializers = {t.name for t in model.graph.initializer}
    return [value_spec(v) for v in model.graph.input if v.name not in initializers]


def opset_version(model: onnx.ModelProto, domain: str) -> int | None:
    """The model's opset for a domain ("" and "ai.onnx" are the same); None when not imported."""
    wanted = "" if domain in ("", DEFAULT_DOMAIN) else domain
    versions = [o.version for o in model.opset_import
                if ("" if o.domain in ("", DEFAULT_DOMAIN) else o.domain) == wanted]
    return max(versions) if versions else None


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies) inside it, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def iter_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node of the model: main graph, subgraphs and local function bodies."""
    for graph in iter_graphs(model.graph):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that may hold data: initializers and tensor attributes, subgraphs included."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        for node in graph.node:
            yield from _attribute_tensors(node)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            yield attr.t
        elif attr.type == onnx.AttributeProto.TENSORS:
            yield from attr.tensors


def _subgraphs_hold_weights(node: onnx.NodeProto) -> bool:
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in subs:
            for graph in iter_graphs(sub):
                tensors = list(graph.initializer)
                tensors += [t for n in graph.node if n.op_type == "Constant" for t in _attribute_tensors(n)]
                if any(_is_weight(t) for t in tensors):
                    return True
    return False


def _is_weight(tensor: onnx.TensorProto) -> bool:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16)
    return tensor.data_type in floats and int(np.prod(tensor.dims)) >= _WEIGHT_MIN_ELEMENTS


def _rank_unknown(graph: onnx.GraphProto, name: str) -> bool:
    for value in graph.input:
        if value.name == name:
            return value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape")
    return False


def _domain_name(domain: str) -> str:
    return DEFAULT_DOMAIN if domain in ("", DEFAULT_DOMAIN) else domain


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    context = next((ln for ln in lines[1:] if ln.startswith("==> Context:")), None)
    return lines[0] + (f" ({context[len('==> Context:'):].strip()})" if context else "")


# -- runtime support -----------------------------------------------------------------------------

def ops_unsupported(loaded: LoadedModel, runtime: str) -> list[str]:
    """Op types (sorted) of the model that ``runtime`` cannot run; [] when it can run them all."""
    return sorted({op for _, op in _unsupported(loaded, runtime)})


def require_runtime_support(loaded: LoadedModel, runtime: str) -> None:
    """Raise UnsupportedModelError with one line naming each op ``runtime`` cannot run."""
    _check_runtime(runtime)
    if loaded.format == "tflite" and runtime != "litert":
        raise UnsupportedModelError(f"{loaded.path}: a TFLite model runs only on runtime litert, not {runtime}")
    if loaded.format == "onnx" and runtime == "litert":
        raise UnsupportedModelError(f"{loaded.path}: an ONNX model cannot run on runtime litert "
                                    "(it runs TFLite models only)")
    missing = _unsupported(loaded, runtime)
    if missing:
        by_domain: dict[str, list[str]] = {}
        for domain, op in missing:
            by_domain.setdefault(domain, []).append(op)
        ops = "; ".join(f"{'op' if len(names) == 1 else 'ops'} {', '.join(names)} (domain {domain})"
                        for domain, names in by_domain.items())
        raise UnsupportedModelError(f"{loaded.path}: {ops} cannot run on runtime {runtime}")


def _unsupported(loaded: LoadedModel, runtime: str) -> list[tuple[str, str]]:
    """(domain, op_type) pairs the runtime cannot run, sorted and unique."""
    _check_runtime(runtime)
    if loaded.format == "tflite" or runtime == "litert":
        if (loaded.format == "tflite") == (runtime == "litert"):
            return []
        domain = "tflite" if loaded.format == "tflite" else DEFAULT_DOMAIN
        return [(domain, op) for op in loaded.op_types]
    if loaded.model is None:
        return []
    model = loaded.model
    local_functions = {(f.domain, f.name) for f in model.functions}
    missing: set[tuple[str, str]] = set()
    for node in iter_nodes(model):
        domain = "" if node.domain in ("", DEFAULT_DOMAIN) else node.domain
        if (node.domain, node.op_type) in local_functions:
            continue  # runtimes inline local functions; their bodies are checked as nodes
        if runtime == "onnxruntime":
            ok = _ort_cpu_runs(domain, node.op_type, opset_version(model, domain) or 1)
        else:
            # OpenVINO's ONNX frontend has no conversion rule for any ai.onnx.ml op (checked with
            # a scikit-learn LinearClassifier: "No conversion rule found for operations").
            ok = domain != ML_DOMAIN
        if not ok:
            missing.add((_domain_name(domain), node.op_type))
    return sorted(missing)


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")


@lru_cache(maxsize=1)
def _ort_cpu_kernels() -> dict[tuple[str, str], tuple[tuple[int, int], ...]]:
    """(domain, op_type) → version ranges of onnxruntime's CPU kernels."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    if hasattr(ort_c, "get_all_opkernel_def"):
        for k in ort_c.get_all_opkernel_def():
            if k.provider == "CPUExecutionProvider":
                kernels.setdefault((k.domain, k.op_name), []).append(tuple(k.version_range))
    else:  # older builds: schemas only, no versions
        for s in ort_c.get_all_operator_schema():
            kernels.setdefault((s.domain, s.name), []).append((1, 2**31 - 1))
    return {key: tuple(ranges) for key, ranges in kernels.items()}


def _ort_cpu_runs(domain: str, op_type: str, opset: int) -> bool:
    if domain == "" and op_type == "Constant":
        return True  # ORT turns Constant nodes into initializers; there is no kernel
    ranges = _ort_cpu_kernels().get((domain, op_type))
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:  # contrib or custom op onnx does not know: trust the kernel list
        return ranges is not None
    if ranges and any(lo <= schema.since_version <= hi for lo, hi in ranges):
        return True
    # ORT expands ops defined as ONNX functions when it has no kernel for them.
    return bool(schema.has_function or schema.has_context_dependent_function)


# -- saving --------------------------------------------------------------------------------------

def save_model(model: onnx.ModelProto, path: str | Path, *,
               external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write an ONNX model atomically; past the threshold its tensors go to `<name>.data` beside it.

    Returns every file written. The caller's model is not modified.
    """
    path = Path(path)
    if any(external_data_helper.uses_external_data(t) for t in iter_tensors(model)):
        raise ModelError(f"{path}: cannot save a model whose external data is not loaded")
    if model.ByteSize() <= external_data_threshold:
        write_bytes_atomic(path, model.SerializeToString())
        return [path]
    data_name = path.name + ".data"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_as_external_data strips the tensors of the model it is given
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(copy, staging / path.name, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        for name in (data_name, path.name):  # data first: the model never points at a missing file
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(staging / name, path.parent / name)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [path, path.parent / data_name]
