"""OpenVINO IR variant builders: fp32, fp16 (compressed weights) and INT8 via NNCF.

Each converts the ONNX model with ``openvino.convert_model`` and writes ``{kind}.xml`` + ``.bin``
(main file first). The IR keeps the ONNX input/output names, so feeds by name work unchanged.

Inference precision is part of the variant (``runtime_options``), because OpenVINO's CPU plugin
runs in **bf16 by default** on CPUs with AVX512-BF16/AMX, which alone cost one classifier 9 % top-1
agreement (MODELS.md). So fp32 and int8 pin ``f32`` (int8 layers still run int8; the rest stays
f32). fp16 asks for ``f16``: GPU, NPU and fp16-capable CPUs (ARM, AMX-FP16) then compute in f16,
which is what the device does, so validating with the variant's own options measures it. A CPU
without native f16 silently runs f32 (measured on the AVX2 build host: hint f16 → f32), and there
host validation measures only the fp16 weight rounding. ``HOST_REFERENCE_OPTIONS`` is what an f32
reference run of any IR should use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from edgesdk.errors import ConfigError, EdgeError, PackagingError, UnsupportedModelError
from edgesdk.pipeline.build_support import (
    Samples, check_samples, config_from_options, param, publish, real_inputs, save_onnx, work_dir,
)
from edgesdk.pipeline.graph_stats import (
    BuiltVariant, VariantNotApplicable, count_openvino_quantized, ensure_node_names, first_line,
    ml_op_types, split_float_nodes,
)
from edgesdk.profiles import VARIANT_KINDS
from edgesdk.quiet import output_hint, output_mark

HOST_REFERENCE_OPTIONS: dict[str, str] = {"inference_precision_hint": "f32"}
PRESETS = ("performance", "mixed")
MODEL_TYPES = (None, "transformer")  # nncf.ModelType's values, None: NNCF's default (CNN patterns)
# OpenVINO prefixes the useful line with assertion boilerplate; these lines say nothing.
_BOILERPLATE = re.compile(r"^(Check '.*' failed at .*|FrontEnd API failed with \w+:?|"
                          r"Model wasn't fully converted\..*|Summary:|Loading input model)$")


def openvino_reason(exc: BaseException) -> str:
    """The informative line of an OpenVINO error: its "Summary:" if it has one, else the first
    line that is not assertion boilerplate ("Check 'false' failed at ...")."""
    lines = [ln.strip().lstrip("- ").strip() for ln in str(exc).splitlines() if ln.strip()]
    if "Summary:" in lines:
        summary = lines[len(lines) - lines[::-1].index("Summary:"):]
        if summary:
            return "; ".join(summary)[:300]
    useful = [ln for ln in lines if not _BOILERPLATE.match(ln)]
    return (useful or lines or [type(exc).__name__])[0][:300]


def refuse_ml_graph_openvino(model: onnx.ModelProto, kind: str) -> None:
    ops = ml_op_types(model)
    if ops:
        # Checked with skl2onnx models on OpenVINO 2026.4: "No conversion rule found for operations:
        # ai.onnx.ml.LinearClassifier, ai.onnx.ml.Scaler"; ZipMap outputs fail even to load.
        raise VariantNotApplicable(f"{kind}: classic-ML graph (ai.onnx.ml ops: {', '.join(ops)}); "
                                   "OpenVINO's ONNX frontend has no conversion rule for them")


def convert_onnx(model: onnx.ModelProto, work: Path, kind: str, notes: list[str]) -> Any:
    """ONNX → ``openvino.Model`` with the ONNX input/output names on its tensors."""
    import openvino as ov

    src = work / "input.onnx"
    save_onnx(model, src)
    try:
        ov_model = ov.convert_model(str(src))
    except Exception as exc:  # OpConversionFailure, GeneralFailure, RuntimeError ...
        raise UnsupportedModelError(f"{kind}: OpenVINO cannot convert the model: "
                                    f"{openvino_reason(exc)}") from None
    _keep_names(ov_model.inputs, real_inputs(model), "input", notes)
    _keep_names(ov_model.outputs, [o.name for o in model.graph.output], "output", notes)
    return ov_model


def _keep_names(ports: Any, names: list[str], what: str, notes: list[str]) -> None:
    if len(ports) != len(names):
        raise PackagingError(f"OpenVINO model has {len(ports)} {what}s where the ONNX model has {len(names)}")
    for port, name in zip(ports, names):
        before = sorted(port.get_names())
        if name not in before:
            port.get_tensor().set_names({name, *before})
            notes.append(f"{what} {name!r} given back its ONNX name (OpenVINO named it {before})")


def save_ir(ov_model: Any, work: Path, kind: str, compress_to_fp16: bool) -> list[Path]:
    """``{kind}.xml`` + ``.bin`` in the work folder, checked to compile on the host CPU."""
    import openvino as ov

    xml = work / "ir" / f"{kind}.xml"
    xml.parent.mkdir()
    try:
        ov.save_model(ov_model, str(xml), compress_to_fp16=compress_to_fp16)
        core = ov.Core()
        core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    except Exception as exc:
        raise PackagingError(f"{kind}: OpenVINO IR does not save or load: {openvino_reason(exc)}") \
            from None
    return [xml, xml.with_suffix(".bin")]


class _OpenVinoBuilder:
    kind: ClassVar[str]
    Config: ClassVar[type]
    compress_to_fp16: ClassVar[bool] = False
    runtime_options: ClassVar[dict[str, str]] = HOST_REFERENCE_OPTIONS

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> _OpenVinoBuilder:
        return cls(config_from_options(cls.Config, cls.kind, options))

    def build(self, model: onnx.ModelProto, out_dir: Path, samples: Samples | None = None) -> BuiltVariant:
        refuse_ml_graph_openvino(model, self.kind)
        out_dir, notes = Path(out_dir), []
        model = ensure_node_names(model)  # OpenVINO names ops after ONNX nodes: ignored scopes need it
        with work_dir(out_dir, self.kind) as work:
            ov_model = convert_onnx(model, work, self.kind, notes)
            ov_model = self.transform(ov_model, model, samples, notes)
            staged = save_ir(ov_model, work, self.kind, self.compress_to_fp16)
            quantized = 0
            if VARIANT_KINDS[self.kind].precision == "int8":
                quantized = count_openvino_quantized(staged[0])
                if quantized == 0:
                    raise VariantNotApplicable(f"{self.kind}: 0 ops quantized by NNCF")
                notes.append(f"{quantized} ops consume int8 data")
            files = publish(staged, out_dir)
        info = VARIANT_KINDS[self.kind]
        return BuiltVariant(kind=self.kind, files=files, precision=info.precision, runtime=info.runtime,
                            quantized_nodes=quantized, runtime_options=dict(self.runtime_options),
                            notes=notes, float_nodes=self.float_nodes())

    def float_nodes(self) -> list[dict[str, str]]:
        """Nodes this build kept in float on request, {"node", "reason"} each (INT8 only)."""
        return []

    def transform(self, ov_model: Any, model: onnx.ModelProto, samples: Samples | None,
                  notes: list[str]) -> Any:
        """Hook between conversion and saving (NNCF quantization); the base saves as converted."""
        return ov_model


@dataclass(frozen=True)
class OpenVinoFp32Config:
    """openvino-fp32 has nothing to set."""


class OpenVinoFp32Builder(_OpenVinoBuilder):
    """IR with fp32 weights, run with inference precision pinned to f32."""

    kind = "openvino-fp32"
    Config = OpenVinoFp32Config


@dataclass(frozen=True)
class OpenVinoFp16Config:
    """openvino-fp16 has nothing to set."""


class OpenVinoFp16Builder(_OpenVinoBuilder):
    """IR with fp16-compressed weights (half the size), run with an f16 precision hint."""

    kind = "openvino-fp16"
    Config = OpenVinoFp16Config
    compress_to_fp16 = True
    runtime_options = {"inference_precision_hint": "f16"}


@dataclass(frozen=True)
class OpenVinoBf16Config:
    """openvino-bf16 has nothing to set."""


class OpenVinoBf16Builder(_OpenVinoBuilder):
    """IR with fp16-compressed weights (half the size; exact for bf16, whose mantissa is shorter),
    run with an inference precision hint bf16: AVX512-BF16/AMX CPUs compute in bf16, about 2× f32
    on such CPUs (MODELS.md). A CPU without BF16 cannot run it (the session refuses, see
    `edgesdk.runtime.openvino_computes`), so a host without BF16 validates only the weights and the
    device applies the gate (``device_verified``)."""

    kind = "openvino-bf16"
    Config = OpenVinoBf16Config
    compress_to_fp16 = True
    runtime_options = {"inference_precision_hint": "bf16"}


@dataclass(frozen=True)
class OpenVinoInt8Config:
    preset: str = param("performance", "NNCF preset: 'performance' (symmetric activations, "
                                       "fastest) or 'mixed' (asymmetric activations, for "
                                       "activations not centred on 0)")
    subset_size: int = param(300, "calibration samples NNCF uses (at most the number given)")
    fast_bias_correction: bool = param(
        True, "NNCF's fast bias correction (one pass). False: the slower per-layer bias correction, "
              "more accurate in general")
    model_type: str | None = param(None, "None, or 'transformer' for NNCF's transformer patterns "
                                         "(keeps LayerNorm/Softmax paths out of int8; 'mixed' preset)")
    accuracy_control: bool = param(
        False, "nncf.quantize_with_accuracy_control: after quantizing, ops are reverted to float, "
               "most harmful first, until the mean output cosine to fp32 (the gate's metric) on the "
               "samples drops by at most max_drop")
    max_drop: float = param(0.01, "accuracy control: allowed drop of the mean cosine to the fp32 "
                                  "outputs, worst output (the int8 gate's cosine_min is 0.98)")
    max_reverted: int = param(16, "accuracy control: most ops it may revert to float (each one "
                                  "costs a validation pass)")
    accuracy_samples: int = param(16, "accuracy control: samples it validates on (the first of "
                                      "the calibration samples) and ranks ops with")
    nodes_to_exclude: tuple[Any, ...] = param(
        (), "ONNX node names left in float (NNCF ignored scope), each a name or a (name, reason) "
            "pair; recorded with its reason in the variant's float_nodes")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"openvino-int8: preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.subset_size < 1:
            raise ConfigError(f"openvino-int8: subset_size must be >= 1, got {self.subset_size}")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"openvino-int8: model_type {self.model_type!r} is not one of "
                              f"{', '.join(str(t) for t in MODEL_TYPES)}")
        if not isinstance(self.max_drop, (int, float)) or isinstance(self.max_drop, bool) \
                or not 0.0 < float(self.max_drop) < 1.0:
            raise ConfigError(f"openvino-int8: max_drop must be between 0 and 1, got {self.max_drop!r}")
        for name in ("max_reverted", "accuracy_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"openvino-int8: {name} must be an integer >= 1, got {value!r}")
        _, records = split_float_nodes(self.nodes_to_exclude, "openvino-int8")
        object.__setattr__(self, "nodes_to_exclude",
                           tuple((r["node"], r["reason"]) for r in records))

    @property
    def exclude_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.nodes_to_exclude)


class OpenVinoInt8Builder(_OpenVinoBuilder):
    """INT8 IR by NNCF post-training quantization over the calibration samples, optionally with
    NNCF's accuracy control against the fp32 outputs."""

    kind = "openvino-int8"
    Config = OpenVinoInt8Config

    def float_nodes(self) -> list[dict[str, str]]:
        return [{"node": name, "reason": reason} for name, reason in self.config.nodes_to_exclude]

    def transform(self, ov_model: Any, model: onnx.ModelProto, samples: Samples | None,
                  notes: list[str]) -> Any:
        import nncf

        cfg = self.config
        check_samples(model, samples or [], self.kind)
        ignored = None
        if cfg.nodes_to_exclude:
            names = cfg.exclude_names
            # OpenVINO names an op after its ONNX node, sometimes with a suffix ("conv0/WithoutBiases").
            patterns = [f"^{re.escape(n)}(/.*)?$" for n in names]
            op_names = [op.get_friendly_name() for op in ov_model.get_ops()]
            missing = [n for n, p in zip(names, patterns) if not any(re.match(p, o) for o in op_names)]
            if missing:
                notes.append(f"{len(missing)} of {len(names)} nodes_to_exclude not in the OpenVINO "
                             f"model (folded away on conversion): {', '.join(missing[:10])}")
            ignored = nncf.IgnoredScope(patterns=patterns, validate=False)
        common = dict(
            preset={"performance": nncf.QuantizationPreset.PERFORMANCE,
                    "mixed": nncf.QuantizationPreset.MIXED}[cfg.preset],
            subset_size=min(cfg.subset_size, len(samples)),
            fast_bias_correction=cfg.fast_bias_correction,
            model_type=nncf.ModelType(cfg.model_type) if cfg.model_type else None,
            ignored_scope=ignored,
        )
        calibration = nncf.Dataset(samples, _as_feeds)
        mark = output_mark()
        try:
            if cfg.accuracy_control:
                quantized = self._with_accuracy_control(ov_model, model, calibration, samples, common, notes)
            else:
                quantized = nncf.quantize(ov_model, calibration, **common)
        except EdgeError:
            raise
        except Exception as exc:  # nncf raises its own errors and whatever OpenVINO raised
            what = "quantize_with_accuracy_control" if cfg.accuracy_control else "quantize"
            raise PackagingError(f"{self.kind}: nncf.{what} failed: {first_line(exc)}{output_hint(mark)}") \
                from None
        extras = [f"model_type {cfg.model_type}"] if cfg.model_type else []
        if not cfg.fast_bias_correction:
            extras.append("full bias correction")
        notes.append(f"NNCF preset {cfg.preset}, {common['subset_size']} calibration samples"
                     + "".join(f", {e}" for e in extras))
        return quantized

    def _with_accuracy_control(self, ov_model: Any, model: onnx.ModelProto, calibration: Any,
                               samples: Samples, common: dict[str, Any], notes: list[str]) -> Any:
        """NNCF quantizes, then reverts the ops that cost the most of the metric until the drop is
        within ``max_drop`` or ``max_reverted`` ops are reverted."""
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        cfg = self.config
        chosen = samples[:cfg.accuracy_samples]
        # The fp32 reference is the unquantized IR at f32 (bf16 by default on AMX/BF16 CPUs).
        compiled = ov.Core().compile_model(ov_model, "CPU", dict(_F32_CONFIG))
        outputs = [o.name for o in model.graph.output]  # convert_onnx kept these names
        references = [{name: np.array(result[name]) for name in outputs}
                      for result in (compiled(feeds) for feeds in chosen)]
        del compiled
        metric = OutputCosineMetric(chosen, references)
        validation = nncf.Dataset(list(range(len(chosen))), lambda i: chosen[i])
        quantized = nncf.quantize_with_accuracy_control(
            ov_model, calibration, validation, metric, max_drop=float(cfg.max_drop),
            drop_type=nncf.DropType.ABSOLUTE,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=cfg.max_reverted, ranking_subset_size=len(chosen)),
            **common)
        notes.append(f"accuracy control on {len(chosen)} samples (max drop {cfg.max_drop:g} of the mean "
                     f"output cosine, at most {cfg.max_reverted} ops reverted): worst output cosine "
                     f"{metric.last:.4f} after {metric.calls} validations")
        return quantized


