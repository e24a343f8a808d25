"""ONNX variant builders: fp32, fp16, static INT8 (QDQ) and dynamic INT8, each a small pass.

Every builder has a frozen ``Config`` (each parameter declared with type, default and help, like
Olive's passes) and one ``build(model, out_dir, samples) -> BuiltVariant``. A builder works on a
copy of the (already simplified) model, writes into a hidden work folder inside ``out_dir`` and
moves the finished file out only on success, and never writes into the current directory. When a
kind does not apply to a model it raises ``VariantNotApplicable`` with the reason.

The quantization traps of docs MODELS.md are handled here: Constant-node weights are folded
first, opset < 13 is upgraded for per-channel QDQ, ``quant_pre_process`` is retried without
symbolic shape inference (and skipped when it still fails), classic-ML graphs are refused, and a
quantization that changed nothing (weights inside ``If`` subgraphs) is refused, not shipped.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnx.inliner  # not imported by `import onnx`

from edgesdk.errors import ConfigError, PackagingError
from edgesdk.pipeline.build_support import (
    PROTO_LIMIT, Samples, check_samples, config_from_options, param, publish, save_onnx,
    staged_files, work_dir,
)
from edgesdk.pipeline.calibration_cache import QuantCache, file_digest
from edgesdk.pipeline.graph_stats import (
    QUANTIZABLE_OP_TYPES, BuiltVariant, VariantNotApplicable, count_quantized_nodes, default_opset,
    ensure_node_names, first_line, float_weight_count, fold_constant_nodes_counted, gemm_to_matmul,
    if_subgraph_weight_count, iter_nodes, matmul_fraction, ml_op_types, split_float_nodes, upgrade_opset,
)
from edgesdk.profiles import CALIBRATION_METHODS, VARIANT_KINDS
from edgesdk.quiet import output_hint, output_mark

__all__ = [
    "BuiltVariant", "VariantNotApplicable", "OnnxFp32Builder", "OnnxFp16Builder",
    "OnnxInt8StaticBuilder", "OnnxInt8DynamicBuilder", "Fp32Config", "Fp16Config",
    "Int8StaticConfig", "Int8DynamicConfig", "ONNX_BUILDERS",
]


# --------------------------------------------------------------------------- checks


def refuse_ml_graph(model: onnx.ModelProto, kind: str) -> None:
    ops = ml_op_types(model)
    if ops:
        raise VariantNotApplicable(
            f"{kind}: classic-ML graph (ai.onnx.ml ops: {', '.join(ops)}) has no INT8 kernels")


def check_loads_in_ort(path: Path, kind: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the exception below carries what matters
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... classes
        raise PackagingError(f"{kind}: built model does not load in onnxruntime: {first_line(exc)}") \
            from None


# --------------------------------------------------------------------------- builders


class _OnnxBuilder:
    kind: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any = None, cache: QuantCache | None = None) -> None:
        self.config = config if config is not None else self.Config()
        # Shared by the INT8 builds of one package (pre-processed model, calibration ranges);
        # builders that calibrate nothing ignore it.
        self.cache = cache

    @classmethod
    def from_options(cls, options: dict[str, Any], cache: QuantCache | None = None) -> _OnnxBuilder:
        return cls(config_from_options(cls.Config, cls.kind, options), cache)

    def _result(self, files: list[Path], notes: list[str], quantized: int = 0) -> BuiltVariant:
        info = VARIANT_KINDS[self.kind]
        kept = getattr(self.config, "nodes_to_exclude", ())
        return BuiltVariant(kind=self.kind, files=files, precision=info.precision,
                            runtime=info.runtime, quantized_nodes=quantized, notes=notes,
                            float_nodes=[{"node": name, "reason": reason} for name, reason in kept])


@dataclass(frozen=True)
class Fp32Config:
    """onnx-fp32 has nothing to set: the simplified model is the reference."""


class OnnxFp32Builder(_OnnxBuilder):
    """Save the (already simplified) model as it is: the reference every variant is checked against."""

    kind = "onnx-fp32"
    Config = Fp32Config

    def build(self, model: onnx.ModelProto, out_dir: Path, samples: Samples | None = None) -> BuiltVariant:
        out_dir = Path(out_dir)
        with work_dir(out_dir, self.kind) as tmp:
            files = publish(save_onnx(model, tmp / f"{self.kind}.onnx"), out_dir)
        return self._result(files, [], count_quantized_nodes(model))


@dataclass(frozen=True)
class Fp16Config:
    keep_io_types: bool = param(True, "keep float32 inputs/outputs (apps and reference inputs "
                                      "stay float32); casts are inserted at the edges")
    op_block_list: tuple[str, ...] | None = param(
        None, "op types left in float32; None uses onnxruntime's DEFAULT_OP_BLOCK_LIST")


class OnnxFp16Builder(_OnnxBuilder):
    """float16 weights and compute with onnxruntime.transformers.float16 (onnxconverter_common's
    converter writes graphs ORT refuses when they hold a Cast to float, MODELS.md)."""

    kind = "onnx-fp16"
    Config = Fp16Config

    def build(self, model: onnx.ModelProto, out_dir: Path, samples: Samples | None = None) -> BuiltVariant:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        if float_weight_count(model, float32_only=True) == 0:
            raise VariantNotApplicable(f"{self.kind}: no float32 weights, fp16 changes nothing")
        cfg = self.config
        block = list(cfg.op_block_list) if cfg.op_block_list is not None else None
        mark = output_mark()
        try:
            converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=cfg.keep_io_types,
                                                 op_block_list=block)
        except Exception as exc:  # the converter asserts and raises ValueError on odd graphs
            raise PackagingError(f"{self.kind}: float16 conversion failed: {first_line(exc)}"
                                 f"{output_hint(mark)}") from None
        out_dir = Path(out_dir)
        with work_dir(out_dir, self.kind) as tmp:
            staged = save_onnx(converted, tmp / f"{self.kind}.onnx")
            check_loads_in_ort(staged[0], self.kind)
            files = publish(staged, out_dir)
        return self._result(files, [])


@dataclass(frozen=True)
class Int8StaticConfig:
    per_channel: bool = param(True, "one weight scale per output channel (needs opset >= 13; "
                                    "older models are upgraded)")
    activation_symmetric: bool = param(
        False, "symmetric activation ranges; activations then use int8 with zero-point 0 "
               "(ARM and GPU kernels prefer it), else uint8 with a zero-point (x86 CPU)")
    weight_symmetric: bool = param(True, "symmetric weight ranges (zero-point 0)")
    calibration_method: str = param("minmax", f"activation range estimator: {', '.join(CALIBRATION_METHODS)}")
    reduce_range: bool = param(False, "7-bit weights: avoids saturation on x86 CPUs without VNNI")
    nodes_to_exclude: tuple[Any, ...] = param(
        (), "node names left in float, each a name or a (name, reason) pair (the pipeline passes the "
            "model's post-processing and the repair's most error-sensitive nodes); recorded with the "
            "reason in the variant's float_nodes")
    op_types: tuple[str, ...] | None = param(None, "op types to quantize; None: all ORT supports")
    pre_process: bool = param(True, "run onnxruntime's quant_pre_process (shape inference) first; "
                                    "failures fall back, with a note")
    pre_process_optimize: bool = param(
        False, "let quant_pre_process run ORT's graph optimizer too. Off: it fuses and renames nodes "
               "(MatMul+Add → Gemm), so names from quantizable_node_names() and nodes_to_exclude "
               "would no longer match, and the simplify pass has already folded and fused")

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"onnx-int8: calibration_method {self.calibration_method!r} is not one "
                              f"of {', '.join(CALIBRATION_METHODS)}")
        _, records = split_float_nodes(self.nodes_to_exclude, "onnx-int8")
        object.__setattr__(self, "nodes_to_exclude", tuple((r["node"], r["reason"]) for r in records))
        if self.op_types is not None:
            object.__setattr__(self, "op_types", tuple(self.op_types))

    @property
    def exclude_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.nodes_to_exclude)


class _SampleReader:
    """ORT CalibrationDataReader over an in-memory list of feed dicts."""

    def __init__(self, samples: Samples) -> None:
        self._samples = samples
        self._i = 0
        self._end = len(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= self._end:
            return None
        self._i += 1
        return self._samples[self._i - 1]

    def __len__(self) -> int:
        return len(self._samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._i, self._end = start_index, min(end_index, len(self._samples))

    def rewind(self) -> None:
        self._i, self._end = 0, len(self._samples)


# What onnxruntime's histogram calibrators (entropy, percentile) may hold of the model's
# intermediate tensors: they keep every sample's full tensors until the end (MinMax keeps only
# per-tensor minima and maxima). Measured: an 800x608 layout detector's percentile calibration on
# 32 samples took 24 GB and was OOM-killed; past the bound they get fewer samples.
CALIBRATION_MEMORY_BYTES = 2 << 30


def activation_bytes(model: onnx.ModelProto) -> int:
    """Bytes of one sample's intermediate tensors, from shape inference (unknown dims count 1)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference fails on some real models: no estimate, no bound
        return 0
    total = 0
    for value in inferred.graph.value_info:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        elements = 1
        for dim in tensor.shape.dim:
            elements *= dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1
        size = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize if tensor.elem_type else 4
        total += elements * size
    return total


