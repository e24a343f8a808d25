"""Fix input shapes: the pass after load and check.

Explicit shapes come from the CLI (`--input-shape name=1x3x224x224`); a target whose shape policy
is "static" (an NPU) gets every remaining dynamic dim fixed too: the first (batch) dim to the
profile's batch, anything else is an error that says which --input-shape to pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import onnx

from edgesdk.errors import ConfigError
from edgesdk.pipeline.model_io import value_spec

POLICIES = ("dynamic", "static")
_DIMS = re.compile(r"^\d+([x,]\d+)*$")


def parse_input_shapes(specs: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse CLI strings "name=1x3x224x224" or "name:1,3,224,224" into {name: shape}.

    The split is at the last '=' (else the last ':'), so names like "input:0" work with '='.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        sep = "=" if "=" in spec else ":"
        name, found, dims = spec.rpartition(sep)
        name, dims = name.strip(), dims.strip().lower()
        if not found or not name or not _DIMS.match(dims):
            raise ConfigError(f"--input-shape {spec!r}: expected name=1x3x224x224 or name:1,3,224,224")
        shape = tuple(int(d) for d in re.split(r"[x,]", dims))
        if any(d < 1 for d in shape):
            raise ConfigError(f"--input-shape {spec!r}: every dim must be ≥ 1")
        if name in shapes:
            raise ConfigError(f"--input-shape {spec!r}: input '{name}' is given more than once")
        shapes[name] = shape
    return shapes


def _name_anonymous_dims(graph: onnx.GraphProto) -> None:
    """Give every anonymous dynamic dim of the graph's inputs and outputs a name of its own.

    Paddle2ONNX writes a dynamic dim as ``-1`` (a dim_value) or ``"?"`` (a dim_param every such
    dim shares). Read literally, -1 is a fixed size and all the "?" dims are one dimension, so a
    text-direction classifier's [-1, 3, ?, ?] could not take a 48×192 input.
    """
    for value in [*graph.input, *graph.output]:
        if value.type.WhichOneof("value") != "tensor_type":
            continue
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if (dim.HasField("dim_value") and dim.dim_value < 0) or dim.dim_param == "?":
                dim.dim_param = f"{value.name}_dim{i}"  # one field or the other: this clears dim_value


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                     policy: str = "dynamic", batch: int = 1) -> onnx.ModelProto:
    """A copy of ``model`` with the given input shapes applied (and all dims fixed if static).

    A symbolic dim name shared by several inputs (e.g. "batch" of input_ids and attention_mask)
    gets the same value everywhere. Shape inference is re-run so outputs and value_info follow.
    """
    if policy not in POLICIES:
        raise ConfigError(f"shape policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch for static shapes must be an int ≥ 1, got {batch!r}")
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    graph = fixed.graph
    _name_anonymous_dims(graph)
    initializers = {t.name for t in graph.initializer}
    inputs = {v.name: v for v in graph.input if v.name not in initializers}
    unknown = [name for name in shapes if name not in inputs]
    if unknown:
        raise ConfigError(f"--input-shape: unknown input {', '.join(repr(n) for n in unknown)} "
                          f"(model inputs: {', '.join(inputs) or 'none'})")

    params: dict[str, int] = {}  # symbolic dim name → value, shared across inputs
    for name, shape in shapes.items():
        _apply_explicit(inputs[name], shape, params)
    for value in inputs.values():
        _apply_params(value, params)
    if policy == "static":
        for value in inputs.values():
            _fix_batch(value, params, batch)
        for value in inputs.values():
            _apply_params(value, params)
            _require_static(value)
    _reinfer(fixed, params)
    return fixed


def _dims(value: onnx.ValueInfoProto):
    return value.type.tensor_type.shape.dim


def _shape_text(value: onnx.ValueInfoProto) -> str:
    return "x".join(str(d) for d in value_spec(value).shape) or "scalar"


def _apply_explicit(value: onnx.ValueInfoProto, shape: tuple[int, ...], params: dict[str, int]) -> None:
    name = value.name
    if value.type.WhichOneof("value") != "tensor_type":
        raise ConfigError(f"--input-shape: input '{name}' is not a tensor")
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):  # unknown rank: the given shape defines it
        for _ in shape:
            tensor_type.shape.dim.add()
    dims = tensor_type.shape.dim
    if len(dims) != len(shape):
        raise ConfigError(f"--input-shape: input '{name}' has rank {len(dims)} ({_shape_text(value)}) "
                          f"but {'x'.join(map(str, shape))} has rank {len(shape)}")
    for i, (dim, size) in enumerate(zip(dims, shape)):
        if dim.HasField("dim_value"):
            if dim.dim_value != size:
                raise ConfigError(f"--input-shape: input '{name}' dim {i} is fixed at {dim.dim_value} "
                                  f"in the model, not {size}")
            continue
        param = dim.dim_param if dim.HasField("dim_param") else ""
        if param:
            if params.get(param, size) != size:
                raise ConfigError(f"--input-shape: dim '{param}' of input '{name}' is {size} but another "
                                  f"input sharing '{param}' was given {params[param]}")
            params[param] = size
        dim.Clear()
        dim.dim_value = size


def _apply_params(value: onnx.ValueInfoProto, params: dict[str, int]) -> None:
    if value.type.WhichOneof("value") != "tensor_type":
        return
    for dim in _dims(value):
        if dim.HasField("dim_param") and dim.dim_param in params:
            size = params[dim.dim_param]
            dim.Clear()
            dim.dim_value = size


def _fix_batch(value: onnx.ValueInfoProto, params: dict[str, int], batch: int) -> None:
    """Static policy: a dynamic first dim is the batch and gets ``batch``."""
    if value.type.WhichOneof("value") != "tensor_type":
        raise ConfigError(f"input '{value.name}' is not a tensor; the target needs static tensor inputs")
    if not value.type.tensor_type.HasField("shape"):
        raise ConfigError(f"input '{value.name}' has no shape in the model; the target needs static "
                          f"shapes: pass --input-shape {value.name}=...")
    dims = _dims(value)
    if dims and not dims[0].HasField("dim_value"):
        if dims[0].HasField("dim_param") and dims[0].dim_param:
            params.setdefault(dims[0].dim_param, batch)
        dims[0].Clear()
        dims[0].dim_value = batch


def _require_static(value: onnx.ValueInfoProto) -> None:
    """Static policy: a dynamic dim other than the batch is the user's to give."""
    dims = _dims(value)
    for i, dim in enumerate(dims):
        if dim.HasField("dim_value"):
            continue
        param = dim.dim_param if dim.HasField("dim_param") else ""
        hint = "x".join(str(d.dim_value) if d.HasField("dim_value") else f"<{d.dim_param or f'dim{j}'}>"
                        for j, d in enumerate(dims))
        raise ConfigError(f"input '{value.name}' dim {i} is dynamic ('{param or '?'}'); the target needs "
                          f"static shapes: pass --input-shape {value.name}={hint}")


def _reinfer(model: onnx.ModelProto, params: dict[str, int]) -> None:
    """Re-run shape inference in place, dropping shapes that the new input shapes made stale."""
    graph = model.graph
    del graph.value_info[:]
    saved = {}
    for output in graph.output:
        if output.type.WhichOneof("value") != "tensor_type":
            continue
        if any(not d.HasField("dim_value") for d in _dims(output)):
            saved[output.name] = onnx.TypeProto()
            saved[output.name].CopyFrom(output.type)
            output.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference is a bonus here; a model it cannot handle keeps its written shapes
        inferred = None
    if inferred is not None:
        model.CopyFrom(inferred)
    for output in model.graph.output:
        old = saved.get(output.name)
        if old is not None and not output.type.tensor_type.HasField("shape"):
            output.type.CopyFrom(old)  # not re-inferred: keep the written shape, known dims filled in
            _apply_params(output, params)