_F32_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


class OutputCosineMetric:
    """``validation_fn`` for NNCF's accuracy control: the int8 gate's cosine metric, the mean
    cosine similarity of each output to the fp32 reference over the samples, worst output (higher
    is better). Data items are sample indices; it also returns one value per item (the worst
    output's cosine on that sample), which NNCF ranks the ops to revert with."""

    def __init__(self, samples: Samples, references: list[dict[str, np.ndarray]]) -> None:
        if len(samples) != len(references):
            raise PackagingError(f"{len(samples)} samples but {len(references)} reference outputs")
        self.samples, self.references = samples, references
        self.calls = 0
        self.last = float("nan")  # of the last validation over all samples (the final model's)

    def __call__(self, compiled: Any, indices: Any) -> tuple[float, list[float]]:
        from edgesdk.validation import compare_outputs

        per_output: dict[str, list[float]] = {}
        for index in indices:
            ref = self.references[int(index)]
            result = compiled(self.samples[int(index)])
            metrics = compare_outputs([ref], [{name: np.asarray(result[name]) for name in ref}])
            for name, m in metrics.items():
                per_output.setdefault(name, []).append(m.cosine)
        self.calls += 1
        if not per_output:
            return float("nan"), []
        value = min(float(np.mean(v)) for v in per_output.values())
        per_item = [float(x) for x in np.min(np.array(list(per_output.values())), axis=0)]
        if len(per_item) == len(self.samples):
            self.last = value
        return value, per_item


def _as_feeds(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NNCF transform: a feed dict is already what the compiled model takes (inputs by name)."""
    return sample


OPENVINO_BUILDERS: dict[str, type[_OpenVinoBuilder]] = {
    b.kind: b for b in (OpenVinoFp32Builder, OpenVinoFp16Builder, OpenVinoBf16Builder, OpenVinoInt8Builder)
}