def calibration_samples(model: onnx.ModelProto, method: str, samples: Samples) -> tuple[Samples, str | None]:
    """The samples ``method`` calibrates on within CALIBRATION_MEMORY_BYTES, and a note when fewer."""
    if method == "minmax":
        return samples, None
    per_sample = activation_bytes(model)
    if per_sample <= 0 or per_sample * len(samples) <= CALIBRATION_MEMORY_BYTES:
        return samples, None
    kept = samples[:max(1, CALIBRATION_MEMORY_BYTES // per_sample)]
    return kept, (f"{method} calibration on {len(kept)} of {len(samples)} samples: one sample's "
                  f"intermediate tensors take {per_sample / 1e6:.0f} MB")


def prepare_for_quantization(model: onnx.ModelProto, kind: str, notes: list[str]) -> onnx.ModelProto:
    """Refuse what cannot be quantized; name nodes and fold Constant-node weights (noted)."""
    refuse_ml_graph(model, kind)
    already = count_quantized_nodes(model)
    if already:
        raise VariantNotApplicable(f"{kind}: the model is already quantized ({already} int8 nodes)")
    if model.functions:
        # Quantizers do not enter model-local functions (torch dynamo exports put layers there).
        count = len(model.functions)
        try:
            model = onnx.inliner.inline_local_functions(model)
            notes.append(f"{count} model-local function(s) inlined")
        except Exception as exc:  # inliner rejects some opset mixes; quantize what is visible
            notes.append(f"{count} model-local function(s) could not be inlined ({first_line(exc)})")
    model, folded = fold_constant_nodes_counted(ensure_node_names(model))
    if folded:
        notes.append(f"{folded} Constant node(s) folded into initializers")
    flattened = flatten_gemm_biases(model)
    if flattened:
        notes.append(f"{flattened} Gemm bias(es) of shape [1, N] flattened to [N]")
    return model


def flatten_gemm_biases(model: onnx.ModelProto) -> int:
    """Reshape Gemm biases of shape [1, N] to [N] in place (same result by broadcasting).

    onnxslim fuses MatMul+Add into a Gemm with a [1, N] bias (magika); onnxruntime's quantizer
    then fails on it ("truth value of an array ... is ambiguous") while it handles [N].
    """
    initializers = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    count = 0
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3:
            continue
        bias = initializers.get(node.input[2])
        if bias is None or len(bias.dims) != 2 or bias.dims[0] != 1 or users.get(bias.name, 0) != 1:
            continue
        bias.dims[:] = [bias.dims[1]]  # raw data or typed data: the element order is unchanged
        count += 1
    return count


def run_quant_pre_process(src: Path, dst: Path, notes: list[str], optimize: bool = False) -> Path:
    """``quant_pre_process`` src → dst, retried with skip_symbolic_shape=True; on a second failure
    returns ``src`` unchanged (noted). The cwd is the scratch folder meanwhile: some onnxruntime
    versions leave temp files in the current directory. chdir is process-wide, so builders must
    not run in threads of one process (the pipeline runs them one after another)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    previous = os.getcwd()
    try:
        os.chdir(dst.parent)
        try:
            quant_pre_process(str(src), str(dst), skip_optimization=not optimize)
            return dst
        except Exception as exc:  # symbolic shape inference raises anything from sympy to KeyError
            first = first_line(exc)
        try:
            quant_pre_process(str(src), str(dst), skip_optimization=not optimize, skip_symbolic_shape=True)
            notes.append(f"quant_pre_process symbolic shape inference failed ({first}); "
                         "retried with skip_symbolic_shape=True")
            return dst
        except Exception as exc:
            notes.append(f"quant_pre_process failed ({first_line(exc)}); quantized without it")
            return src
    finally:
        os.chdir(previous)


class OnnxInt8StaticBuilder(_OnnxBuilder):
    """Static INT8 in QDQ format with calibration over the given samples (onnxruntime)."""

    kind = "onnx-int8"
    Config = Int8StaticConfig

    def build(self, model: onnx.ModelProto, out_dir: Path, samples: Samples) -> BuiltVariant:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        cfg, notes = self.config, []
        model = prepare_for_quantization(model, self.kind, notes)
        check_samples(model, samples, self.kind)
        model, per_channel = _opset_for_per_channel(model, cfg.per_channel, notes)
        large = model.ByteSize() > PROTO_LIMIT
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        out_dir = Path(out_dir)
        with work_dir(out_dir, self.kind) as tmp:
            given = tmp / "input.onnx"
            staged_input = save_onnx(model, given)
            src = given
            if cfg.pre_process:
                src = self._pre_process(given, staged_input, tmp, notes)
            present = {n.name for n in onnx.load(str(src), load_external_data=False).graph.node}
            missing = sorted(set(cfg.exclude_names) - present)
            if missing:
                notes.append(f"nodes_to_exclude not in the graph: {', '.join(missing[:10])}")
            out = tmp / "out" / f"{self.kind}.onnx"
            out.parent.mkdir()

            calib_samples, bounded = calibration_samples(model, cfg.calibration_method, samples)
            if bounded:
                notes.append(bounded)

            def quantize(source: Path) -> None:
                op_types = list(cfg.op_types) if cfg.op_types else None
                # Ranges depend on the calibrated model, method, op types and samples only: a
                # repair attempt (other nodes_to_exclude, per-channel weights) reuses them.
                # onnxruntime computes and stores them on a miss, loads them on a hit.
                ranges = None
                if self.cache is not None:
                    ranges = self.cache.ranges_path(
                        file_digest([source] if source != given else staged_input),
                        cfg.calibration_method, op_types, calib_samples)
                quantize_static(
                    str(source), str(out), _SampleReader(calib_samples), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=op_types,
                    per_channel=per_channel, reduce_range=cfg.reduce_range,
                    # Symmetric activations in uint8 would put the zero-point at 128: use int8.
                    activation_type=QuantType.QInt8 if cfg.activation_symmetric else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(cfg.exclude_names) or None,
                    calibrate_method=methods[cfg.calibration_method],
                    use_external_data_format=large,
                    extra_options={"ActivationSymmetric": cfg.activation_symmetric,
                                   "WeightSymmetric": cfg.weight_symmetric},
                    calibration_cache_path=str(ranges) if ranges is not None else None,
                )

            mark = output_mark()
            try:
                quantize(src)
            except Exception as exc:
                if src == given:
                    raise PackagingError(f"{self.kind}: quantize_static failed: {first_line(exc)}"
                                         f"{output_hint(mark)}") from None
                # Measured on magika: the pre-processor's Gemm fusion leaves a 2-D bias that ORT's
                # per-channel bias-scale check cannot handle; the graph as given quantizes fine.
                notes.append(f"quantize_static failed on the pre-processed model ({first_line(exc)}); "
                             "retried without quant_pre_process")
                mark = output_mark()
                try:
                    quantize(given)
                except Exception as exc2:
                    raise PackagingError(f"{self.kind}: quantize_static failed: {first_line(exc2)}"
                                         f"{output_hint(mark)}") from None
            files, quantized = _publish_quantized(self.kind, model, out, out_dir)
        notes.append(f"{quantized} nodes quantized ({'per-channel' if per_channel else 'per-tensor'} "
                     f"weights, {cfg.calibration_method} calibration over {len(samples)} samples)")
        return self._result(files, notes, quantized)


    def _pre_process(self, given: Path, staged: list[Path], tmp: Path, notes: list[str]) -> Path:
        """``quant_pre_process`` of ``given``, once per distinct model: a repair attempt reuses the
        first attempt's output (and its notes). Models with external data are not cached."""
        cfg = self.config
        if self.cache is None or len(staged) > 1:
            return run_quant_pre_process(given, tmp / "preprocessed.onnx", notes, cfg.pre_process_optimize)
        key = f"{file_digest(staged)}|optimize={cfg.pre_process_optimize}"
        found = self.cache.preprocessed(key)
        if found is not None:
            path, cached_notes = found
            notes.extend(cached_notes)
            return given if path is None else path
        own: list[str] = []
        src = run_quant_pre_process(given, tmp / "preprocessed.onnx", own, cfg.pre_process_optimize)
        notes.extend(own)
        stored = self.cache.store_preprocessed(key, None if src == given else src, own)
        return given if stored is None else stored


def _opset_for_per_channel(model: onnx.ModelProto, per_channel: bool,
                           notes: list[str]) -> tuple[onnx.ModelProto, bool]:
    """Per-channel QDQ on opset < 13 writes DequantizeLinear with ``axis``, which that opset does
    not have: ORT refuses the model (checked with ORT 1.32). Upgrade to 13, or go per-tensor."""
    opset = default_opset(model)
    if not per_channel or opset >= 13:
        return model, per_channel
    try:
        model = upgrade_opset(model, 13)
    except Exception as exc:  # the version converter has no adapter for some ops
        notes.append(f"opset {opset} could not be upgraded to 13 ({first_line(exc)}); per-tensor weights")
        return model, False
    notes.append(f"opset {opset} upgraded to 13 for per-channel QDQ")
    return model, True


def _publish_quantized(kind: str, model: onnx.ModelProto, out: Path, out_dir: Path) -> tuple[list[Path], int]:
    """Count the int8 nodes of a quantizer's output (0: not an INT8 variant), check it loads, publish it."""
    quantized = count_quantized_nodes(onnx.load(str(out)))
    if quantized == 0:
        raise VariantNotApplicable(f"{kind}: {_zero_reason(model)}")
    check_loads_in_ort(out, kind)
    return publish(staged_files(out), out_dir), quantized


def _zero_reason(model: onnx.ModelProto) -> str:
    hidden = if_subgraph_weight_count(model)
    if hidden and float_weight_count(model, include_subgraphs=False) == 0:
        return f"0 nodes quantized: all {hidden} weight tensors are inside If/Loop/Scan subgraphs"
    if hidden:
        return f"0 nodes quantized ({hidden} weight tensors are inside If/Loop/Scan subgraphs)"
    top = sum(n.op_type in QUANTIZABLE_OP_TYPES for n in model.graph.node)
    nested = sum(n.op_type in QUANTIZABLE_OP_TYPES for n in iter_nodes(model.graph)) - top
    if nested and not top:
        return f"0 nodes quantized: all {nested} Conv/MatMul/Gemm nodes are inside If/Loop/Scan subgraphs"
    return "0 nodes quantized: no op the quantizer supports takes quantizable inputs"


@dataclass(frozen=True)
class Int8DynamicConfig:
    min_matmul_fraction: float = param(
        0.5, "least share of MACs in MatMul/Gemm/RNN ops; below it the graph is Conv-bound and "
             "dynamic INT8 (ConvInteger) measured 6-15x slower than fp32")
    op_types: tuple[str, ...] = param(("MatMul", "Attention", "LSTM"),
                                      "op types to quantize; Conv is left out on purpose")
    nodes_to_exclude: tuple[Any, ...] = param((), "node names left in float, each a name or a "
                                                   "(name, reason) pair (see Int8StaticConfig)")

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.min_matmul_fraction) <= 1.0:
            raise ConfigError(f"onnx-int8-dynamic: min_matmul_fraction {self.min_matmul_fraction} "
                              "is not between 0 and 1")
        object.__setattr__(self, "op_types", tuple(self.op_types))
        _, records = split_float_nodes(self.nodes_to_exclude, "onnx-int8-dynamic")
        object.__setattr__(self, "nodes_to_exclude", tuple((r["node"], r["reason"]) for r in records))

    @property
    def exclude_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.nodes_to_exclude)


class OnnxInt8DynamicBuilder(_OnnxBuilder):
    """Dynamic INT8 (weights int8, activations quantized at run time): MatMul-heavy graphs only."""

    kind = "onnx-int8-dynamic"
    Config = Int8DynamicConfig

    def build(self, model: onnx.ModelProto, out_dir: Path, samples: Samples | None = None) -> BuiltVariant:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        cfg, notes = self.config, []
        model = prepare_for_quantization(model, self.kind, notes)
        share = matmul_fraction(model)
        if share < cfg.min_matmul_fraction:
            raise VariantNotApplicable(
                f"{self.kind}: Conv-heavy graph (MatMul share of MACs {share:.0%} < "
                f"{cfg.min_matmul_fraction:.0%}): dynamic INT8 is 6-15x slower than fp32 on CNNs")
        if "MatMul" in cfg.op_types:
            model, rewritten = gemm_to_matmul(model)
            if rewritten:
                notes.append(f"{rewritten} Gemm node(s) rewritten as MatMul+Add (no dynamic Gemm kernel)")
        out_dir = Path(out_dir)
        with work_dir(out_dir, self.kind) as tmp:
            src = tmp / "input.onnx"
            save_onnx(model, src)
            out = tmp / "out" / f"{self.kind}.onnx"
            out.parent.mkdir()
            mark = output_mark()
            try:
                quantize_dynamic(str(src), str(out), op_types_to_quantize=list(cfg.op_types),
                                 per_channel=False, weight_type=QuantType.QInt8,
                                 nodes_to_exclude=list(cfg.exclude_names) or None,
                                 use_external_data_format=model.ByteSize() > PROTO_LIMIT)
            except Exception as exc:
                raise PackagingError(f"{self.kind}: quantize_dynamic failed: {first_line(exc)}"
                                     f"{output_hint(mark)}") from None
            files, quantized = _publish_quantized(self.kind, model, out, out_dir)
        notes.append(f"{quantized} nodes quantized (MatMul share of MACs {share:.0%})")
        return self._result(files, notes, quantized)


ONNX_BUILDERS: dict[str, type[_OnnxBuilder]] = {
    b.kind: b for b in (OnnxFp32Builder, OnnxFp16Builder, OnnxInt8StaticBuilder, OnnxInt8DynamicBuilder)
}
